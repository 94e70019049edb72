"""multi_tensor_scale_ (x_i *= s, one launch per dtype) on every backend against the reference."""

import pytest
import torch

from fused_lm import _backend
from fused_lm.ops import _multi_tensor as mt
from fused_lm.ops.multi_tensor_scale import multi_tensor_scale_
from fused_lm.reference.multi_tensor_scale import multi_tensor_scale as reference
from tests._helpers import assert_close, backend_devices, randn

# Sizes around the Triton BLOCK (1024) and the CHUNK (16384), plus 0-d, empty and single-element.
SHAPES = [(), (0,), (1,), (3, 5, 7), (1023,), (1025,), (mt.CHUNK + 3,), (2 * mt.CHUNK,)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_matches_reference(backend, device, dtype):
    xs = [randn(*s, dtype=dtype, device=device) for s in SHAPES]
    expected = reference(xs, 0.731)
    multi_tensor_scale_(xs, 0.731, backend=backend)
    for x, e, s in zip(xs, expected, SHAPES):
        assert x.shape == s and x.dtype == dtype
        assert_close(x, e, dtype, what=f"shape {s}")


@pytest.mark.parametrize("backend,device", backend_devices(("cpu", "cuda")))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_rounding_is_bitwise_torch(backend, device, dtype):
    """The C++ storage conversions (csrc/include/fused_lm/dtypes.h) round to nearest even like
    torch, including float16 subnormals, overflow to inf, and NaN."""
    x = torch.cat([randn(5000, device=device) * 3,
                   torch.tensor([6.1e-5, 3e-8, -5.9e-8, 1e-9, 65519.0, 65520.0, 7e4, float("inf"),
                                 float("nan"), 0.0, -0.0], device=device)])
    x16 = x.to(dtype)
    expected = (x16.float() * 1.37).to(dtype)
    multi_tensor_scale_([x16], 1.37, backend=backend)
    same = (x16.view(torch.int16) == expected.view(torch.int16)) | (x16.isnan() & expected.isnan())
    assert bool(same.all()), f"{int((~same).sum())} elements differ from torch's rounding"


@pytest.mark.parametrize("backend,device", backend_devices())
def test_mixed_dtypes_and_tensor_scale(backend, device):
    """Mixed dtypes are bucketed (one launch each); a device tensor scale is read by the kernel."""
    xs = [randn(n, dtype=d, device=device) for n, d in
          [(17, torch.float32), (300, torch.bfloat16), (5, torch.float32), (4097, torch.float16)]]
    s = torch.tensor(-1.7, device=device)
    expected = reference(xs, s)
    multi_tensor_scale_(xs, s, backend=backend)
    for x, e in zip(xs, expected):
        assert_close(x, e, x.dtype)


@pytest.mark.parametrize("backend,device", backend_devices(("triton", "cpu", "cuda")))
def test_every_element_written(backend, device):
    """Every element of every chunk is visited: a skipped tail or chunk would keep its 3.0."""
    xs = [torch.full((n,), 3.0, device=device) for n in (1, 1023, mt.CHUNK + 1, 3 * mt.CHUNK - 7)]
    multi_tensor_scale_(xs, 2.0, backend=backend)
    for x in xs:
        assert bool((x == 6.0).all())


@pytest.mark.parametrize("backend,device", backend_devices(("triton", "cpu", "torch")))
def test_non_contiguous_and_empty_list(backend, device):
    base = randn(8, 6, device=device)
    view = base.t()  # non-contiguous: handled by the torch path, still correct
    expected = reference([view], 2.5)[0]
    multi_tensor_scale_([view], 2.5, backend=backend)
    assert_close(view, expected, torch.float32)
    multi_tensor_scale_([], 2.0, backend=backend)  # nothing to do, no error


def test_many_tensors_one_table():
    """10,000 tensors go through one table (no kernel-argument ceiling)."""
    xs = [torch.randn(int(n)) for n in torch.randint(1, 64, (10_000,))]
    table = mt.build_table([xs])
    assert table.n_tensors == 10_000 and table.n_chunks == 10_000
    backend = _backend.select("multi_tensor_scale", "cpu")
    expected = reference(xs, 0.5)
    multi_tensor_scale_(xs, 0.5, backend=backend)
    for x, e in zip(xs, expected):
        assert_close(x, e, torch.float32)


def test_table_layout_and_chunks():
    xs = [torch.randn(5), torch.randn(0), torch.randn(2 * mt.CHUNK + 1)]
    t = mt.build_table([xs, [x.clone() for x in xs]], groups=[0, 1, 2])
    assert t.table.shape == (3, 4)
    assert t.table[0, 0].item() == xs[0].data_ptr() and t.table[2, 2].item() == 2 * mt.CHUNK + 1
    assert t.table[:, 3].tolist() == [0, 1, 2]
    # the empty tensor has no chunk; the big one has three
    assert t.chunks.tolist() == [[0, 0], [2, 0], [2, mt.CHUNK], [2, 2 * mt.CHUNK]]


def test_table_cache_rebuilds_on_change():
    cache = mt.TableCache()
    xs = [torch.randn(10), torch.randn(20)]
    a = cache.get([xs])
    assert cache.get([xs]) is a
    xs[1] = torch.randn(20)  # new storage: a new table
    assert cache.get([xs]) is not a


@pytest.mark.parametrize("bad,err", [
    (lambda: [torch.randn(3, dtype=torch.complex64)], TypeError),
    (lambda: [torch.arange(3)], TypeError),
    (lambda: [torch.randn(3).to_sparse()], TypeError),
])
def test_bad_input(bad, err):
    with pytest.raises(err):
        multi_tensor_scale_(bad(), 2.0)


def test_bad_scale():
    x = torch.randn(4)
    before = x.clone()
    with pytest.raises(ValueError, match="one-element"):
        multi_tensor_scale_([x], torch.ones(2))
    assert torch.equal(x, before)  # nothing modified


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_gpu_realistic(backend, dtype):
    from bench.lists import gpt2_shapes

    xs = [randn(*s, dtype=dtype, device="cuda") for s in gpt2_shapes()]
    expected = reference(xs, 0.9)
    multi_tensor_scale_(xs, 0.9, backend=backend)
    for x, e in zip(xs, expected):
        assert_close(x, e, dtype)
