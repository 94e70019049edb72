"""Reference of the multi-tensor scale family (fused_lm/ops/multi_tensor_scale.py,
csrc/include/fused_lm/multi_tensor_scale.h): every tensor of a list times one factor."""

from __future__ import annotations

from typing import Sequence

import torch


def multi_tensor_scale(tensors: Sequence[torch.Tensor], scale: float | torch.Tensor,
                       dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """Returns ``[x * scale for x in tensors]`` computed in ``dtype`` (out of place)."""
    s = scale.to(dtype) if isinstance(scale, torch.Tensor) else scale
    return [t.to(dtype) * s for t in tensors]


__all__ = ["multi_tensor_scale"]
