"""Reference optimizer updates: one tensor at a time, in plain PyTorch, written for clarity.

These are the twins of the multi-tensor AdamW and Lion kernels (fused_lm/ops/adamw.py,
fused_lm/ops/lion.py, csrc/include/fused_lm/adamw.h, lion.h). Every function updates its tensors
in place and computes in ``compute_dtype`` (float64 by default: the reference is more precise than
any kernel), then stores back to each tensor's own dtype.

AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization"; torch.optim.AdamW):

    g  = -g if maximize else g                          (g already multiplied by grad_mult)
    p  = p * (1 - lr * wd)                              decoupled weight decay
    m  = m + (1 - b1) * (g - m)                         = lerp(m, g, 1 - b1)
    v  = b2 * v + (1 - b2) * g^2
    bc1 = 1 - b1^t,  bc2 = 1 - b2^t                     t = the step count after the increment
    v_hat = max(v_max, v) if amsgrad else v             (v_max is stored back)
    p  = p - (lr / bc1) * m / (sqrt(v_hat) / sqrt(bc2) + eps)

Lion (Chen et al., "Symbolic Discovery of Optimization Algorithms", 2023):

    c  = b1 * m + (1 - b1) * g
    p  = p * (1 - lr * wd) - lr * sign(c)
    m  = b2 * m + (1 - b2) * g

Master weights: when ``master`` is given, the update is applied to the float32 master copy and the
parameter becomes the master rounded to the parameter dtype (round to nearest even).
"""

from __future__ import annotations

import torch


def _value(x, dtype):
    return x.to(dtype) if isinstance(x, torch.Tensor) else x


@torch.no_grad()
def adamw_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
               exp_avg_sq: torch.Tensor, step: torch.Tensor | float, *, lr, beta1: float,
               beta2: float, eps: float, weight_decay: float, amsgrad: bool = False,
               max_exp_avg_sq: torch.Tensor | None = None, maximize: bool = False,
               master: torch.Tensor | None = None, grad_mult: float | torch.Tensor = 1.0,
               compute_dtype: torch.dtype = torch.float64) -> None:
    """One AdamW update of one tensor. ``step`` is the count AFTER this step's increment."""
    cd = compute_dtype
    g = grad.to(cd) * _value(grad_mult, cd)
    if maximize:
        g = -g
    p = (master if master is not None else param).to(cd)
    m = exp_avg.to(cd)
    v = exp_avg_sq.to(cd)
    t = _value(step, cd)
    lr = _value(lr, cd)
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


@torch.no_grad()
def lion_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, *, lr, beta1: float,
              beta2: float, weight_decay: float, maximize: bool = False,
              master: torch.Tensor | None = None, grad_mult: float | torch.Tensor = 1.0,
              compute_dtype: torch.dtype = torch.float64) -> None:
    """One Lion update of one tensor (no bias correction: the step count is not used)."""
    cd = compute_dtype
    g = grad.to(cd) * _value(grad_mult, cd)
    if maximize:
        g = -g
    p = (master if master is not None else param).to(cd)
    m = exp_avg.to(cd)
    lr = _value(lr, cd)
    c = beta1 * m + (1 - beta1) * g
    p = p * (1 - lr * weight_decay) - lr * torch.sign(c)
    m = beta2 * m + (1 - beta2) * g
    exp_avg.copy_(m)
    if master is not None:
        master.copy_(p)
        param.copy_(master)
    else:
        param.copy_(p)


def stochastic_round_bf16(x: torch.Tensor, random_bits: torch.Tensor) -> torch.Tensor:
    """Rounds float32 ``x`` to bfloat16 stochastically: adds the low 16 random bits to the float32
    bit pattern and truncates, so x rounds up with probability (x - down) / (up - down) and
    E[round(x)] = x. Non-finite values round to nearest. ``random_bits``: int64, same shape."""
    bits = x.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    out = ((bits + (random_bits & 0xFFFF)) & 0xFFFF0000)
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32).view(torch.float32)
    return torch.where(torch.isfinite(x), out, x.float()).to(torch.bfloat16)
