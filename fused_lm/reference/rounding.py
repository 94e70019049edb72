"""Rounding shared by the optimizer references (adamw.py, lion.py) and their tests: the
stochastic rounding to bfloat16 the kernels use for 16-bit parameters without master weights."""

from __future__ import annotations

import torch


def as_compute(x, dtype):
    """A tensor hyper-parameter (lr, step, grad_mult) in the compute dtype; numbers as they are."""
    return x.to(dtype) if isinstance(x, torch.Tensor) else x


def stochastic_round_bf16(x: torch.Tensor, random_bits: torch.Tensor) -> torch.Tensor:
    """Rounds float32 ``x`` to bfloat16 stochastically: adds the low 16 random bits to the float32
    bit pattern and truncates, so x rounds up with probability (x - down) / (up - down) and
    E[round(x)] = x. Non-finite values round to nearest. ``random_bits``: int64, same shape."""
    bits = x.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    out = ((bits + (random_bits & 0xFFFF)) & 0xFFFF0000)
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32).view(torch.float32)
    return torch.where(torch.isfinite(x), out, x.float()).to(torch.bfloat16)


__all__ = ["as_compute", "stochastic_round_bf16"]
