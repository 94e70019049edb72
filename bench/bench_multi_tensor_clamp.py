"""Multi-tensor clamp (x_i = min(max(x_i, lo), hi) over a list of tensors, the kernel of
clip_grad_value_) against what torch's clip_grad_value_ runs: torch._foreach_clamp_min_ then
torch._foreach_clamp_max_ (the reference), and a per-tensor clamp_ loop.

Bytes per call: the least traffic, every element read once and written once: 2 * numel * itemsize
(torch's two foreach passes move twice that). Ceiling: in-place read-modify-write bandwidth
measured in the same run. The bounds are [-0.5, 0.5] on standard-normal values: the first call
clamps about 62% of the elements, later calls rewrite the same values (same traffic, no branch).
Lists: bench/lists.py (GPT-2 124M and 10,000 tiny tensors; quick: GPT-2/16 and 500).
"""

from __future__ import annotations

import math

import torch

from bench.harness import Case, Provider, require_backend, rotating
from bench.lists import describe, tensor_lists
from fused_lm.ops.multi_tensor_clamp import multi_tensor_clamp_

LO, HI = -0.5, 0.5


def cases(device: torch.device, quick: bool) -> list[Case]:
    out = []
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    for label, shapes in tensor_lists(quick).items():
        for dtype in dtypes:
            numel = sum(math.prod(s) for s in shapes)
            nbytes = 2 * numel * dtype.itemsize  # read + write every element once
            providers = [Provider(f"fused_lm-{b}", _fused(b, shapes, dtype, device, nbytes))
                         for b in ("cuda", "triton", "cpu")]
            providers.append(Provider("torch-foreach", _foreach(shapes, dtype, device, nbytes), reference=True))
            providers.append(Provider("torch-eager-loop", _loop(shapes, dtype, device, nbytes)))
            out.append(Case("multi_tensor_clamp", "clamp", describe(label, shapes),
                            {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype],
                            providers, bytes=nbytes, ceiling="rmw"))
    return out


def _inputs(shapes, dtype, device, nbytes):
    make = lambda: [torch.randn(s, device=device).to(dtype) for s in shapes]  # noqa: E731
    return rotating(make, nbytes // 2, device)


def _fused(backend, shapes, dtype, device, nbytes):
    def setup():
        require_backend(backend, device)
        nxt = _inputs(shapes, dtype, device, nbytes)
        return lambda: multi_tensor_clamp_(nxt(), LO, HI, backend=backend)
    return setup


def _foreach(shapes, dtype, device, nbytes):
    def setup():
        nxt = _inputs(shapes, dtype, device, nbytes)

        def fn():
            xs = nxt()
            torch._foreach_clamp_min_(xs, LO)
            torch._foreach_clamp_max_(xs, HI)
        return fn
    return setup


def _loop(shapes, dtype, device, nbytes):
    def setup():
        nxt = _inputs(shapes, dtype, device, nbytes)

        def fn():
            for t in nxt():
                t.clamp_(LO, HI)
        return fn
    return setup


__all__ = ["cases"]
