"""GPU-only numerics and launch limits of the multi-tensor family, made visible on the CPU (issue 11).

* Same bits on every backend: the optimizer kernels use IEEE-rounded division and square root,
  explicit fma and float64 bias corrections (no contraction anywhere), so the CPU C++ backend and
  the Triton kernels (the interpreter here, the GPU there) agree bit for bit; on a GPU the CUDA
  C++ backend is compared with Triton the same way.
* NaN as torch: AMSGrad's max propagates it (torch.maximum), Lion's sign maps it to 0
  (torch.sign).
* The float64 step-count power of the bias corrections against Python's float64 pow.
* Vector access: the ALIGNED variant is chosen only when every address is 16-byte aligned, and
  misaligned views stay correct (nothing outside them is touched).
* Launch limits: the grid-size check, and tables whose entries claim more than 2**31 elements
  (the address shifted back so that elements past 2**31 land in a small real buffer): any 32-bit
  product of an offset would write elsewhere.
* A user-set ``state['step']`` that the kernels cannot use raises before anything is touched.
* The PTX rules of tools/triton_aot_check.py on synthetic PTX (the rules themselves run on the
  real PTX in tests/test_triton_aot.py).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fused_lm.optim as fo
from fused_lm import _backend
from fused_lm.ops import _multi_tensor as mt
from fused_lm.ops import _optim_common as oc
from fused_lm.ops import adamw as adamw_ops
from fused_lm.ops import lion as lion_ops
from fused_lm.ops import multi_tensor_clamp, multi_tensor_norm, multi_tensor_scale
from fused_lm.reference.multi_tensor_scale import multi_tensor_scale as scale_reference
from tests._helpers import HAS_CUDA, assert_close, backend_devices, randn
from tests.optim._common import make_params, random_grads, set_grads, three_groups

KERNEL_BACKENDS = backend_devices(("triton", "cpu", "cuda"))


def _fma_fp32(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """float32 x * y + z rounded once, in numpy: the product is exact in float64, the float64
    sum is rounded to odd (TwoSum error, then one ulp toward it when inexact and even), and a
    rounded-to-odd 53-bit value rounds to 24 bits correctly."""
    p = x.astype(np.float64) * y.astype(np.float64)
    z64 = z.astype(np.float64)
    s = p + z64
    bb = s - p
    err = (p - (s - bb)) + (z64 - bb)
    fix = (err != 0) & ((s.view(np.int64) & 1) == 0) & np.isfinite(s)
    s = np.where(fix, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(np.float32)


@pytest.fixture(autouse=True, scope="module")
def _interpreter_fma_fused():
    """The Triton 3.6 interpreter evaluates tl.fma as x * y + z, rounded twice (3.9 fuses it);
    a GPU's fma.rn.f32 rounds once. Under such an interpreter, this module's float32 tl.fma is
    evaluated as the GPU does (the kernels are unchanged), so the bit-for-bit comparisons with
    the C++ fma_rn hold there too."""
    if oc.triton is None or not _backend.interpreter_on():
        yield
        return
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.create_fma
    a = np.array([1 + 2.0**-12], dtype=np.float32)
    probe = original(builder.__new__(builder), *(interpreter.TensorHandle(v, _tl_fp32())
                                                  for v in (a, a, np.float32([-1 - 2.0**-11]))))
    if probe.data[0] != 2.0**-24:        # not fused: patch float32 fma for this module

        def create_fma(self, x, y, z):
            if z.data.dtype == np.float32:
                return interpreter.TensorHandle(_fma_fp32(*np.broadcast_arrays(x.data, y.data, z.data)),
                                                z.dtype.scalar)
            return original(self, x, y, z)

        builder.create_fma = create_fma
        try:
            yield
        finally:
            builder.create_fma = original
    else:
        yield


def _tl_fp32():
    import triton.language as tl

    return tl.float32
SHAPES = [(), (1,), (1023,), (3, 5, 7), (17000,)]


def _pairs() -> list:
    """(compiled backend, device) whose results must equal Triton's on the same device, bit for
    bit: the CPU C++ backend against the interpreter here, CUDA C++ against Triton on a GPU."""
    out = []
    for compiled, device in (("cpu", "cpu"), ("cuda", "cuda")):
        dev = torch.device(device)
        reason = "needs CUDA" if device == "cuda" and not HAS_CUDA else (
            _backend.unavailable_reason(compiled, dev) or _backend.unavailable_reason("triton", dev))
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        out.append(pytest.param(compiled, device, id=f"{compiled}-vs-triton", marks=marks))
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _assert_same_bits(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, what
    same = (_bits(a) == _bits(b)) | (a.isnan() & b.isnan())
    assert bool(same.all()), (f"{what}: {int((~same).sum())} of {a.numel()} elements differ, "
                              f"max |diff| {float((a.double() - b.double()).abs().max()):.3e}")


# ---------------------------------------------------------------------------------------------
# Same bits on every backend

_ADAMW_CASES = {
    "fp32": dict(dtype=torch.float32, kw={}),
    "fp32-amsgrad-maximize": dict(dtype=torch.float32, kw=dict(amsgrad=True, maximize=True)),
    "bf16-bf16state-amsgrad": dict(dtype=torch.bfloat16, kw=dict(amsgrad=True)),
    "bf16-master-sr": dict(dtype=torch.bfloat16, kw=dict(master_weights=True, stochastic_rounding=True,
                                                         state_dtype=torch.float32)),
    "fp16-fp16state": dict(dtype=torch.float16, kw={}),
}


def _run(opt_cls, backend, device, dtype, steps, misaligned=False, **kw):
    """Parameters over SHAPES in three groups, ``steps`` steps of the same gradients. With
    ``misaligned``, every parameter and gradient is a view 2 elements into a larger buffer."""
    torch.manual_seed(7)
    params = make_params(SHAPES, dtype, device)
    if misaligned:
        params = [torch.nn.Parameter(torch.empty(p.numel() + 3, dtype=dtype, device=device)
                                     [2:2 + p.numel()].view(p.shape).copy_(p.detach()))
                  for p in params]
    opt = opt_cls(three_groups(params), backend=backend, **kw)
    for s in range(steps):
        grads = random_grads(params, s)
        if misaligned:
            for p, g in zip(params, grads):
                buf = torch.empty(p.numel() + 3, dtype=dtype, device=device)
                p.grad = buf[2:2 + p.numel()].view(p.shape).copy_(g)
        else:
            set_grads(params, grads)
        opt.step()
    return params, opt


@pytest.mark.parametrize("compiled,device", _pairs())
@pytest.mark.parametrize("case", list(_ADAMW_CASES))
def test_adamw_compiled_and_triton_same_bits(compiled, device, case):
    """AdamW on the compiled backend and on Triton: every parameter and state tensor bit-identical
    after several steps (both IEEE, explicit fma, no contraction, float64 bias corrections)."""
    c = _ADAMW_CASES[case]
    ours, opt_a = _run(fo.AdamW, compiled, device, c["dtype"], 4, weight_decay=0.1, **c["kw"])
    theirs, opt_b = _run(fo.AdamW, "triton", device, c["dtype"], 4, weight_decay=0.1, **c["kw"])
    for i, (a, b) in enumerate(zip(ours, theirs)):
        _assert_same_bits(a, b, f"param {i}")
        for k, v in opt_a.state[a].items():
            _assert_same_bits(v, opt_b.state[b][k], f"state {k} of param {i}")


@pytest.mark.parametrize("compiled,device", _pairs())
@pytest.mark.parametrize("dtype,kw", [(torch.float32, {}),
                                      (torch.bfloat16, dict(master_weights=True, stochastic_rounding=True)),
                                      (torch.bfloat16, dict(maximize=True))],
                         ids=["fp32", "bf16-master-sr", "bf16-maximize"])
def test_lion_compiled_and_triton_same_bits(compiled, device, dtype, kw):
    ours, opt_a = _run(fo.Lion, compiled, device, dtype, 4, weight_decay=0.1, **kw)
    theirs, opt_b = _run(fo.Lion, "triton", device, dtype, 4, weight_decay=0.1, **kw)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        _assert_same_bits(a, b, f"param {i}")
        for k, v in opt_a.state[a].items():
            _assert_same_bits(v, opt_b.state[b][k], f"state {k} of param {i}")


@pytest.mark.parametrize("compiled,device", _pairs())
def test_misaligned_views_same_bits(compiled, device):
    """Parameters and gradients that are views 8 bytes into their buffers (the unaligned kernel
    variant on a GPU) give the same bits as aligned ones, on both backends."""
    for backend in (compiled, "triton"):
        aligned, _ = _run(fo.AdamW, backend, device, torch.float32, 3, amsgrad=True)
        views, _ = _run(fo.AdamW, backend, device, torch.float32, 3, misaligned=True, amsgrad=True)
        for i, (a, b) in enumerate(zip(aligned, views)):
            _assert_same_bits(a, b, f"{backend}: param {i}")


# ---------------------------------------------------------------------------------------------
# NaN propagation

@pytest.mark.parametrize("backend,device", backend_devices())
def test_amsgrad_max_propagates_nan_as_torch(backend, device):
    """torch.maximum propagates NaN: a NaN already in max_exp_avg_sq, or a NaN gradient, leaves
    NaN in max_exp_avg_sq and the parameter, exactly where torch.optim.AdamW leaves them (a
    NaN-dropping max would keep the old maximum or the new second moment)."""
    ours_p = make_params([(40,), (3, 7)], device=device)
    torch_p = [p.detach().clone().requires_grad_(True) for p in ours_p]
    ours = fo.AdamW(ours_p, backend=backend, amsgrad=True)
    theirs = torch.optim.AdamW(torch_p, amsgrad=True, foreach=False)
    for s in range(3):
        grads = random_grads(ours_p, s)
        if s == 1:
            grads[0][5] = float("nan")                      # NaN v: max(v_max, NaN)
            for opt, ps in ((ours, ours_p), (theirs, torch_p)):
                opt.state[ps[0]]["max_exp_avg_sq"][11] = float("nan")    # max(NaN, v)
                opt.state[ps[1]]["max_exp_avg_sq"][1, 2] = float("nan")
        set_grads(ours_p, grads)
        set_grads(torch_p, grads)
        ours.step()
        theirs.step()
    for a, b in zip(ours_p, torch_p):
        vmax_a, vmax_b = ours.state[a]["max_exp_avg_sq"], theirs.state[b]["max_exp_avg_sq"]
        assert vmax_a.isnan().sum() > 0
        assert torch.equal(vmax_a.isnan(), vmax_b.isnan())
        assert torch.equal(a.isnan(), b.isnan())
        assert_close(a, b, torch.float32, scale=5)          # NaN patterns first, then the values


@pytest.mark.parametrize("backend,device", backend_devices())
def test_lion_nan_gradient_as_torch(backend, device):
    """torch.sign is (0 < x) - (x < 0), so sign(NaN) = 0: a NaN gradient leaves the parameter
    finite (decay only) and the moment NaN, on every backend as on the torch path."""
    ours_p = make_params([(40,), (3, 7)], device=device)
    ref_p = [p.detach().clone().requires_grad_(True) for p in ours_p]
    ours = fo.Lion(ours_p, backend=backend, weight_decay=0.1)
    ref = fo.Lion(ref_p, backend="torch", weight_decay=0.1)
    for s in range(3):
        grads = random_grads(ours_p, s)
        if s == 1:
            grads[0][7] = float("nan")
            grads[1][2, 3] = float("nan")
        set_grads(ours_p, grads)
        set_grads(ref_p, grads)
        ours.step()
        ref.step()
    for a, b in zip(ours_p, ref_p):
        m_a, m_b = ours.state[a]["exp_avg"], ref.state[b]["exp_avg"]
        assert int(m_a.isnan().sum()) == 1 and torch.equal(m_a.isnan(), m_b.isnan())
        assert not a.isnan().any() and not b.isnan().any()
        assert_close(a, b, torch.float32)


# ---------------------------------------------------------------------------------------------
# The bias corrections' power of the step count

if oc.triton is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _pow_count_kernel(b_ptr, t_ptr, out_ptr):
        # Runs the kernels' oc.pow_count on one (beta, count) pair per program.
        i = tl.program_id(0)
        tl.store(out_ptr + i, oc.pow_count(tl.load(b_ptr + i), tl.load(t_ptr + i)))


def _triton_device() -> str | None:
    if oc.triton is None:
        return None
    if _backend.interpreter_on():
        return "cpu"
    return "cuda" if HAS_CUDA else None


@pytest.mark.skipif(_triton_device() is None, reason="needs the Triton interpreter or CUDA")
def test_pow_count_matches_float64():
    """oc.pow_count (float64 squaring over the integer count, at most 2^30, 0 for NaN) against
    Python's float64 pow: within a few double ulps, so 1 - beta^t rounds to the same float32."""
    betas = [0.9, 0.999, 0.95, 0.5, 0.0, 0.99999994]
    counts = [1.0, 2.0, 7.0, 1000.0, 12345.0, 2.0**24, 0.0, 0.5, 2.5, -3.0, 1e10, float("nan")]
    device = _triton_device()
    b = torch.tensor([x for x in betas for _ in counts], dtype=torch.float32, device=device)
    t = torch.tensor([c for _ in betas for c in counts], dtype=torch.float32, device=device)
    out = torch.empty(b.numel(), dtype=torch.float64, device=device)
    _pow_count_kernel[(b.numel(),)](b, t, out)
    for bi, ti, r in zip(b.tolist(), t.tolist(), out.tolist()):
        n = 0 if not ti >= 1 else min(int(ti), 2**30)
        want = bi ** n
        # ~log2(n) squarings, each doubling the relative error: at most ~n double roundings.
        assert abs(r - want) <= 2 * max(n, 1) * 2.0**-53 * want + 1e-300, (bi, ti, r, want)
        assert np.float32(1.0 - r) == np.float32(1.0 - want), (bi, ti)


# ---------------------------------------------------------------------------------------------
# Vector access: the ALIGNED variant and misaligned views

def test_table_aligned_flag():
    """A table is ALIGNED only when every address is 16-byte aligned and the chunk size a multiple
    of 8 elements; a CPU table is re-read after an in-place patch of its host copy."""
    xs = [torch.randn(n) for n in (5, 1000, 3)]
    assert mt.build_table([xs]).aligned
    buf = torch.randn(64)
    assert not mt.build_table([xs + [buf[1:9]]]).aligned          # 4 bytes in
    assert mt.build_table([[buf[4:20]]]).aligned                 # 16 bytes in
    assert not mt.build_table([xs], chunk_size=1000 + 4).aligned
    half = torch.randn(64).to(torch.bfloat16)
    assert not mt.build_table([[half[4:12]]]).aligned            # 8 bytes in
    assert mt.build_table([[half[8:12]]]).aligned
    assert mt.build_table([[]]).aligned                           # no address at all
    t = mt.build_table([xs])
    t.table[1, 0] += 4
    assert not t.aligned


class _Spy:
    """Wraps a Triton kernel and records the ALIGNED flag of each launch."""

    def __init__(self, kernel):
        self.kernel, self.aligned = kernel, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.aligned.append(kwargs["ALIGNED"])
            return launch(*args, **kwargs)
        return run


@pytest.mark.skipif(_triton_device() is None, reason="needs the Triton interpreter or CUDA")
def test_launchers_choose_the_variant(monkeypatch):
    device = _triton_device()
    spies = {}
    for mod, name in ((multi_tensor_scale, "_scale_kernel"), (multi_tensor_clamp, "_clamp_kernel"),
                      (multi_tensor_norm, "_norm_partials_kernel"), (adamw_ops, "_adamw_kernel")):
        spies[name] = _Spy(getattr(mod, name))
        monkeypatch.setattr(mod, name, spies[name])
    buf = torch.randn(3000, device=device)
    for xs, want in (([buf[:1000], buf[1000:2000]], True), ([buf[:1000], buf[1001:2001]], False)):
        multi_tensor_scale.multi_tensor_scale_(xs, 0.5, backend="triton")
        multi_tensor_clamp.multi_tensor_clamp_(xs, -0.1, 0.1, backend="triton")
        multi_tensor_norm.multi_tensor_norm(xs, 2.0, backend="triton")
        assert [spies[k].aligned[-1] for k in ("_scale_kernel", "_clamp_kernel",
                                               "_norm_partials_kernel")] == [want] * 3
    _run(fo.AdamW, "triton", device, torch.float32, 1)
    _run(fo.AdamW, "triton", device, torch.float32, 1, misaligned=True)
    assert spies["_adamw_kernel"].aligned == [True, False]


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("offset", [1, 3])
def test_misaligned_views_scale_clamp_norm(backend, device, dtype, offset):
    """Views ``offset`` elements into a buffer, sizes around the block: scale, clamp and norm match
    the reference, and the buffer outside the views is untouched."""
    sizes = [1, 1023, 2048, mt.CHUNK + 5]
    buf = randn(sum(sizes) + offset * len(sizes) + 8, dtype=dtype, device=device)
    keep = buf.clone()
    views, inside, at = [], torch.zeros(buf.numel(), dtype=torch.bool), 0
    for n in sizes:
        at += offset
        views.append(buf[at:at + n])
        inside[at:at + n] = True
        at += n
    expected = torch.linalg.vector_norm(torch.cat([v.double() for v in views]))
    assert_close(multi_tensor_norm.multi_tensor_norm(views, 2.0, backend=backend).norm, expected,
                 torch.float32)
    scaled = scale_reference(views, 0.75)
    multi_tensor_scale.multi_tensor_scale_(views, 0.75, backend=backend)
    for v, e in zip(views, scaled):
        assert_close(v, e, dtype)
    before = [v.clone() for v in views]
    multi_tensor_clamp.multi_tensor_clamp_(views, -0.5, 0.25, backend=backend)
    for v, b in zip(views, before):
        assert torch.equal(v, b.clamp(-0.5, 0.25))          # the bounds are exact in every dtype
    assert torch.equal(buf[~inside.to(buf.device)], keep[~inside.to(buf.device)])


# ---------------------------------------------------------------------------------------------
# Launch limits

def test_launch_grid_limit():
    table = mt.build_table([[torch.randn(5)]])
    assert mt.launch_grid(table) == (1,)
    table.n_chunks = mt.MAX_GRID_X
    assert mt.launch_grid(table) == (mt.MAX_GRID_X,)
    table.n_chunks = mt.MAX_GRID_X + 1
    with pytest.raises(ValueError, match="launch grid"):
        mt.launch_grid(table)


_BIG = 2**31 + mt.CHUNK      # first element of the one chunk: past 2**31, a multiple of CHUNK
_TAIL = 1500                 # elements after it: one full block and a masked tail


def _fake_table(buffers: list[torch.Tensor], device) -> mt.TensorTable:
    """A one-chunk table over tensors that claim _BIG + _TAIL elements, whose only chunk starts at
    element _BIG: each address is shifted back by _BIG elements, so elements _BIG.. are the real
    ``buffers`` (of _TAIL elements) and any 32-bit product of an offset lands elsewhere."""
    addrs = [b.data_ptr() - _BIG * b.element_size() for b in buffers]
    assert all(a > 0 for a in addrs)
    host = torch.tensor([addrs + [_BIG + _TAIL, 0]], dtype=torch.int64)
    chunks = torch.tensor([[0, _BIG]], dtype=torch.int64)
    if torch.device(device).type == "cpu":
        return mt.TensorTable(host, chunks, 1, mt.CHUNK, len(buffers))
    return mt.TensorTable(host.to(device), chunks.to(device), 1, mt.CHUNK, len(buffers),
                          (host, chunks))


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offsets_past_2_31_scale_clamp_norm(backend, device, dtype):
    x = randn(_TAIL, dtype=dtype, device=device)
    want = torch.linalg.vector_norm(x.double()) ** 2
    partials = torch.empty(1, dtype=torch.float32, device=device)
    multi_tensor_norm._launch_partials(backend, dtype, multi_tensor_norm.SUM_SQ, 2.0, partials,
                                       _fake_table([x], device))
    assert_close(partials[0], want, torch.float32)
    s = torch.full((), 1.5, device=device)
    expected = (x.float() * 1.5).to(dtype)
    multi_tensor_scale._launch(backend, dtype, s, _fake_table([x], device))
    assert_close(x, expected, dtype)         # (the interpreter's float32 -> bf16 cast truncates)
    before = x.clone()
    multi_tensor_clamp._launch(backend, dtype, -0.5, 0.5, _fake_table([x], device))
    assert torch.equal(x, before.clamp(-0.5, 0.5))


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("family", ["adamw", "lion"])
def test_offsets_past_2_31_optimizers(backend, device, family):
    """One AdamW / Lion update through a table whose chunk starts past 2**31: the same bits as the
    same update through an ordinary table."""
    n_lists = 4 if family == "adamw" else 3
    lists = [randn(_TAIL, device=device) for _ in range(n_lists)]
    lists[3 - (family == "lion")].abs_()                            # exp_avg_sq >= 0
    plain = [t.clone() for t in lists]
    p0 = lists[0].clone()
    hp = torch.tensor([[1e-2, 0.9, 0.999, 1e-8, 0.1, 1.0, 0.0, 0.0]], device=device)
    one, zero = torch.ones((), device=device), torch.zeros((), device=device)
    ops = adamw_ops if family == "adamw" else lion_ops
    for tensors, table in ((lists, _fake_table(lists, device)), (plain, mt.build_table([[t] for t in plain]))):
        step = torch.zeros((), device=device)
        kw = dict(param_dtype=torch.float32, state_dtype=torch.float32, amsgrad=False,
                  master=False, sr=False, seed=0)
        if backend == "triton":
            getattr(ops, f"{family}_triton")(table, oc.step_table([step], torch.device(device)), hp,
                                             one, zero, **kw)
        else:
            getattr(ops, f"{family}_compiled")(backend, table, oc.step_table([step], torch.device(device)),
                                               hp, one, zero, **kw)
        assert float(step) == 1.0
    for k, (a, b) in enumerate(zip(lists, plain)):
        _assert_same_bits(a, b, f"list {k}")
    assert not torch.equal(lists[0], p0)            # the update did happen


# ---------------------------------------------------------------------------------------------
# state['step'] the kernels cannot use

@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("bad", ["other-device", "int64", "float64", "python-int", "two-elements"])
def test_bad_user_step_raises_before_any_change(backend, device, bad):
    """A ``state['step']`` set by the user that the kernels would misuse raises a clear error and
    leaves every parameter and state untouched. "other-device" is the CPU-machine simulation of a
    CPU step tensor on a CUDA parameter: a step on the meta device (any device but the
    parameter's raises)."""
    params = make_params([(10,), (3, 4)], device=device)
    opt = fo.AdamW(params, backend=backend)
    set_grads(params, random_grads(params, 0))
    before = [p.detach().clone() for p in params]
    opt._ensure_state(params[1], opt.param_groups[0])
    moments = {k: v.clone() for k, v in opt.state[params[1]].items() if k != "step"}
    opt.state[params[1]]["step"] = {
        "other-device": torch.zeros((), device="meta"),
        "int64": torch.tensor(3, device=device),
        "float64": torch.tensor(3.0, dtype=torch.float64, device=device),
        "python-int": 3,
        "two-elements": torch.zeros(2, device=device),
    }[bad]
    error = ValueError if bad in ("other-device", "two-elements") else TypeError
    with pytest.raises(error, match=r"state\['step'\].*expected a float32 one-element tensor on"):
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    for k, v in moments.items():
        assert torch.equal(opt.state[params[1]][k], v)


def test_step_table_check_is_device_agnostic():
    steps = [torch.zeros(()), torch.zeros((), device="meta")]
    with pytest.raises(ValueError, match="on meta.*on cpu"):
        oc.step_table(steps, torch.device("cpu"))
    with pytest.raises(ValueError, match="on cpu.*on meta"):
        oc.step_table(steps[:1], torch.device("meta"))
    table = oc.step_table(steps[:1], torch.device("cpu"))
    assert table.tolist() == [steps[0].data_ptr()]


# ---------------------------------------------------------------------------------------------
# The PTX rules of tools/triton_aot_check.py

def _aot():
    path = Path(__file__).resolve().parents[1] / "tools" / "triton_aot_check.py"
    spec = importlib.util.spec_from_file_location("_triton_aot_check_for_test", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod          # dataclasses resolve their module
    spec.loader.exec_module(mod)
    return mod


_GOOD = """
    ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    div.rn.f32 %f3, %f1, %f2;   // div.full.f32 in a comment is no instruction
    sqrt.rn.f32 %f4, %f3;
    fma.rn.f32 %f5, %f4, %f3, %f2;
    @%p1 st.global.v4.b32 [ %rd2 + 0 ], { %r1, %r2, %r3, %r4 };
"""


def test_ptx_rules_on_synthetic_ptx():
    aot = _aot()
    spec = aot.Spec("optim", "fused_lm.ops.adamw", "_adamw_kernel", {}, None)

    def task(aligned):
        return aot.Task("adamw._adamw_kernel", spec, aot.Variant("", {"ALIGNED": aligned}), 90)

    assert aot.ptx_problems(task(True), _GOOD) == []
    approx = _GOOD.replace("div.rn.f32 %f3", "div.full.f32 %f3").replace("sqrt.rn", "sqrt.approx.ftz")
    problems = "; ".join(aot.ptx_problems(task(True), approx))
    assert "div.full.f32" in problems and "sqrt.approx.ftz.f32" in problems
    assert "no div.rn.f32, sqrt.rn.f32" in problems
    scalar = _GOOD.replace("ld.global.v4.b32", "ld.global.b32").replace("st.global.v4.b32", "st.global.b32")
    assert len(aot.ptx_problems(task(True), scalar)) == 2        # no 128-bit load, no store
    assert aot.ptx_problems(task(False), scalar) == []           # the unaligned variant may be scalar
    assert aot.ptx_problems(task(True), _GOOD + "ex2.approx.f32 %f9, %f8;\n")
    assert "NaN" in aot.ptx_problems(task(True), _GOOD + "max.f32 %f9, %f8, %f7;\n")[0]
    assert aot.ptx_problems(task(True), _GOOD + "max.NaN.f32 %f9, %f8, %f7;\n") == []
    wide = _GOOD.replace("ld.global.v4.b32", "ld.global.L1::evict_last.v2.b64")
    assert aot.ptx_problems(task(True), wide) == []
