"""Reference of the multi-tensor clamp family: gradients clamped elementwise, in float64 (the twin
of fused_lm/ops/multi_tensor_clamp.py, csrc/include/fused_lm/multi_tensor_clamp.h, and of
fused_lm.clip_grad_value_ built on it).

    g_clamped = min(max(g, -clip_value), clip_value)      (clamp_min, then clamp_max: NaN kept)
"""

from __future__ import annotations

from typing import Sequence

import torch


def clip_grad_value(grads: Sequence[torch.Tensor], clip_value: float,
                    dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """Copies of ``grads`` clamped to [-clip_value, clip_value] (clamp_min then clamp_max)."""
    c = float(clip_value)
    return [g.detach().to("cpu", dtype).clamp_min(-c).clamp_max(c) for g in grads]


__all__ = ["clip_grad_value"]
