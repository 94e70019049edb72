"""Functional losses: ``cross_entropy`` and ``linear_cross_entropy`` (issues 6, 12).

Signatures are torch 2.13's ``torch.nn.functional.cross_entropy`` (including the deprecated
``size_average`` / ``reduce``, so positional calls bind as in torch) and
``torch.nn.functional.linear_cross_entropy`` (``ignore_index=None``: -100 for class indices;
``options``), plus the keyword options ``z_loss`` (PaLM: adds z_loss * lse**2 per token) and
``softcap`` (Gemma 2: softcap * tanh(logits / softcap) before the softmax).

Differences from torch (README "Losses"): for ``cross_entropy`` the class dimension is the last
one ((N, V) or (B, T, V)); the loss is returned in float32 for every input dtype (it is computed
in float32); ``linear_cross_entropy`` is always chunked (``options`` only lends its
``batch_chunk_size``) and also takes (B, T, H) input.
"""

from __future__ import annotations

from typing import Optional

import torch

from fused_lm.ops import cross_entropy as _ce
from fused_lm.ops import linear_cross_entropy as _lce


def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                  size_average: Optional[bool] = None, ignore_index: int = -100,
                  reduce: Optional[bool] = None, reduction: str = "mean",
                  label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                  softcap: Optional[float] = None) -> torch.Tensor:
    """Cross-entropy between logits ``input`` (N, V) or (B, T, V) and class indices ``target``
    (N,) or (B, T), with torch's semantics for ``weight``, ``ignore_index``, ``reduction`` and
    ``label_smoothing`` (``size_average``/``reduce``: torch's deprecated spelling of
    ``reduction``, translated as torch does). On GPUs the gradient is computed in the forward
    pass (one fused kernel) and backward only scales it; on CPU tensors it routes to torch's
    ``F.cross_entropy``. Probability targets (floating, shaped like ``input``) go to torch.
    Returns float32."""
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    return _ce.cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                             z_loss=z_loss, softcap=softcap)


def linear_cross_entropy(input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor, *,
                         linear_bias: Optional[torch.Tensor] = None,
                         weight: Optional[torch.Tensor] = None, reduction: str = "mean",
                         ignore_index: Optional[int] = None, label_smoothing: float = 0.0,
                         options=None, z_loss: float = 0.0,
                         softcap: Optional[float] = None) -> torch.Tensor:
    """``cross_entropy(linear(input, linear_weight, linear_bias), target, ...)`` without ever
    holding the full logits: tokens are processed in chunks sized from a memory budget (or
    ``options.batch_chunk_size``). input (N, H) or (B, T, H), linear_weight (V, H) (or
    (V, d1..dK, H) for a K-dimensional loss, materialised as in torch), linear_bias (V,).
    ``ignore_index=None`` is torch's default: -100 for class indices. Returns float32."""
    return _lce.linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias,
                                     weight=weight, reduction=reduction, ignore_index=ignore_index,
                                     label_smoothing=label_smoothing, options=options,
                                     z_loss=z_loss, softcap=softcap)


__all__ = ["cross_entropy", "linear_cross_entropy"]
