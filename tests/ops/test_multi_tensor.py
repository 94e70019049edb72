"""The host fast path of the multi-tensor norm / scale / clamp ops (ops/_multi_tensor.py
``tensor_info``, ``dtype_buckets``, ``TableCache``): the C++ helper equals its Python twin,
reallocated tensors are picked up, mixed dtypes and layouts are bucketed correctly, bad tensors
raise the same errors with and without the extension."""

import math

import numpy as np
import pytest
import torch

from fused_lm import _ext
from fused_lm.ops import _multi_tensor as mt
from fused_lm.ops.multi_tensor_clamp import multi_tensor_clamp_
from fused_lm.ops.multi_tensor_norm import multi_tensor_norm
from fused_lm.ops.multi_tensor_scale import multi_tensor_scale_
from fused_lm.reference.multi_tensor_clamp import clip_grad_value as ref_clamp
from fused_lm.reference.multi_tensor_norm import total_norm as ref_norm
from fused_lm.reference.multi_tensor_scale import multi_tensor_scale as ref_scale
from tests._helpers import CHUNK, MIXED, assert_close, backend_devices, randn

# |x|^p = 2^(p log2|x|) under the interpreter: numpy warns on log2(0) (the result is the intended one).
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")

requires_ext = pytest.mark.skipif(not _ext.has_cpu(), reason="needs the CPU extension")


def _mixed(device="cpu", f64=torch.float64):
    """fp32 / bf16 / fp16 / ``f64`` interleaved, with empty, 0-d and non-contiguous tensors."""
    return [randn(3, 5, device=device), randn(7, dtype=torch.bfloat16, device=device),
            randn(0, device=device), randn(mt.CHUNK + 5, dtype=torch.float16, device=device),
            randn(4, 6, device=device).t(), randn(2, dtype=f64, device=device),
            randn(dtype=torch.bfloat16, device=device), randn(1025, device=device),
            randn(5, 4, dtype=torch.bfloat16, device=device)[:, ::2]]


@pytest.fixture(params=["native", "python"])
def path(request, monkeypatch):
    """Runs a test with the C++ helper and with its Python twin (as without the extension)."""
    if request.param == "native":
        if not _ext.has_cpu():
            pytest.skip("needs the CPU extension")
        monkeypatch.setattr(mt, "_native_info", None)
    else:
        monkeypatch.setattr(mt, "_native_info", False)
    return request.param


@requires_ext
def test_native_info_equals_python_twin():
    xs = _mixed() + [torch.nn.Parameter(randn(4))]
    native = _ext.cpu_ext().multi_tensor_info(xs).numpy()
    py = mt.tensor_info_py(xs)
    assert native.shape == (4, len(xs)) and np.array_equal(native, py)
    assert native[0, 0] == xs[0].data_ptr() and native[1, 3] == mt.CHUNK + 5
    assert native[3].tolist() == [1, 1, 1, 1, 0, 1, 1, 1, 0, 1]
    assert mt.tensor_info_py([]).shape == (4, 0) and _ext.cpu_ext().multi_tensor_info([]).shape == (4, 0)
    for bad in ([torch.arange(3)], [torch.randn(2, dtype=torch.complex64)], [torch.randn(3).to_sparse()],
                [torch.randn(2), 1.0], [torch.randn(2), torch.randn(2, device="meta")],
                [torch.randn(2, device="meta")], [torch._neg_view(torch.randn(3))]):
        assert _ext.cpu_ext().multi_tensor_info(bad) is None
        assert mt.tensor_info_py(bad) is None


def test_dtype_buckets_in_order_of_appearance(path):
    xs = _mixed()
    info = mt.tensor_info(xs)
    got = [(d, idx.tolist()) for d, idx in mt.dtype_buckets(xs, info)]
    want = [(k[1], v) for k, v in mt.bucket_by_dtype(xs).items()]
    assert got == want


@pytest.mark.parametrize("backend,device", backend_devices(("triton", "cpu", "cuda", "torch"))
                         + [pytest.param(None, "cpu", id="auto-cpu")])
def test_mixed_dtypes_and_layouts(backend, device, path):
    # float64 only where the backend is picked per dtype (an explicit kernel backend rejects it)
    xs = _mixed(device, torch.float64 if backend in (None, "torch") else torch.float32)
    for p in (2.0, 1.0, math.inf, 3.0):
        assert_close(multi_tensor_norm(xs, p, backend=backend).norm, ref_norm(xs, p), torch.float32,
                     scale=1.0 if p != 3.0 else 20.0, what=f"p={p}")
    want = ref_scale(xs, 0.75)
    multi_tensor_scale_(xs, torch.tensor(0.75, device=device), backend=backend)
    for x, w in zip(xs, want):
        assert_close(x, w, x.dtype)
    want = ref_clamp(xs, 0.3)
    multi_tensor_clamp_(xs, -0.3, 0.3, backend=backend)
    for x, w in zip(xs, want):
        assert torch.equal(x.cpu().double(), w.to(x.dtype).double())


@pytest.mark.parametrize("backend,device", backend_devices(("triton", "cpu", "cuda")))
def test_reallocated_tensors_picked_up(backend, device, path):
    """Same sizes at new addresses (gradients reallocated): the new tensors are read and written,
    the old ones not touched."""
    xs = [randn(5, device=device), randn(mt.CHUNK + 1, dtype=torch.bfloat16, device=device)]
    multi_tensor_norm(xs, backend=backend)
    multi_tensor_scale_(xs, 1.0, backend=backend)
    old = [x.clone() for x in xs]
    ys = [randn(5, device=device) * 3, randn(mt.CHUNK + 1, dtype=torch.bfloat16, device=device)]
    assert_close(multi_tensor_norm(ys, backend=backend).norm, ref_norm(ys), torch.float32)
    want = ref_scale(ys, 0.5)
    multi_tensor_scale_(ys, 0.5, backend=backend)
    for y, w in zip(ys, want):
        assert_close(y, w, y.dtype)
    multi_tensor_clamp_(ys, -0.1, 0.1, backend=backend)
    assert all(float(y.abs().max()) <= 0.1 + 1e-3 for y in ys)
    assert all(torch.equal(x, o) for x, o in zip(xs, old))


def test_table_cache_keyed_by_addresses_and_sizes():
    cache = mt.TableCache(size=3)
    dev = torch.device("cpu")
    a = cache.get_rows(np.array([64, 128]), np.array([10, mt.CHUNK + 1]), dev)
    assert a.table.tolist() == [[64, 10, 0], [128, mt.CHUNK + 1, 0]] and a.n_chunks == 3
    assert cache.get_rows(np.array([64, 128]), np.array([10, mt.CHUNK + 1]), dev) is a
    b = cache.get_rows(np.array([256, 512]), np.array([10, mt.CHUNK + 1]), dev)   # moved only
    assert b is not a and b.chunks is a.chunks and b.table[:, 0].tolist() == [256, 512]
    assert cache.get_rows(np.array([64, 128]), np.array([10, mt.CHUNK + 1]), dev) is a
    c = cache.get_rows(np.array([64, 128]), np.array([10, 3]), dev)              # resized
    assert c.n_chunks == 2 and c.chunks.tolist() == [[0, 0], [1, 0]]
    assert cache.get_rows(np.array([64, 128]), np.array([10, mt.CHUNK + 1]), dev, chunk_size=8) is not a
    assert cache.get_rows(np.zeros(0, np.int64), np.zeros(0, np.int64), dev).n_chunks == 0


@pytest.mark.parametrize("bad,err,msg", [
    (lambda: [torch.randn(3), torch.arange(3)], TypeError, r"tensors\[1\] has dtype torch.int64"),
    (lambda: [torch.randn(3, dtype=torch.complex64)], TypeError, r"tensors\[0\]"),
    (lambda: [torch.randn(2), torch.randn(3).to_sparse()], TypeError, r"tensors\[1\] has layout"),
    (lambda: [torch.randn(2), [1.0, 2.0]], TypeError, r"tensors\[1\] is a list"),
])
@pytest.mark.parametrize("op", ["norm", "scale", "clamp"])
def test_bad_tensors_same_errors(bad, err, msg, op, path):
    xs = bad()
    before = [x.clone() if isinstance(x, torch.Tensor) else x for x in xs]
    run = {"norm": lambda: multi_tensor_norm(xs), "scale": lambda: multi_tensor_scale_(xs, 2.0),
           "clamp": lambda: multi_tensor_clamp_(xs, -0.1, 0.1)}[op]
    with pytest.raises(err, match=msg):
        run()
    assert torch.equal(xs[0].to_dense(), before[0].to_dense())   # nothing modified


@requires_ext
def test_compiled_ops_check_their_arguments():
    x = randn(10)
    table = mt.build_table([[x]])
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        torch.ops.fused_lm.multi_tensor_scale_(table.table, table.chunks, table.chunk_size,
                                               torch.float64, torch.ones(()), 0)
    with pytest.raises(RuntimeError, match="tensor table"):
        torch.ops.fused_lm.multi_tensor_clamp_(table.table[:, :2].contiguous(), table.chunks,
                                               table.chunk_size, torch.float32, -1.0, 1.0, 0)
    with pytest.raises(RuntimeError, match="partials"):
        torch.ops.fused_lm.multi_tensor_norm_partials_(table.table, table.chunks, table.chunk_size,
                                                       torch.float32, torch.empty(5), 1, 2.0, 0)
    assert torch.equal(x, x.clone())


def test_shared_test_list_straddles_the_chunk():
    """tests/_helpers.MIXED is meant to cross a chunk boundary: its CHUNK is the ops' CHUNK."""
    assert CHUNK == mt.CHUNK
    assert any(math.prod(s) > mt.CHUNK for s, _ in MIXED)
