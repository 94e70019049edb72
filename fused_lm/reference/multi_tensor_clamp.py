"""Reference of the multi-tensor clamp family: gradients clamped elementwise, in float64 (the twin
of fused_lm/ops/multi_tensor_clamp.py, csrc/include/fused_lm/multi_tensor_clamp.h, and of
fused_lm.clip_grad_value_ built on it).

    x_clamped = min(max(x, lo), hi)      (clamp_min, then clamp_max: lo > hi gives hi; NaN kept)
    clip_grad_value: lo = -clip_value, hi = clip_value
"""

from __future__ import annotations

from typing import Sequence

import torch


def multi_tensor_clamp(tensors: Sequence[torch.Tensor], lo: float, hi: float,
                       dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """Copies of ``tensors`` in ``dtype`` clamped to [lo, hi] (clamp_min then clamp_max)."""
    return [t.detach().to("cpu", dtype).clamp_min(float(lo)).clamp_max(float(hi)) for t in tensors]


def clip_grad_value(grads: Sequence[torch.Tensor], clip_value: float,
                    dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """Copies of ``grads`` clamped to [-clip_value, clip_value] (clamp_min then clamp_max)."""
    c = float(clip_value)
    return multi_tensor_clamp(grads, -c, c, dtype)


__all__ = ["clip_grad_value", "multi_tensor_clamp"]
