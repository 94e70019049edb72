"""Drop-in modules: losses and attention. Thin layers over fused_lm.nn.functional."""

from __future__ import annotations

import importlib

# Public name -> module that defines it. Resolved on first use so that `import fused_lm.nn`
# stays cheap (it does not import triton) and each family can be imported on its own.
_EXPORTS = {
    "CrossEntropyLoss": "fused_lm.nn.loss",
    "LinearCrossEntropyLoss": "fused_lm.nn.loss",
    "MultiheadAttention": "fused_lm.nn.attention",
    "functional": "fused_lm.nn.functional",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(_EXPORTS[name])
        value = module if name == "functional" else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fused_lm.nn' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
