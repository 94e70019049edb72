"""fused_lm: fused GPU kernels for language-model training, as drop-in replacements for torch.

    fused_lm.optim.AdamW / Lion            for torch.optim.AdamW (and lion-pytorch)
    fused_lm.clip_grad_norm_ and friends   for torch.nn.utils.clip_grad_norm_ ...
    fused_lm.nn.CrossEntropyLoss, LinearCrossEntropyLoss, MultiheadAttention
    fused_lm.nn.functional.cross_entropy, linear_cross_entropy, scaled_dot_product_attention,
                           flash_attention
    fused_lm.transformers.apply_fused_lm   Hugging Face transformers in one line (optional dependency)

Import works with no compiler, GPU or compiled extension: missing pieces are reported when used.
Submodules and public functions are resolved on first use, so `import fused_lm` imports neither
triton nor the compiled extensions.
"""

from __future__ import annotations

import importlib

from fused_lm._version import __version__

_SUBMODULES = {"nn", "ops", "optim", "reference", "transformers"}
_FUNCTIONS = {
    "clip_grad_norm_": "fused_lm.optim.clip",
    "clip_grads_with_norm_": "fused_lm.optim.clip",
    "clip_grad_value_": "fused_lm.optim.clip",
    "get_total_norm": "fused_lm.optim.clip",
}

__all__ = ["__version__", *sorted(_SUBMODULES), *_FUNCTIONS]


def __getattr__(name: str):
    if name in _SUBMODULES:
        value = importlib.import_module(f"fused_lm.{name}")
    elif name in _FUNCTIONS:
        value = getattr(importlib.import_module(_FUNCTIONS[name]), name)
    else:
        raise AttributeError(f"module 'fused_lm' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | _SUBMODULES | set(_FUNCTIONS))
