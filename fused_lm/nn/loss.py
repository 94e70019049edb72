"""Loss modules: ``CrossEntropyLoss`` and ``LinearCrossEntropyLoss`` (issue 6), thin layers over
fused_lm.nn.functional."""

from __future__ import annotations

import math
from typing import Optional

import torch

from fused_lm.nn import _functional_loss as F


class CrossEntropyLoss(torch.nn.Module):
    """Drop-in for ``torch.nn.CrossEntropyLoss`` (class indices, class dimension last), plus
    ``z_loss`` and ``softcap``. ``weight`` is a registered buffer, as in torch."""

    def __init__(self, weight: Optional[torch.Tensor] = None, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                 softcap: Optional[float] = None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(input, target, self.weight, self.ignore_index, self.reduction,
                               self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}")


class LinearCrossEntropyLoss(torch.nn.Module):
    """The LM head and its loss in one: holds ``weight`` (num_classes, in_features) and an
    optional ``bias``, initialised like ``torch.nn.Linear``; ``forward(input, target)`` returns
    ``cross_entropy(input @ weight.T + bias, target)`` without materialising the logits.
    ``weight`` here is the linear weight; the class weights are ``class_weight`` (a buffer)."""

    def __init__(self, in_features: int, num_classes: int, *, bias: bool = False, device=None,
                 dtype=None, reduction: str = "mean", weight: Optional[torch.Tensor] = None,
                 ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
                 softcap: Optional[float] = None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.num_classes = num_classes
        self.weight = torch.nn.Parameter(torch.empty(num_classes, in_features, **factory))
        self.bias = torch.nn.Parameter(torch.empty(num_classes, **factory)) if bias else None
        self.register_buffer("class_weight", weight)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # torch.nn.Linear's initialisation: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), ..).
        torch.nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            torch.nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.linear_cross_entropy(input, self.weight, target, linear_bias=self.bias,
                                      weight=self.class_weight, reduction=self.reduction,
                                      ignore_index=self.ignore_index,
                                      label_smoothing=self.label_smoothing, z_loss=self.z_loss,
                                      softcap=self.softcap)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, "
                f"bias={self.bias is not None}, reduction={self.reduction!r}, "
                f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
                f"z_loss={self.z_loss}, softcap={self.softcap}")


__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss"]
