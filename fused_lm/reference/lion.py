"""Reference Lion update: one tensor at a time, in plain PyTorch, written for clarity.

The twin of the multi-tensor Lion kernels (fused_lm/ops/lion.py, csrc/include/fused_lm/lion.h).
It updates its tensors in place and computes in ``compute_dtype`` (float64 by default), then
stores back to each tensor's own dtype.

Lion (Chen et al., "Symbolic Discovery of Optimization Algorithms", 2023):

    c  = b1 * m + (1 - b1) * g
    p  = p * (1 - lr * wd) - lr * sign(c)
    m  = b2 * m + (1 - b2) * g

Master weights: when ``master`` is given, the update is applied to the float32 master copy and the
parameter becomes the master rounded to the parameter dtype (round to nearest even).
"""

from __future__ import annotations

import torch

from .rounding import as_compute


@torch.no_grad()
def lion_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, *, lr, beta1: float,
              beta2: float, weight_decay: float, maximize: bool = False,
              master: torch.Tensor | None = None, grad_mult: float | torch.Tensor = 1.0,
              compute_dtype: torch.dtype = torch.float64) -> None:
    """One Lion update of one tensor (no bias correction: the step count is not used)."""
    cd = compute_dtype
    g = grad.to(cd) * as_compute(grad_mult, cd)
    if maximize:
        g = -g
    p = (master if master is not None else param).to(cd)
    m = exp_avg.to(cd)
    lr = as_compute(lr, cd)
    c = beta1 * m + (1 - beta1) * g
    p = p * (1 - lr * weight_decay) - lr * torch.sign(c)
    m = beta2 * m + (1 - beta2) * g
    exp_avg.copy_(m)
    if master is not None:
        master.copy_(p)
        param.copy_(master)
    else:
        param.copy_(p)


__all__ = ["lion_step"]
