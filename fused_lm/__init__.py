"""fused_lm: fused GPU kernels for language-model training, as drop-in replacements for torch.

Import works with no compiler, GPU or compiled extension: missing pieces are reported when used.
"""

from fused_lm._version import __version__

__all__ = ["__version__"]
