"""The accurate Triton tanh (fused_lm/ops/_tl_math.py) against float64, elementwise relative error.

Runs the kernel under the interpreter on CPU tensors (or on CUDA when present): the CE and
attention softcap paths call this function, so its accuracy at small |u| is what makes their fp32
softcapped losses match torch at rtol 1e-6.
"""

import pytest
import torch

from tests._helpers import triton_devices

pytestmark = pytest.mark.skipif(not triton_devices(), reason="needs CUDA or TRITON_INTERPRET=1")


if triton_devices():
    import triton
    import triton.language as tl

    from fused_lm.ops._tl_math import tanh

    @triton.jit
    def _tanh_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        u = tl.load(x_ptr + offs, mask=mask, other=0.0)
        tl.store(y_ptr + offs, tanh(u), mask=mask)


def _run_tanh(x: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(x)
    block = 1024
    _tanh_kernel[(triton.cdiv(x.numel(), block),)](x, y, x.numel(), BLOCK=block)
    return y


def test_tanh_relative_error_every_magnitude():
    device = triton_devices()[0]
    mags = torch.logspace(-30, 1.5, 4001, dtype=torch.float64)        # 1e-30 .. ~31.6
    x64 = torch.cat([mags, -mags, torch.rand(3001, dtype=torch.float64) * 1.3 - 0.65])
    x = x64.to(torch.float32)
    y = _run_tanh(x.to(device)).cpu().double()
    ref = torch.tanh(x.double())
    rel = ((y - ref).abs() / ref.abs()).max().item()
    assert rel <= 2.5e-7, f"max relative error {rel:.3e}"
    # The formula it replaces, 2 sigmoid(2u) - 1, fails this at small |u|.
    old = (2 * torch.sigmoid(2 * x) - 1).double()
    assert ((old - ref).abs() / ref.abs()).max().item() > 1e-3


def test_tanh_special_values():
    device = triton_devices()[0]
    x = torch.tensor([0.0, -0.0, 1e4, -1e4, float("inf"), float("-inf"), float("nan"), 0.625,
                      -0.625, 15.0], dtype=torch.float32)
    y = _run_tanh(x.to(device)).cpu()
    ref = torch.tanh(x)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    ok = ~torch.isnan(ref)
    assert torch.allclose(y[ok], ref[ok], rtol=2.5e-7, atol=0)
