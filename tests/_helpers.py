"""Shared test helpers: devices, the one tolerance table, relative-error checks, NaN poisoning.

Import as ``from tests._helpers import ...``.
"""

from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch

SEED = int(os.environ.get("FUSED_LM_TEST_SEED", "1234"))
HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])

# FUSED_LM_REQUIRE_CUDA_EXT=1 (set by `make gpu-check` on the GPU machine): a CUDA-backend test
# that cannot run (no GPU, or fused_lm._C_cuda missing after the build) FAILS instead of skipping,
# so a broken build cannot look green. tests/conftest.py turns the marker below into the failure.
REQUIRE_CUDA_EXT = os.environ.get("FUSED_LM_REQUIRE_CUDA_EXT", "0") not in ("", "0")


def _cuda_unavailable(reason: str):
    """The mark for a CUDA test that cannot run here: skip, or fail under REQUIRE_CUDA_EXT."""
    if REQUIRE_CUDA_EXT:
        return pytest.mark.required_but_unavailable(reason=reason)
    return pytest.mark.skip(reason=reason)


requires_cuda = (pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA") if not REQUIRE_CUDA_EXT
                 else pytest.mark.required_but_unavailable(reason="needs CUDA") if not HAS_CUDA
                 else pytest.mark.usefixtures())

# The one tolerance table: the largest norm-wise relative error ||actual - expected|| / ||expected||
# accepted against a float64 reference, by the dtype the kernel computes in or stores to.
# float32: a few ulps of accumulated rounding (2^-23 ~ 1.2e-7) over reductions of ~1e5 terms.
# bfloat16 (8-bit mantissa, ulp/2 = 2^-9 ~ 2e-3) and float16 (11 bits, 2^-12 ~ 2.4e-4): storage
# rounding of inputs and outputs, with headroom for a few rounding steps.
TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.bfloat16: 1.6e-2,
    torch.float16: 2e-3,
}


def tol(dtype: torch.dtype, scale: float = 1.0) -> float:
    return TOL[dtype] * scale


def norm_tol(p: float) -> float:
    """The ``scale`` for float32 p-norms: general p runs through 2^(p log2|x|), a few float32 ulps
    per term (Triton's GPU exp2/log2 are the approximate PTX instructions)."""
    return 1.0 if p in (1.0, 2.0, math.inf, -math.inf, 0.0) else 20.0


# A tensor list for the multi-tensor ops (norm, clamp, clip): sizes around the Triton BLOCK (1024),
# the CUDA block (256 x 4) and the CHUNK (16384 elements, fused_lm/ops/_multi_tensor.py); 0-d,
# empty, single element; three dtypes in one list (one launch per dtype). (shape, dtype) pairs.
CHUNK = 16384  # = fused_lm.ops._multi_tensor.CHUNK (tests/ops/test_multi_tensor.py checks)
MIXED = [((3, 5), torch.float32), ((CHUNK + 3,), torch.bfloat16), ((), torch.float32),
         ((0,), torch.float32), ((17,), torch.float16), ((1,), torch.bfloat16), ((1025,), torch.float32),
         ((2, 0, 3), torch.float16), ((4097,), torch.float16)]


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error in float64; exact zeros compare by absolute error."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if a.shape != e.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    if a.numel() == 0:
        return 0.0
    both_nan = torch.isnan(a) & torch.isnan(e)
    if (torch.isnan(a) != torch.isnan(e)).any():
        raise AssertionError(f"NaN pattern differs: {int(torch.isnan(a).sum())} NaN in actual, "
                             f"{int(torch.isnan(e).sum())} in expected")
    a, e = a.masked_fill(both_nan, 0), e.masked_fill(both_nan, 0)
    inf = torch.isinf(e)
    if (a[inf] != e[inf]).any() or torch.isinf(a[~inf]).any():
        raise AssertionError("infinities differ")
    a, e = a.masked_fill(inf, 0), e.masked_fill(inf, 0)
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 scale: float = 1.0, what: str = "") -> None:
    """Asserts ``rel_error(actual, expected) <= TOL[dtype] * scale`` (dtype defaults to actual's)."""
    dtype = dtype or actual.dtype
    err = rel_error(actual, expected)
    limit = tol(dtype, scale)
    assert err <= limit, f"{what + ': ' if what else ''}relative error {err:.3e} > {limit:.1e} ({dtype})"


def triton_devices() -> list[str]:
    """Devices on which Triton kernels run in this process: CUDA, or CPU under the interpreter."""
    from fused_lm import _backend

    out = []
    if _backend.interpreter_on():
        out.append("cpu")
    elif HAS_CUDA:
        out.append("cuda")
    return out


def backend_devices(backends=("triton", "cpu", "cuda", "torch")) -> list[pytest.param]:
    """(backend, device) pairs available in this process, as pytest params; unavailable pairs are
    kept as skipped params that say why, so a run shows what it did not test."""
    from fused_lm import _backend

    params = []
    for backend in backends:
        for device in ("cpu", "cuda"):
            if backend == "cpu" and device == "cuda" or backend == "cuda" and device == "cpu":
                continue
            if device == "cuda" and not HAS_CUDA:
                reason = "needs CUDA"
            else:
                reason = _backend.unavailable_reason(backend, torch.device(device))
            if not reason:
                marks = []
            elif device == "cuda":
                marks = [_cuda_unavailable(reason)]
            else:
                marks = [pytest.mark.skip(reason=reason)]
            params.append(pytest.param(backend, device, id=f"{backend}-{device}", marks=marks))
    return params


@contextlib.contextmanager
def poison_allocations():
    """Within the block, torch.empty / empty_like / empty_strided / new_empty return NaN-filled
    floating tensors, so an output element a kernel forgets to write shows up as NaN."""
    originals = {name: getattr(torch, name) for name in ("empty", "empty_like", "empty_strided")}
    new_empty = torch.Tensor.new_empty

    def poisoned(fn):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            if out.is_floating_point() or out.is_complex():
                out.fill_(float("nan"))
            return out
        return wrapper

    try:
        for name, fn in originals.items():
            setattr(torch, name, poisoned(fn))
        torch.Tensor.new_empty = poisoned(new_empty)
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)
        torch.Tensor.new_empty = new_empty


def randn(*shape: int, dtype=torch.float32, device="cpu", scale: float = 1.0) -> torch.Tensor:
    """Fresh random normal values (never zeros), drawn in float32 then cast."""
    return (torch.randn(shape, device=device) * scale).to(dtype)
