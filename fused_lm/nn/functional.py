"""Functional forms mirroring torch.nn.functional signatures (plus our keyword options)."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "cross_entropy": "fused_lm.nn._functional_loss",
    "linear_cross_entropy": "fused_lm.nn._functional_loss",
    "scaled_dot_product_attention": "fused_lm.nn._functional_attention",
    "flash_attention": "fused_lm.nn._functional_attention",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fused_lm.nn.functional' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
