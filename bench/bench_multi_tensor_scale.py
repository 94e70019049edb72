"""Multi-tensor scale (x_i *= s over a list of tensors) against torch._foreach_mul_.

Bytes per call: every element is read once and written once: 2 * numel * itemsize.
Ceiling: in-place read-modify-write bandwidth measured in the same run.
"""

from __future__ import annotations

import math

import torch

from bench.harness import Case, Provider, require_backend, rotating
from bench.lists import describe, tensor_lists
from fused_lm.ops.multi_tensor_scale import multi_tensor_scale_


def _make(shapes, dtype, device):
    return lambda: [torch.randn(s, device=device).to(dtype) for s in shapes]


def cases(device: torch.device, quick: bool) -> list[Case]:
    out = []
    lists = tensor_lists(quick)
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    for label, shapes in lists.items():
        for dtype in dtypes:
            numel = sum(math.prod(s) for s in shapes)
            itemsize = torch.empty((), dtype=dtype).element_size()
            nbytes = 2 * numel * itemsize  # read + write every element
            providers = []
            for backend in ("cuda", "triton", "cpu"):
                providers.append(Provider(f"fused_lm-{backend}", _fused(backend, shapes, dtype, device, nbytes)))
            providers.append(Provider("torch-foreach", _foreach(shapes, dtype, device, nbytes), reference=True))
            providers.append(Provider("torch-eager-loop", _loop(shapes, dtype, device, nbytes)))
            out.append(Case("multi_tensor_scale", "scale", describe(label, shapes),
                            str(dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float32", "fp32"),
                            providers, bytes=nbytes, ceiling="rmw"))
    return out


# Scale factors alternate between s and 1/s so values stay bounded over thousands of calls.
def _fused(backend, shapes, dtype, device, nbytes):
    def setup():
        require_backend(backend, device)
        nxt = rotating(_make(shapes, dtype, device), nbytes // 2, device)
        flip = [1.0001]

        def fn():
            flip[0] = 1.0 / flip[0]
            multi_tensor_scale_(nxt(), flip[0], backend=backend)
        return fn
    return setup


def _foreach(shapes, dtype, device, nbytes):
    def setup():
        nxt = rotating(_make(shapes, dtype, device), nbytes // 2, device)
        flip = [1.0001]

        def fn():
            flip[0] = 1.0 / flip[0]
            torch._foreach_mul_(nxt(), flip[0])
        return fn
    return setup


def _loop(shapes, dtype, device, nbytes):
    def setup():
        nxt = rotating(_make(shapes, dtype, device), nbytes // 2, device)
        flip = [1.0001]

        def fn():
            flip[0] = 1.0 / flip[0]
            for t in nxt():
                t.mul_(flip[0])
        return fn
    return setup


__all__ = ["cases"]
