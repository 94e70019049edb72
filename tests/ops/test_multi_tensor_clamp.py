"""The multi-tensor clamp family (fused_lm/ops/multi_tensor_clamp.py): ``multi_tensor_clamp_``
against the float64 reference (fused_lm/reference/multi_tensor_clamp.py) and against torch's
clamp_min/clamp_max on the same dtype (bit for bit: the bounds are rounded to float32, the result
to the storage dtype, as torch does), on every backend. The clipping API built on it
(fused_lm.clip_grad_value_) is tested in tests/test_clip.py."""

from __future__ import annotations

import pytest
import torch

from fused_lm.ops import _multi_tensor as mt
from fused_lm.ops.multi_tensor_clamp import multi_tensor_clamp_
from fused_lm.reference import multi_tensor_clamp as ref
from tests._helpers import MIXED, assert_close, backend_devices, poison_allocations, randn


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal elementwise, NaN equal to NaN."""
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def _torch_clamp(xs, lo, hi):
    return [x.clamp_min(lo).clamp_max(hi) for x in xs]


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("lo,hi", [(-0.4, 0.7), (-1.0 / 3.0, 1.0 / 3.0), (0.25, 6e4)])
def test_clamp_matches_reference_and_torch(backend, device, lo, hi):
    xs = [randn(*s, dtype=d, device=device) for s, d in MIXED]
    for x in xs:  # non-finite values where there is room: NaN stays NaN, inf is clamped
        if x.numel() > 3:
            x.view(-1)[1] = float("nan")
            x.view(-1)[2] = float("-inf")
            x.view(-1)[-1] = float("inf")
    want_torch = _torch_clamp(xs, lo, hi)
    want = ref.multi_tensor_clamp(xs, lo, hi)
    multi_tensor_clamp_(xs, lo, hi, backend=backend)
    for x, w, wt in zip(xs, want, want_torch):
        assert x.dtype == wt.dtype and x.shape == wt.shape
        assert _same(x, wt), f"differs from torch's clamp_min/clamp_max ({x.dtype}, {tuple(x.shape)})"
        finite = w.isfinite()
        assert (x.cpu().isnan() == w.isnan()).all()
        assert_close(x.cpu().double()[finite], w[finite], x.dtype)


@pytest.mark.parametrize("backend,device", backend_devices(("triton", "cpu", "cuda")))
def test_every_chunk_clamped(backend, device):
    """|x| = 2 everywhere: a chunk or tail left out keeps a 2 where the clamp writes 1."""
    sizes = (1, 1023, mt.CHUNK - 1, mt.CHUNK + 1, 3 * mt.CHUNK - 7)
    xs = [2.0 * (torch.arange(n, device=device) % 2 * 2 - 1).float() for n in sizes]
    with poison_allocations():
        multi_tensor_clamp_(xs, -1.0, 1.0, backend=backend)
    for x, n in zip(xs, sizes):
        assert (x.abs() == 1).all().item(), f"an element of a {n}-element tensor was not clamped"


@pytest.mark.parametrize("backend,device", backend_devices())
def test_lo_above_hi_gives_hi(backend, device):
    """clamp_min then clamp_max, as torch: lo > hi gives hi everywhere (NaN kept)."""
    xs = [randn(33, device=device), randn(mt.CHUNK + 5, dtype=torch.bfloat16, device=device)]
    xs[0][4] = float("nan")
    multi_tensor_clamp_(xs, 0.5, -0.5, backend=backend)
    assert xs[0].isnan().sum().item() == 1
    assert (xs[0][~xs[0].isnan()] == -0.5).all().item() and (xs[1] == -0.5).all().item()


@pytest.mark.parametrize("backend,device", backend_devices())
def test_edge_lists(backend, device):
    multi_tensor_clamp_([], -1.0, 1.0, backend=backend)  # nothing to do, no error
    base = randn(6, 9, device=device, scale=3.0)
    x = base.t()  # non-contiguous: clamped in place through its own strides
    scalar = torch.tensor(-7.0, device=device)
    empty = torch.zeros(0, 4, device=device)
    want = _torch_clamp([x.clone(), scalar.clone()], -1.5, 1.5)
    multi_tensor_clamp_([x, scalar, empty], -1.5, 1.5, backend=backend)
    assert _same(x, want[0]) and _same(scalar, want[1]) and empty.shape == (0, 4)
    assert _same(base, want[0].t())  # the storage itself was written
