"""fused_lm.optim.Lion: the Lion optimizer (Chen et al. 2023) on multi-tensor kernels.

    c = b1 * m + (1 - b1) * g;  p = p * (1 - lr * wd) - lr * sign(c);  m = b2 * m + (1 - b2) * g

State: ``step`` (float32 0-d tensor, as torch's optimizers) and ``exp_avg``. Lion's update has a
fixed magnitude ``lr`` per element, so its usual learning rate is 3-10x smaller than AdamW's and
its weight decay 3-10x larger (the paper's advice).
"""

from __future__ import annotations

import torch

from fused_lm.ops import lion as _ops
from fused_lm.optim._base import (_MultiTensorOptimizer, check_constructor, check_lr_betas,
                                   to_scalars)


class Lion(_MultiTensorOptimizer):
    """Lion with param groups, GradScaler support, no host sync; the precision menu and
    ``backend`` as in :class:`fused_lm.optim.AdamW`.

    Drop-in for lion-pytorch's ``Lion(params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0,
    use_triton=False, decoupled_weight_decay=False)``: ``use_triton`` is accepted and ignored
    (the step always runs fused kernels, on the backend chosen as usual: ``backend=`` selects);
    ``decoupled_weight_decay=True`` divides the weight decay by the constructor's ``lr``, as
    lion-pytorch does, so that the decay per step is ``lr / lr_0 * weight_decay`` (independent
    of the lr's scale). torch's keywords (``foreach``, ``fused``, ``capturable``,
    ``differentiable``) are accepted as by :class:`fused_lm.optim.AdamW` and kept in the param
    groups. Complex parameters are refused: a componentwise sign and lion-pytorch's complex
    ``sgn`` differ, so there is no single right answer.
    """

    _SPEC = _ops.SPEC
    _OP = _ops.SPEC.name
    _MOMENTS = ("exp_avg",)
    _KERNELS = {"triton": _ops.lion_triton, "compiled": _ops.lion_compiled,
                "torch": _ops.lion_torch}
    _COMPLEX = False
    _OPTIONS = _MultiTensorOptimizer._OPTIONS + ("_init_lr",)

    def __init__(self, params, lr: float | torch.Tensor = 1e-4, betas=(0.9, 0.99),
                 weight_decay: float = 0.0, use_triton: bool = False,
                 decoupled_weight_decay: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None,
                 backend: str | None = None, master_weights: bool = False,
                 state_dtype: torch.dtype | None = None, stochastic_rounding: bool = False,
                 max_grad_norm: float | None = None, grad_norm_process_group=None):
        del use_triton
        check_constructor(type(self).__name__, lr, betas, weight_decay, foreach=foreach,
                          capturable=capturable, differentiable=differentiable, fused=fused)
        # lion-pytorch's decoupled decay divides by the constructor's lr (one host read, here).
        self._init_lr = float(lr) if decoupled_weight_decay else None
        if decoupled_weight_decay and not self._init_lr > 0.0:
            raise ValueError(f"decoupled_weight_decay=True divides the weight decay by lr, which "
                             f"must then be positive; got lr={lr}")
        defaults = dict(lr=lr, betas=to_scalars(betas), weight_decay=weight_decay,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=bool(decoupled_weight_decay))
        super().__init__(params, defaults, backend=backend, master_weights=master_weights,
                         state_dtype=state_dtype, stochastic_rounding=stochastic_rounding,
                         max_grad_norm=max_grad_norm, grad_norm_process_group=grad_norm_process_group)

    def __setstate__(self, state):
        super().__setstate__(state)
        if not hasattr(self, "_init_lr"):
            self._init_lr = None

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        if group.get("decoupled_weight_decay", False) and not getattr(self, "_init_lr", None):
            raise ValueError("decoupled_weight_decay=True in a param group needs the optimizer "
                             "built with decoupled_weight_decay=True (its lr divides the decay)")

    @staticmethod
    def _validate_hparams(group: dict) -> None:
        check_lr_betas(group["lr"], group["betas"], group["weight_decay"])

    def _hp_row(self, group: dict) -> tuple:
        b1, b2 = group["betas"]
        wd = group["weight_decay"]
        if group.get("decoupled_weight_decay", False):
            wd = wd / self._init_lr
        return (group["lr"], b1, b2, 0.0, wd, group.get("maximize", False))
