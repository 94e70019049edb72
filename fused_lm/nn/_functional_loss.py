"""Functional losses: ``cross_entropy`` and ``linear_cross_entropy`` (issue 6).

Signatures mirror torch 2.13's ``torch.nn.functional.cross_entropy`` and
``linear_cross_entropy``, plus the keyword options ``z_loss`` (PaLM: adds z_loss * lse**2 per
token) and ``softcap`` (Gemma 2: softcap * tanh(logits / softcap) before the softmax).
Differences from torch: the class dimension is the last one ((N, V) or (B, T, V)), and the loss
is returned in float32 for every input dtype (it is computed in float32).
"""

from __future__ import annotations

from typing import Optional

import torch

from fused_lm.ops import cross_entropy as _ce
from fused_lm.ops import linear_cross_entropy as _lce


def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                  ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                  *, z_loss: float = 0.0, softcap: Optional[float] = None) -> torch.Tensor:
    """Cross-entropy between logits ``input`` (N, V) or (B, T, V) and class indices ``target``
    (N,) or (B, T), with torch's semantics for ``weight``, ``ignore_index``, ``reduction`` and
    ``label_smoothing``. The gradient is computed in the forward pass (one fused kernel) and
    backward only scales it. Probability targets (floating, shaped like ``input``) fall back to
    torch. Returns float32."""
    return _ce.cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                             z_loss=z_loss, softcap=softcap)


def linear_cross_entropy(input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor, *,
                         linear_bias: Optional[torch.Tensor] = None,
                         weight: Optional[torch.Tensor] = None, reduction: str = "mean",
                         ignore_index: int = -100, label_smoothing: float = 0.0,
                         z_loss: float = 0.0, softcap: Optional[float] = None) -> torch.Tensor:
    """``cross_entropy(input @ linear_weight.T + linear_bias, target, ...)`` without ever holding
    the full logits: tokens are processed in chunks sized from a memory budget. input (N, H) or
    (B, T, H), linear_weight (V, H), linear_bias (V,). Returns float32."""
    return _lce.linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias,
                                     weight=weight, reduction=reduction, ignore_index=ignore_index,
                                     label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)


__all__ = ["cross_entropy", "linear_cross_entropy"]
