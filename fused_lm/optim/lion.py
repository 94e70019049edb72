"""fused_lm.optim.Lion: the Lion optimizer (Chen et al. 2023) on multi-tensor kernels.

    c = b1 * m + (1 - b1) * g;  p = p * (1 - lr * wd) - lr * sign(c);  m = b2 * m + (1 - b2) * g

State: ``step`` (float32 0-d tensor, as torch's optimizers) and ``exp_avg``. Lion's update has a
fixed magnitude ``lr`` per element, so its usual learning rate is 3-10x smaller than AdamW's and
its weight decay 3-10x larger (the paper's advice).
"""

from __future__ import annotations

import torch

from fused_lm.ops import lion as _ops
from fused_lm.optim._base import _MultiTensorOptimizer, check_lr_betas


class Lion(_MultiTensorOptimizer):
    """Lion with param groups, GradScaler support, no host sync; the precision menu and
    ``backend`` as in :class:`fused_lm.optim.AdamW`."""

    _OP = "lion"
    _MOMENTS = ("exp_avg",)
    _KERNELS = {"triton": _ops.lion_triton, "compiled": _ops.lion_compiled,
                "torch": _ops.lion_torch}

    def __init__(self, params, lr: float | torch.Tensor = 1e-4, betas=(0.9, 0.99),
                 weight_decay: float = 0.0, *, maximize: bool = False,
                 backend: str | None = None, master_weights: bool = False,
                 state_dtype: torch.dtype | None = None, stochastic_rounding: bool = False,
                 max_grad_norm: float | None = None, grad_norm_process_group=None):
        check_lr_betas(lr, betas, weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                        maximize=bool(maximize))
        super().__init__(params, defaults, backend=backend, master_weights=master_weights,
                         state_dtype=state_dtype, stochastic_rounding=stochastic_rounding,
                         max_grad_norm=max_grad_norm, grad_norm_process_group=grad_norm_process_group)

    @staticmethod
    def _validate_hparams(group: dict) -> None:
        check_lr_betas(group["lr"], group["betas"], group["weight_decay"])

    def _hp_row(self, group: dict) -> tuple:
        b1, b2 = group["betas"]
        return (group["lr"], b1, b2, 0.0, group["weight_decay"], group.get("maximize", False))
