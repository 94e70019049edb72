"""Reference for the multi-tensor elementwise ops."""

from __future__ import annotations

from typing import Sequence

import torch


def multi_tensor_scale(tensors: Sequence[torch.Tensor], scale: float | torch.Tensor,
                       dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """Returns ``[x * scale for x in tensors]`` computed in ``dtype`` (out of place)."""
    s = scale.to(dtype) if isinstance(scale, torch.Tensor) else scale
    return [t.to(dtype) * s for t in tensors]
