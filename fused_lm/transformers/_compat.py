"""The transformers import, in one place: a clear error when it is missing or too old.

fused_lm.transformers follows transformers' attention and mask interfaces (``AttentionInterface``,
``masking_utils.AttentionMaskInterface``), which exist since transformers 4.53; it is tested with
the version in ``TESTED_TRANSFORMERS`` (the pin of the ``test`` extra in pyproject.toml).
"""

from __future__ import annotations

import importlib

TESTED_TRANSFORMERS = "5.24.0"


def transformers():
    """The transformers module, or an ImportError that says how to get a tested version."""
    try:
        module = importlib.import_module("transformers")
        importlib.import_module("transformers.masking_utils").AttentionMaskInterface  # noqa: B018
    except ImportError as exc:
        raise ImportError(
            f"fused_lm.transformers needs Hugging Face transformers with AttentionInterface and "
            f"AttentionMaskInterface (>= 4.53; tested with {TESTED_TRANSFORMERS}): "
            f"pip install 'transformers=={TESTED_TRANSFORMERS}' ({exc})") from exc
    except AttributeError as exc:
        raise ImportError(
            f"this transformers ({getattr(module, '__version__', '?')}) has no "
            f"masking_utils.AttentionMaskInterface; fused_lm.transformers needs >= 4.53 (tested with "
            f"{TESTED_TRANSFORMERS})") from exc
    return module
