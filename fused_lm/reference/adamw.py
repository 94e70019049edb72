"""Reference AdamW update: one tensor at a time, in plain PyTorch, written for clarity.

The twin of the multi-tensor AdamW kernels (fused_lm/ops/adamw.py, csrc/include/fused_lm/adamw.h).
It updates its tensors in place and computes in ``compute_dtype`` (float64 by default: the
reference is more precise than any kernel), then stores back to each tensor's own dtype.

AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization"; torch.optim.AdamW):

    g  = -g if maximize else g                          (g already multiplied by grad_mult)
    p  = p * (1 - lr * wd)                              decoupled weight decay
    m  = m + (1 - b1) * (g - m)                         = lerp(m, g, 1 - b1)
    v  = b2 * v + (1 - b2) * g^2
    bc1 = 1 - b1^t,  bc2 = 1 - b2^t                     t = the step count after the increment
    v_hat = max(v_max, v) if amsgrad else v             (v_max is stored back)
    p  = p - (lr / bc1) * m / (sqrt(v_hat) / sqrt(bc2) + eps)

Master weights: when ``master`` is given, the update is applied to the float32 master copy and the
parameter becomes the master rounded to the parameter dtype (round to nearest even).
"""

from __future__ import annotations

import torch

from .rounding import as_compute


@torch.no_grad()
def adamw_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
               exp_avg_sq: torch.Tensor, step: torch.Tensor | float, *, lr, beta1: float,
               beta2: float, eps: float, weight_decay: float, amsgrad: bool = False,
               max_exp_avg_sq: torch.Tensor | None = None, maximize: bool = False,
               master: torch.Tensor | None = None, grad_mult: float | torch.Tensor = 1.0,
               compute_dtype: torch.dtype = torch.float64) -> None:
    """One AdamW update of one tensor. ``step`` is the count AFTER this step's increment."""
    cd = compute_dtype
    g = grad.to(cd) * as_compute(grad_mult, cd)
    if maximize:
        g = -g
    p = (master if master is not None else param).to(cd)
    m = exp_avg.to(cd)
    v = exp_avg_sq.to(cd)
    t = as_compute(step, cd)
    lr = as_compute(lr, cd)
    p = p * (1 - lr * weight_decay)
    m = m + (1 - beta1) * (g - m)
    v = beta2 * v + (1 - beta2) * g * g
    bc1 = 1 - beta1 ** t
    bc2 = 1 - beta2 ** t
    if amsgrad:
        if max_exp_avg_sq is None:
            raise ValueError("amsgrad=True needs max_exp_avg_sq")
        v_hat = torch.maximum(max_exp_avg_sq.to(cd), v)
        max_exp_avg_sq.copy_(v_hat)
    else:
        v_hat = v
    sqrt_bc2 = bc2 ** 0.5 if not isinstance(bc2, torch.Tensor) else bc2.sqrt()
    p = p - (lr / bc1) * m / (v_hat.sqrt() / sqrt_bc2 + eps)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    if master is not None:
        master.copy_(p)
        param.copy_(master)
    else:
        param.copy_(p)


__all__ = ["adamw_step"]
