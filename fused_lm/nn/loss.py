"""Loss modules: ``CrossEntropyLoss`` and ``LinearCrossEntropyLoss`` (issues 6, 12), thin layers
over fused_lm.nn.functional with torch 2.13's constructors, attributes and state_dict keys, so a
checkpoint saved from the torch module loads into ours and the reverse.

Both subclass torch's ``_WeightedLoss`` (as torch's do): the class weights are the buffer
``weight`` (absent from the state_dict when None) and ``size_average``/``reduce`` map to
``reduction`` as in torch.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch.nn.modules.loss import _WeightedLoss

from fused_lm.nn import _functional_loss as F


class CrossEntropyLoss(_WeightedLoss):
    """Drop-in for ``torch.nn.CrossEntropyLoss`` (class indices or probabilities, class
    dimension last), plus the keyword options ``z_loss`` and ``softcap``."""

    __constants__ = ["ignore_index", "reduction", "label_smoothing", "z_loss", "softcap"]

    def __init__(self, weight: Optional[torch.Tensor] = None, size_average=None,
                 ignore_index: int = -100, reduce=None, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                 softcap: Optional[float] = None) -> None:
        super().__init__(weight, size_average, reduce, reduction)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing,
                               z_loss=self.z_loss, softcap=self.softcap)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}")


class LinearCrossEntropyLoss(_WeightedLoss):
    """Drop-in for torch 2.13's ``torch.nn.LinearCrossEntropyLoss``: the LM head and its loss in
    one, ``forward(input, target) = cross_entropy(self.linear(input), target)`` computed in chunks
    so the logits never exist in full.

    Same layout as torch: the head is the submodule ``linear`` (``torch.nn.Linear(in_features,
    num_classes * prod(out_features))``, initialised as nn.Linear is), so the state_dict keys are
    ``linear.weight``, ``linear.bias`` (when ``bias=True``) and ``weight`` (the class weights,
    when given). ``ignore_index=None`` is torch's default and means -100 for class indices.
    ``options`` (a ``torch.nn.LinearCrossEntropyOptions``; not needed, and absent in torch 2.11)
    only lends its ``batch_chunk_size``: this module is always chunked. Plus ``z_loss`` and
    ``softcap``. The loss is float32 for every dtype."""

    __constants__ = ["num_classes", "out_features", "reduction", "ignore_index", "label_smoothing",
                     "z_loss", "softcap"]

    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple[int, ...] = (),
                 bias: bool = False, device=None, dtype=None, reduction: str = "mean",
                 weight: Optional[torch.Tensor] = None, ignore_index: Optional[int] = None,
                 label_smoothing: float = 0.0, options=None, z_loss: float = 0.0,
                 softcap: Optional[float] = None) -> None:
        if weight is not None and tuple(weight.shape) != (num_classes,):
            raise ValueError(f"weight has shape {tuple(weight.shape)}: expected ({num_classes},), "
                             f"one weight per class")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing={label_smoothing}: expected a value in [0, 1]")
        super().__init__(weight=weight, reduction=reduction)
        self.num_classes = num_classes
        self.out_features = tuple(out_features)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.linear = torch.nn.Linear(in_features, math.prod(self.out_features, start=num_classes),
                                      bias=bias, device=device, dtype=dtype)
        self.options = options
        self.z_loss = z_loss
        self.softcap = softcap

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation of the head (kaiming_uniform(a=sqrt(5)) and its bias rule)."""
        self.linear.reset_parameters()

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        linear_weight = self.linear.weight.reshape(
            (self.num_classes, *self.out_features, self.linear.in_features))
        linear_bias = (None if self.linear.bias is None
                       else self.linear.bias.reshape((self.num_classes, *self.out_features)))
        return F.linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias,
                                      weight=self.weight, reduction=self.reduction,
                                      ignore_index=self.ignore_index,
                                      label_smoothing=self.label_smoothing, options=self.options,
                                      z_loss=self.z_loss, softcap=self.softcap)

    def extra_repr(self) -> str:
        return (f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
                f"out_features={self.out_features}, bias={self.linear.bias is not None}, "
                f"reduction={self.reduction}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, options={self.options}, "
                f"z_loss={self.z_loss}, softcap={self.softcap}")


__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss"]
