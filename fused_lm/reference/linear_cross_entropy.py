"""Reference linear cross-entropy: the projection, then cross_entropy.py's loss, with the full
logits materialised (float64 by default; the twin of fused_lm/ops/linear_cross_entropy.py, which
never materialises them). Differentiated by autograd."""

from __future__ import annotations

import torch

from .cross_entropy import cross_entropy


def linear_cross_entropy(input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor, *,
                         linear_bias: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                         reduction: str = "mean", ignore_index: int = -100,
                         label_smoothing: float = 0.0, z_loss: float = 0.0,
                         softcap: float | None = None,
                         dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``cross_entropy(input @ linear_weight.T + linear_bias, target, ...)`` with the full logits
    materialised, in ``dtype``. input (..., H), linear_weight (V, H), linear_bias (V,)."""
    logits = input.to(dtype) @ linear_weight.to(dtype).T
    if linear_bias is not None:
        logits = logits + linear_bias.to(dtype)
    return cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing,
                         z_loss=z_loss, softcap=softcap, dtype=dtype)


__all__ = ["linear_cross_entropy"]
