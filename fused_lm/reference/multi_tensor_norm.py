"""Reference of the multi-tensor norm family: the global norm of a list of tensors, the clipping
coefficient and the clipped gradients, in float64 (the twin of fused_lm/ops/multi_tensor_norm.py,
csrc/include/fused_lm/multi_tensor_norm.h, and of fused_lm.clip_grad_norm_ built on it).

Written from the definitions, not from torch.nn.utils, so tests compare both fused_lm and torch
against the same math:

    ||g||_p   = (sum_i sum_j |g_ij|^p)^(1/p)   (inf: max |g_ij|, -inf: min |g_ij|)
    coef      = min(max_norm / (||g||_p + 1e-6), 1)
    g_clipped = g * coef
    norm_type = 0 (not a norm): torch composes per-tensor norms, vector_norm(stack(counts), 0),
                i.e. the number of tensors with a non-zero element; the twin does the same.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def total_norm(tensors: Sequence[torch.Tensor], norm_type: float = 2.0,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The p-norm of every element of ``tensors`` viewed as one vector (0-d, ``dtype``, CPU).
    No elements at all: 0 for p > 0 and inf, inf for p < 0 and -inf (the empty sum/min)."""
    p = float(norm_type)
    flat = [t.detach().reshape(-1).to("cpu", dtype) for t in tensors]
    if p == 0.0:
        return torch.tensor(float(sum(bool((f != 0).any()) for f in flat)), dtype=dtype)
    x = torch.cat(flat) if flat else torch.zeros(0, dtype=dtype)
    if x.numel() == 0:
        return torch.tensor(0.0 if p > 0 else math.inf, dtype=dtype)
    a = x.abs()
    if p in (math.inf, -math.inf):
        if a.isnan().any():  # max/min propagate NaN
            return torch.tensor(math.nan, dtype=dtype)
        return a.max() if p > 0 else a.min()
    return a.pow(p).sum().pow(1.0 / p)


def clip_coefficient(norm: torch.Tensor | float, max_norm: float) -> torch.Tensor:
    """min(max_norm / (norm + 1e-6), 1), NaN kept."""
    norm = torch.as_tensor(norm, dtype=torch.float64)
    coef = max_norm / (norm + 1e-6)
    return torch.where(coef > 1, torch.ones_like(coef), coef)


def clip_grad_norm(grads: Sequence[torch.Tensor], max_norm: float, norm_type: float = 2.0,
                   dtype: torch.dtype = torch.float64) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(clipped copies of ``grads`` in ``dtype``, total norm before clipping)."""
    norm = total_norm(grads, norm_type, dtype)
    coef = clip_coefficient(norm, max_norm).to(dtype)
    return [g.detach().to("cpu", dtype) * coef for g in grads], norm


__all__ = ["clip_coefficient", "clip_grad_norm", "total_norm"]
