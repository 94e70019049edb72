"""The multi-tensor norm family (fused_lm/ops/multi_tensor_norm.py): ``multi_tensor_norm`` -> (norm,
coef, flag) against the float64 reference (fused_lm/reference/multi_tensor_norm.py) and torch's
get_total_norm, on every backend: every norm type, every chunk, non-finite values, edge lists, bad
input. The clipping API built on it (fused_lm.clip_grad_norm_) is tested in tests/test_clip.py.

Every backend runs on the same inputs (Triton under the interpreter and the C++ CPU kernels here,
CUDA where a GPU is present). Norms are compared with the float64 reference of the SAME stored
values, so the only error is float32 accumulation (and exp2/log2 for general p): TOL[float32].
"""

from __future__ import annotations

import math

import pytest
import torch

from fused_lm.ops import _multi_tensor as mt
from fused_lm.ops.multi_tensor_norm import multi_tensor_norm
from fused_lm.reference import multi_tensor_norm as ref
from tests._helpers import HAS_CUDA, MIXED, assert_close, backend_devices, norm_tol, poison_allocations, randn

# Under the interpreter, numpy warns on log2(0) inside |x|^p = 2^(p log2|x|) (the result, 0 or
# inf, is the intended one).
# The finalise's non-finite flag computes norm - norm (inf - inf = NaN, the intended test).
pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")]

NORM_TYPES = [2.0, 1.0, math.inf, 3.0, 0.5, -1.5, -math.inf, 0.0]


def _tensors(device, spec=MIXED, scale=1.0):
    return [randn(*s, dtype=d, device=device, scale=scale) for s, d in spec]


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("p", NORM_TYPES)
def test_norm_matches_reference_and_torch(backend, device, p):
    xs = _tensors(device)
    norm, coef, _ = multi_tensor_norm(xs, p, 0.5, backend=backend)
    assert norm.dtype == torch.float32 and norm.shape == () and norm.device.type == device
    expected = ref.total_norm(xs, p)
    assert_close(norm, expected, torch.float32, scale=norm_tol(p), what=f"p={p}")
    assert_close(coef, ref.clip_coefficient(expected, 0.5), torch.float32, scale=norm_tol(p))
    # torch on float32 copies of the same values (its bf16 path rounds the norm to bf16); torch
    # raises for the inf norm of an empty tensor, so empty tensors are left out of its list.
    ref_torch = torch.nn.utils.get_total_norm([x.float() for x in xs if x.numel()], p)
    assert_close(norm, ref_torch, torch.float32, scale=norm_tol(p), what=f"vs torch p={p}")


@pytest.mark.parametrize("backend,device", backend_devices(("triton", "cpu", "cuda")))
def test_every_chunk_reduced(backend, device):
    """A chunk or tail left out would change the count: |x| = 1 everywhere, so ||x||_1 = numel."""
    sizes = (1, 1023, mt.CHUNK - 1, mt.CHUNK + 1, 3 * mt.CHUNK - 7)
    xs = [torch.ones(n, device=device) * (-1) ** n for n in sizes]
    with poison_allocations():
        norm = multi_tensor_norm(xs, 1.0, backend=backend).norm
    assert norm.item() == sum(sizes)
    # A single large element in the last chunk's tail must be the max.
    xs[-1][-1] = 7.0
    assert multi_tensor_norm(xs, math.inf, backend=backend).norm.item() == 7.0
    assert multi_tensor_norm(xs, -math.inf, backend=backend).norm.item() == 1.0


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("p", [2.0, 1.0, math.inf, 3.0, -math.inf])
def test_nonfinite_values(backend, device, p):
    """NaN anywhere gives NaN for every norm type (max/min included, like torch); inf gives inf
    for p > 0 (inf for -inf only if every element is inf)."""
    xs = _tensors(device, [((40,), torch.float32), ((mt.CHUNK + 5,), torch.bfloat16)])
    xs[1][mt.CHUNK + 2] = float("inf")
    got = multi_tensor_norm(xs, p, backend=backend).norm
    want = torch.nn.utils.get_total_norm([x.float() for x in xs], p)
    assert (got.isinf() == want.isinf()).item() and (got.isnan() == want.isnan()).item()
    if p > 0:
        assert got.item() == math.inf
        assert multi_tensor_norm(xs, p, backend=backend).flag.item() == 1.0
    xs[0][3] = float("nan")
    norm, coef, flag = multi_tensor_norm(xs, p, backend=backend)
    assert norm.isnan().item() and coef.isnan().item(), f"NaN lost for p={p}"
    assert flag.item() == 1.0
    xs[0][3] = 0.5
    xs[1][mt.CHUNK + 2] = 0.5
    assert multi_tensor_norm(xs, p, backend=backend).flag.item() == 0.0


@pytest.mark.parametrize("backend,device", backend_devices())
def test_norm_edge_lists(backend, device):
    # No tensor at all: torch's tensor(0.) on the CPU.
    empty = multi_tensor_norm([], backend=backend).norm
    assert empty.item() == 0.0 and empty.device.type == "cpu" and empty.dtype == torch.float32
    # Only empty tensors: the empty sum / max (torch raises for inf on empty tensors).
    zs = [torch.zeros(0, device=device), torch.zeros(3, 0, device=device)]
    for p in (2.0, 1.0, math.inf):
        assert multi_tensor_norm(zs, p, backend=backend).norm.item() == 0.0
    # A single 0-d tensor and a non-contiguous one (read through a contiguous copy).
    x = randn(5, 7, device=device).t()
    assert_close(multi_tensor_norm([x, torch.tensor(-3.0, device=device)], backend=backend).norm,
                 ref.total_norm([x, torch.tensor(-3.0)]), torch.float32)


def test_float64_and_bad_input():
    xs = [randn(10, dtype=torch.float64), randn(7)]
    norm = multi_tensor_norm(xs).norm
    assert norm.dtype == torch.float64
    assert_close(norm, ref.total_norm(xs), torch.float32)
    with pytest.raises(TypeError, match="real floating dtype"):
        multi_tensor_norm([torch.arange(3)])
    with pytest.raises(TypeError, match="real floating dtype"):
        multi_tensor_norm([torch.randn(3, dtype=torch.complex64)])
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        multi_tensor_norm([[1.0, 2.0]])
    with pytest.raises(ValueError, match="backend="):
        multi_tensor_norm([torch.randn(3)], backend="fortran")


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_multi_device_norm():
    """Tensors on the CPU and a GPU: per-device norms combined on the first tensor's device."""
    xs = [randn(100), randn(300, device="cuda", dtype=torch.bfloat16), randn(5)]
    for p in (2.0, math.inf, 1.0):
        norm = multi_tensor_norm(xs, p).norm
        assert norm.device.type == "cpu"
        assert_close(norm, ref.total_norm(xs, p), torch.float32)
