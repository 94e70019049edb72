"""Shared pieces of the optimizer tests: parameter sets, three param groups, runners."""

from __future__ import annotations

import copy

import torch

# The shape mix (0-d, 1 element, odd sizes, a 3-d tensor, a multi-chunk tensor).
FULL_SHAPES = [(), (1,), (1023,), (4097,), (3, 5, 7), (1 << 20,)]
# Cheaper mix for the variant cases; 20000 > CHUNK (16384) still spans two chunks.
SMALL_SHAPES = [(), (1,), (1023,), (4097,), (3, 5, 7), (20000,)]
# The Triton interpreter runs ~1e6 elements/s: a handful of tensors and ~10 steps.
TRITON_SHAPES = [(), (1,), (1023,), (3, 5, 7), (17000,)]


def steps_for(backend: str) -> int:
    return 12 if backend == "triton" else 100


def shapes_for(backend: str, full: bool = False):
    if backend == "triton":
        return TRITON_SHAPES
    return FULL_SHAPES if full else SMALL_SHAPES


def make_params(shapes, dtype=torch.float32, device="cpu"):
    return [torch.randn(s, device=device).to(dtype).requires_grad_(True) for s in shapes]


def clone_params(params, dtype=None):
    return [p.detach().clone().to(dtype or p.dtype).requires_grad_(True) for p in params]


def three_groups(params, **extra):
    """Three groups differing in lr, weight decay and betas (and the defaults)."""
    n = len(params)
    a, b = n // 3, 2 * n // 3
    return [
        dict(params=params[:a], lr=2e-2, weight_decay=0.1, betas=(0.8, 0.95), **extra),
        dict(params=params[a:b], **extra),
        dict(params=params[b:], lr=3e-3, weight_decay=0.0, betas=(0.9, 0.99), **extra),
    ]


def random_grads(params, step: int, dtype=None, scale: float = 1.0):
    """The same fresh gradients for every copy of a parameter list (drawn in float32)."""
    gen = torch.Generator().manual_seed(1000 + step)
    return [(torch.randn(p.shape, generator=gen) * scale).to(dtype or p.dtype).to(p.device)
            for p in params]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone().to(p.dtype)


def deepcopy_state(opt):
    return copy.deepcopy(opt.state_dict())
