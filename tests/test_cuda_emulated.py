"""The CUDA C++ kernels (csrc/cuda) on the CPU, under the emulator of csrc/emu (README "Tests").

Every CUDA launcher (AdamW, Lion and their step increment, multi-tensor scale, clamp, norm
partials and finalize) runs from the project's own host code: within ``cuda_kernels(emu)`` the
ops ``torch.ops.fused_lm.*`` that the optimizers and multi-tensor functions call on CPU tensors go
to the emulated launchers (EMULATED_OPS), and every output is compared with the same call on the
CPU backend fused_lm._C, which runs the same functors:

* bit for bit: neither build may contract a*b+c into an FMA (setup.py's ``-ffp-contract=off``,
  which the emulated kernels take from the CPU extension's flags; checked by
  test_builds_do_not_contract), and the functors write every FMA they mean (``fma_rn``). Under
  GCC's default for C++ (``-ffp-contract=fast``) with -march=native, the same functor compiled
  into the CPU loop and into the kernel was contracted differently (AdamW with amsgrad: 1 float32
  ulp in about half of its elements);
* norm sums: the kernels add in another order than the CPU loop; both are compared with the
  float64 reference within the float32 tolerance; max/min norms are exact.

Cases: every (param, state) dtype pair x amsgrad x master weights the launchers instantiate, with
maximize, weight decay, a tensor lr, GradScaler's scale and found_inf, stochastic rounding and
in-step clipping; odd sizes, empty tensors, views whose data is not 16-byte aligned, chunk sizes
that put chunk starts off the vector width, tables that claim more than 2**32 elements, more than
one block of step counters. Then the emulator itself (lane rules, reports, launch limits, faults),
a run of this module under AddressSanitizer + UBSan with a shuffled thread order, and mutations
of the kernels that the emulation must catch.

A new CUDA launcher: a shim in csrc/emu/shims.cpp, an entry in EMULATED_OPS, and a case here that
calls it through its public function.
"""

from __future__ import annotations

import contextlib
import ctypes as C
import importlib.util
import math
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fused_lm import _ext
from fused_lm.ops import _multi_tensor as mt
from fused_lm.ops.multi_tensor_clamp import multi_tensor_clamp_
from fused_lm.ops.multi_tensor_norm import multi_tensor_norm
from fused_lm.ops.multi_tensor_scale import multi_tensor_scale_
from fused_lm.optim import AdamW, Lion
from fused_lm.reference.multi_tensor_norm import total_norm
from tests._helpers import SEED, assert_close

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fused_lm_emulator", ROOT / "csrc/emu/emulator.py")
emulator = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(emulator)

pytestmark = [
    pytest.mark.skipif(not (sys.platform == "linux" and platform.machine() == "x86_64"
                            and shutil.which(emulator.CXX)),
                       reason="the CUDA emulator needs g++ on x86-64 Linux"),
    pytest.mark.skipif(not _ext.has_cpu(), reason="needs fused_lm._C (make build)"),
    pytest.mark.xdist_group("cuda_emulated"),   # one worker builds and loads the emulator
]

# Set by test_sanitizers_and_shuffled_order for the run of this module under ASan.
VARIANT = os.environ.get("FUSED_LM_EMU_VARIANT", "default")
SHUFFLE = int(os.environ.get("FUSED_LM_EMU_SHUFFLE", "0"))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---- the emulated launchers ------------------------------------------------------------------

_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}   # flm::DType (launch.h)
_TABLE = [C.c_void_p, C.c_void_p, C.c_int64, C.c_int64, C.c_int64]
_OPTIM = [C.c_int, C.c_int, C.c_bool, C.c_bool, C.c_void_p, C.c_void_p, C.c_int64, C.c_void_p,
          C.c_void_p, C.c_uint32, C.c_bool]


def _table(table, chunks, lists, chunk_size):
    return table.data_ptr(), chunks.data_ptr(), lists, chunks.shape[0], chunk_size


# The arguments of each shim from those of the op it stands for (same names as the schemas).
def _adamw(table, chunks, chunk_size, steps, hp, grad_mult, skip, lists, p, s, amsgrad, master,
           sr, seed, stream):
    return (*_table(table, chunks, lists, chunk_size), _CODES[p], _CODES[s], amsgrad, master,
            hp.data_ptr(), steps.data_ptr(), steps.numel(), grad_mult.data_ptr(), skip.data_ptr(),
            seed & 0xFFFFFFFF, sr)


def _lion(table, chunks, chunk_size, steps, hp, grad_mult, skip, lists, p, s, master, sr, seed,
          stream):
    return _adamw(table, chunks, chunk_size, steps, hp, grad_mult, skip, lists, p, s, False,
                  master, sr, seed, stream)


def _scale(table, chunks, chunk_size, dtype, scale, stream):
    return (*_table(table, chunks, 1, chunk_size), _CODES[dtype], scale.data_ptr())


def _clamp(table, chunks, chunk_size, dtype, lo, hi, stream):
    return (*_table(table, chunks, 1, chunk_size), _CODES[dtype], lo, hi)


def _partials(table, chunks, chunk_size, dtype, partials, kind, p, stream):
    return (*_table(table, chunks, 1, chunk_size), _CODES[dtype], kind, p, partials.data_ptr())


def _finalize(partials, out, kind, p, max_norm, stream):
    return partials.data_ptr(), partials.numel(), kind, p, max_norm, out.data_ptr()


# op of fused_lm (schemas: csrc/cpu/*.cpp) -> (its shim in csrc/emu/shims.cpp, the shim's ctypes
# argument types, the shim's arguments from the op's). One entry per CUDA launcher.
_F, _I = C.c_float, C.c_int
EMULATED_OPS = {
    "multi_tensor_adamw_": ("emu_adamw", _TABLE + _OPTIM, _adamw),
    "multi_tensor_lion_": ("emu_lion", _TABLE + _OPTIM, _lion),
    "multi_tensor_scale_": ("emu_multi_tensor_scale", _TABLE + [_I, C.c_void_p], _scale),
    "multi_tensor_clamp_": ("emu_multi_tensor_clamp", _TABLE + [_I, _F, _F], _clamp),
    "multi_tensor_norm_partials_": ("emu_multi_tensor_norm_partials",
                                    _TABLE + [_I, _I, _F, C.c_void_p], _partials),
    "multi_tensor_norm_finalize_": ("emu_multi_tensor_norm_finalize",
                                    [C.c_void_p, C.c_int64, _I, _F, _F, C.c_void_p], _finalize),
}


@pytest.fixture(scope="module")
def emu():
    lib = emulator.Emulator(os.environ.get("FUSED_LM_EMU_LIB") or emulator.build(VARIANT))
    lib.set_shuffle(SHUFFLE)
    _ext.cpu_ext()
    return lib


@contextlib.contextmanager
def cuda_kernels(emu):
    """Within the block, the fused_lm ops run the emulated CUDA launchers of ``emu``."""
    ns = torch.ops.fused_lm
    saved = {name: getattr(ns, name) for name in EMULATED_OPS}

    def launcher(shim, argtypes, convert):
        return lambda *args: emu.call(shim, argtypes, *convert(*args))

    try:
        for name, entry in EMULATED_OPS.items():
            setattr(ns, name, launcher(*entry))
        yield
    finally:
        for name, op in saved.items():
            setattr(ns, name, op)


def twin(emu, run):
    """``run()`` (which creates its inputs from the seed and returns its outputs) on the CPU
    backend, then on the emulated CUDA kernels: (cpu outputs, cuda outputs)."""
    torch.manual_seed(SEED)
    cpu = run()
    torch.manual_seed(SEED)
    with cuda_kernels(emu):
        cuda = run()
    return cpu, cuda


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view({2: torch.int16, 4: torch.int32}[t.element_size()])


def check(cpu, cuda, what: str = "") -> None:
    """Bit-identical outputs (no contraction in either build: test_builds_do_not_contract)."""
    assert len(cpu) == len(cuda)
    for dtype in {a.dtype for a in cpu}:   # fast path: one comparison per dtype
        a = torch.cat([bits(x) for x in cpu if x.dtype == dtype])
        b = torch.cat([bits(x) for x, y in zip(cuda, cpu) if y.dtype == dtype])
        if not torch.equal(a, b):
            break
    else:
        return
    for i, (a, b) in enumerate(zip(cpu, cuda)):
        diff = int((bits(a) != bits(b)).sum()) if a.numel() else 0
        assert diff == 0, (f"{what} output {i} {tuple(a.shape)} {a.dtype}: {diff} of {a.numel()} "
                           f"elements differ")


def subset_under_asan(params, keep):
    """``params``, or under ASan (5x slower) those for which ``keep(param)``: the ASan run covers
    every launcher, storage type and list count, not every combination."""
    return params if VARIANT == "default" else [p for p in params if keep(p)]


@pytest.fixture(params=subset_under_asan(["in-order", "shuffled"], lambda p: p == "shuffled"))
def schedule(request, emu):
    """Threads and blocks in order, or in an order drawn from a seed (emu_set_shuffle)."""
    emu.set_shuffle(SHUFFLE or (SEED if request.param == "shuffled" else 0))
    yield request.param
    emu.set_shuffle(SHUFFLE)


# ---- inputs ----------------------------------------------------------------------------------

SHAPES = [(), (1,), (0,), (1023,), (4097,), (3, 5, 7), (20000,)]   # 20000 > CHUNK: 2 chunks


def misaligned(n: int, dtype, offset: int = 1) -> torch.Tensor:
    """A contiguous tensor of ``n`` random values whose data starts ``offset`` elements into a
    16-byte aligned buffer: the kernels must take their scalar path."""
    return torch.randn(n + offset).to(dtype)[offset:]


def tensors(dtype) -> list[torch.Tensor]:
    out = [torch.randn(s).to(dtype) for s in SHAPES]
    out += [misaligned(3000, dtype, 1), misaligned(17001, dtype, 3)]
    out[3][::97] = float("nan")
    out[4][5], out[4][6] = float("inf"), -float("inf")
    return out


# ---- optimizers: AdamW, Lion, the step increment, and the norm of in-step clipping -----------

def _optim_cases():
    for cls in (AdamW, Lion):
        for p in DTYPES:
            for s in dict.fromkeys((torch.float32, torch.bfloat16, p)):
                for amsgrad in ((False, True) if cls is AdamW else (False,)):
                    for master in ((False, True) if p != torch.float32 else (False,)):
                        name = (f"{cls.__name__}-{str(p)[6:]}-state_{str(s)[6:]}"
                                f"{'-amsgrad' if amsgrad else ''}{'-master' if master else ''}")
                        yield pytest.param(cls, p, s, amsgrad, master, id=name)


def run_optimizer(cls, p_dtype, s_dtype, amsgrad, master, shapes=SHAPES, steps=4):
    """Steps of ``cls`` on the "cpu" backend (the ops its kernels call may be emulated): two
    param groups (maximize and a tensor lr in one, other betas and decay in the other),
    stochastic rounding for bf16, clipping at a norm never reached (the norm kernels run, the
    coefficient is exactly 1), GradScaler's scale on step 1 and found_inf on step 2 (skipped).
    Returns every parameter and state tensor, and the clipping norms."""
    params = [torch.randn(s).to(p_dtype) for s in shapes] + [misaligned(1500, p_dtype, 1)]
    params = [torch.nn.Parameter(x) for x in params]
    extra = dict(amsgrad=amsgrad) if cls is AdamW else {}
    groups = [dict(params=params[::2], lr=torch.tensor(2e-2), weight_decay=0.1, maximize=True,
                   **extra),
              dict(params=params[1::2], lr=3e-3, betas=(0.8, 0.95), weight_decay=0.01, **extra)]
    opt = cls(groups, backend="cpu", master_weights=master,
              state_dtype=None if s_dtype == p_dtype else s_dtype,
              stochastic_rounding=p_dtype == torch.bfloat16, max_grad_norm=1e30)
    norms = []
    for step in range(steps):
        scale = 1024.0 if step in (1, 2) else 1.0
        for x in params:
            x.grad = (torch.randn(x.shape) * scale).to(p_dtype)
            if x.numel() > 3:   # gradients as views at an odd offset too
                x.grad = misaligned(x.numel(), p_dtype, 3).view(x.shape).copy_(x.grad)
        if scale != 1.0:
            opt.grad_scale = torch.tensor(scale)
            opt.found_inf = torch.tensor(float(step == 2))
        before = [x.detach().clone() for x in params]
        opt.step()
        if step == 2:
            assert all(torch.equal(a, b) for a, b in zip(before, params)), "found_inf: no skip"
        for name in ("grad_scale", "found_inf"):
            if hasattr(opt, name):
                delattr(opt, name)
        norms.append(opt.grad_norm)
    out = [x.detach() for x in params]
    for x in params:
        out += [v for _, v in sorted(opt.state[x].items())]
    return out, norms


ASAN_OPTIM = {"AdamW-float32-state_float32-amsgrad", "AdamW-bfloat16-state_float32-amsgrad-master",
              "AdamW-float16-state_float16-amsgrad-master", "Lion-bfloat16-state_bfloat16-master",
              "Lion-float32-state_bfloat16"}


@pytest.mark.parametrize("cls,p_dtype,s_dtype,amsgrad,master",
                         subset_under_asan(list(_optim_cases()), lambda p: p.id in ASAN_OPTIM))
def test_optimizer(emu, cls, p_dtype, s_dtype, amsgrad, master):
    (cpu, cpu_norms), (cuda, cuda_norms) = twin(
        emu, lambda: run_optimizer(cls, p_dtype, s_dtype, amsgrad, master))
    check(cpu, cuda, cls.__name__)
    for a, b in zip(cpu_norms, cuda_norms):   # summation order differs: float32 tolerance
        assert_close(b, a, torch.float32)


def test_step_counters_over_several_blocks(emu):
    """257 tensors: the step increment runs 2 blocks of 256 threads, the second with one."""
    shapes = [(1,)] * 257
    cpu, cuda = twin(emu, lambda: run_optimizer(AdamW, torch.float32, torch.float32, False,
                                                False, shapes, steps=2)[0])
    check(cpu, cuda)
    assert float(cuda[-1]) == 2.0  # the last tensor's step counter (state sorted: step last)


def test_clipping_coefficient(emu):
    """In-step clipping with a coefficient < 1 (AdamW + max_grad_norm): the norm of the emulated
    kernels adds in another order than the CPU loop, so parameters match within float32."""
    def run():
        params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
        opt = AdamW(params, lr=1e-2, backend="cpu", max_grad_norm=0.5)
        for x in params:
            x.grad = torch.randn(x.shape)
        opt.step()
        return params, opt.grad_norm
    (cpu, cpu_norm), (cuda, cuda_norm) = twin(emu, run)
    expected = total_norm([x.grad for x in cpu], 2.0)
    assert_close(cuda_norm, expected, torch.float32)
    for a, b in zip(cpu, cuda):
        assert_close(b, a, torch.float32)


# ---- multi-tensor scale, clamp, norm ---------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_and_clamp(emu, dtype, schedule):
    def run():
        ts = tensors(dtype)
        multi_tensor_scale_(ts, torch.tensor(0.37), backend="cpu")
        multi_tensor_clamp_(ts, -0.5, 0.8, backend="cpu")
        return ts
    check(*twin(emu, run))


NORMS = subset_under_asan([1.0, 2.0, 3.5, -1.5, math.inf, -math.inf],
                          lambda p: p in (2.0, math.inf))


@pytest.mark.parametrize("dtypes", [(d,) for d in DTYPES] + [DTYPES], ids=str)
@pytest.mark.parametrize("norm_type", NORMS)
def test_norm(emu, norm_type, dtypes, schedule):
    """The global norm, clip coefficient and non-finite flag; several dtypes are one partials
    launch each into one buffer, then one finalise."""
    def run(finite: bool):
        ts = [t for d in dtypes for t in tensors(d)]
        if finite:
            ts = [t.nan_to_num(0.5, 2.0, -2.0) for t in ts]
        return ts, multi_tensor_norm(ts, norm_type, 0.25, backend="cpu")
    for finite in (True, False):
        (ts, cpu), (_, cuda) = twin(emu, lambda: run(finite))
        if norm_type in (math.inf, -math.inf) or not finite:   # order-free (NaN propagates)
            check(cpu, cuda)
        else:
            expected = total_norm(ts, norm_type)
            assert_close(cuda[0], expected, torch.float32)
            assert_close(cuda[1], torch.clamp(0.25 / (expected + 1e-6), max=1.0), torch.float32)
        assert float(cuda[2]) == (0.0 if finite else 1.0)


@pytest.mark.parametrize("kind", [1, 3])
def test_norm_finalize_many_partials(emu, kind, schedule):
    """3000 partials: each of the 1024 finalise threads reduces several before the block
    reduction."""
    partials = torch.rand(3000) * 10

    def run():
        out = torch.empty(3)
        torch.ops.fused_lm.multi_tensor_norm_finalize_(partials, out, kind, 2.0, 1.0, 0)
        return out
    cpu, cuda = twin(emu, run)
    expected = partials.double().sum().sqrt() if kind == 1 else partials.max()
    assert_close(cuda[0], expected, torch.float32)
    if kind == 3:
        check([cpu], [cuda])


# ---- tables built by hand: chunk starts off the vector width, 64-bit offsets, no chunk -------

def table_ops(tables, dtype, step_table):
    """Scale, clamp and norm partials of list 0, then AdamW and Lion over every list, through the
    ops on the given tables; returns the partials."""
    ops = torch.ops.fused_lm
    one, zero = torch.ones(()), torch.zeros(())
    hp = torch.tensor([[1e-2, 0.9, 0.99, 1e-8, 0.1, 1.0, 0.0, 0.0]])
    t1, t4, t3 = tables
    ops.multi_tensor_scale_(t1.table, t1.chunks, t1.chunk_size, dtype, torch.tensor(1.25), 0)
    ops.multi_tensor_clamp_(t1.table, t1.chunks, t1.chunk_size, dtype, -2.0, 2.0, 0)
    partials = torch.empty(t1.n_chunks)
    ops.multi_tensor_norm_partials_(t1.table, t1.chunks, t1.chunk_size, dtype, partials, 3, 2.0, 0)
    ops.multi_tensor_adamw_(t4.table, t4.chunks, t4.chunk_size, step_table, hp, one, zero, 4, dtype,
                            dtype, False, False, False, 7, 0)
    ops.multi_tensor_lion_(t3.table, t3.chunks, t3.chunk_size, step_table, hp, one, zero, 3, dtype,
                           dtype, False, dtype == torch.bfloat16, 7, 0)
    return partials


@pytest.mark.parametrize("chunk_size", [1001, 66, 4099])
@pytest.mark.parametrize("dtype", DTYPES)
def test_chunk_starts_off_the_vector_width(emu, dtype, chunk_size, schedule):
    """Chunk sizes that are no multiple of the 4-element vector: aligned tensors whose chunks
    start misaligned must take the scalar path for those chunks."""
    def run():
        lists = [[torch.randn(n).to(dtype) for n in (5000, 3, 2 * chunk_size)] for _ in range(4)]
        steps = [torch.zeros(()) for _ in range(3)]
        step_table = torch.tensor([s.data_ptr() for s in steps])
        tables = [mt.build_table(lists[:k], chunk_size=chunk_size) for k in (1, 4, 3)]
        partials = table_ops(tables, dtype, step_table)
        return [t for lst in lists for t in lst] + steps + [partials]
    check(*twin(emu, run))


SHIFT = 3 << 31   # elements claimed before the real ones: > 2**32, so int32 and uint32 both wrap


@pytest.fixture
def device_memory(emu):
    """torch tensors over emu_device_alloc memory (64 GiB unmapped below): alloc(n, dtype)."""
    held = []

    def alloc(n, dtype):
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        ptr = emu.device_alloc(nbytes)
        held.append((ptr, nbytes))
        return torch.frombuffer((C.c_uint8 * nbytes).from_address(ptr), dtype=dtype).normal_()
    yield alloc
    for ptr, nbytes in held:
        emu.device_free(ptr, nbytes)


def shifted(table: mt.TensorTable, shift: int, dtype) -> mt.TensorTable:
    """``table`` with every tensor claiming ``shift`` more elements in front of its data: the
    addresses move back by ``shift`` elements and every chunk forward, so the kernels compute
    64-bit element indices >= ``shift`` and touch only the real tensors."""
    host = table.table.clone()
    size = torch.empty((), dtype=dtype).element_size()
    host[:, :table.lists] -= shift * size
    host[:, table.lists] += shift
    chunks = table.chunks.clone()
    chunks[:, 1] += shift
    return mt.TensorTable(host, chunks, table.n_chunks, table.chunk_size, table.lists)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_64bit_element_offsets(emu, dtype, device_memory):
    """Tensors whose table entries claim 3 * 2**31 + n elements (without allocating them)."""
    def run():
        lists = [[device_memory(n, dtype) for n in (2 * mt.CHUNK + 77, 5)] for _ in range(4)]
        steps = [torch.zeros(()) for _ in range(2)]
        step_table = torch.tensor([s.data_ptr() for s in steps])
        tables = [shifted(mt.build_table(lists[:k]), SHIFT, dtype) for k in (1, 4, 3)]
        partials = table_ops(tables, dtype, step_table)
        return [t.clone() for lst in lists for t in lst] + steps + [partials]
    check(*twin(emu, run))


def test_no_chunks(emu):
    """Every launcher with an empty table launches nothing (a zero-block grid is an invalid
    configuration on a GPU); the finalise of no partials is the empty norm."""
    empty = mt.build_table([[torch.zeros(0)] for _ in range(4)])
    assert empty.n_chunks == 0
    steps = torch.zeros(())
    with cuda_kernels(emu):
        table_ops([mt.TensorTable(empty.table[:, [0, 4, 5]], empty.chunks, 0, empty.chunk_size, 1),
                   empty,
                   mt.TensorTable(empty.table[:, [0, 1, 2, 4, 5]], empty.chunks, 0,
                                  empty.chunk_size, 3)],
                  torch.float32, torch.tensor([steps.data_ptr()]))
        out = torch.empty(3)
        torch.ops.fused_lm.multi_tensor_norm_finalize_(torch.empty(0), out, 1, 2.0, 1.0, 0)
    assert out.tolist() == [0.0, 1.0, 0.0]
    assert float(steps) == 2.0   # AdamW's and Lion's step increments ran


# ---- the emulator itself ---------------------------------------------------------------------

def selftest(emu, name, grid=(1, 1, 1), block=(32, 1, 1), smem=0, args=(0, 0, 0), out=None):
    """Runs the kernel ``name`` of csrc/emu/selftest.cu; raises EmulatorError on a report."""
    out = torch.zeros(4096, dtype=torch.int32) if out is None else out
    emu.call("emu_selftest", [C.c_char_p, C.POINTER(C.c_uint), C.POINTER(C.c_uint), C.c_int,
                              C.POINTER(C.c_int), C.c_void_p],
             name.encode(), (C.c_uint * 3)(*grid), (C.c_uint * 3)(*block), smem,
             (C.c_int * 3)(*args), out.data_ptr())
    return out


def ptx_source_lane(mode: str, lane: int, b: int, width: int) -> int:
    """shfl.sync's source lane (PTX ISA): CUDA passes c = ((32 - width) << 8) | clamp with clamp
    0 for up and 31 otherwise; a source out of range gives the lane its own value."""
    seg, clamp, b = (32 - width) & 31, 0 if mode == "up" else 31, b & 31
    max_lane = (lane & seg) | (clamp & ~seg)
    if mode == "idx":
        j = (lane & seg) | (b & ~seg)
    else:
        j = {"up": lane - b, "down": lane + b, "xor": lane ^ b}[mode]
    in_range = j >= max_lane if mode == "up" else j <= max_lane
    return j if in_range else lane


@pytest.mark.parametrize("width", [32, 16, 8, 1])
def test_shuffle_lane_rules(emu, width):
    for m, mode in enumerate(("idx", "up", "down", "xor", "xor")):
        for b in (0, 1, 3, 8, 16, 31, 33):
            out = selftest(emu, "shuffle", block=(64, 1, 1), args=(m, b, width),
                           out=torch.zeros(64, dtype=torch.float64))
            expected = [32 * (t // 32) + ptx_source_lane(mode, t % 32, b, width) + 0.25 * (m == 4)
                        for t in range(64)]
            assert out.tolist() == expected, (mode, b, width)
    # The CUDA programming guide's example of width < 32: groups of `width` lanes may read from
    # earlier groups but not later ones (xor 16, width 16: lanes 16..31 read lanes 0..15).
    out = selftest(emu, "shuffle", args=(3, 16, 16), out=torch.zeros(32, dtype=torch.float64))
    assert out.tolist() == list(range(16)) + list(range(16))


def test_votes(emu):
    out = selftest(emu, "vote", block=(64, 1, 1)).view(torch.uint32)[:256].reshape(64, 4).long()
    p = [int((t * 7 + 3) % 5 < 2) for t in range(64)]
    for t in range(64):
        w = 32 * (t // 32)
        ballot = sum(p[w + j] << j for j in range(32))
        assert out[t, 0] == ballot
        assert out[t, 1] == int(w == 32)           # lane 8 of warp 1 votes
        assert out[t, 2] == int(w == 0 or all(p[w:w + 32]))
        assert out[t, 3] == (ballot & 0xFFFF if t % 32 < 16 else 0)


@pytest.mark.parametrize("block", [(8, 4, 3), (32, 32, 1), (1, 1, 1)])
def test_block_barriers(emu, block, schedule):
    n = block[0] * block[1] * block[2]
    out = selftest(emu, "block", grid=(2, 1, 1), block=block)[:8].reshape(2, 4)
    assert out.tolist() == [[(n + 2) // 3, 1, 1, n * (n - 1) // 2]] * 2


def test_atomics(emu, schedule):
    out = selftest(emu, "atomic", grid=(3, 1, 1), block=(64, 1, 1))[:8]
    assert out[[0, 1, 2, 3, 5, 6]].tolist() == [192, 191, -191, -1, 7, 3]
    assert out[4:5].view(torch.float32).item() == 96.0


def test_missing_barrier_shows(emu):
    """No barrier between a shared-memory write and another thread's read: in thread order every
    thread but the last reads its neighbour's slot before it is written (0xffffffff), a shuffled
    order gives other values."""
    try:
        emu.set_shuffle(0)
        out = selftest(emu, "race", block=(64, 1, 1))[:64].tolist()
        emu.set_shuffle(5)
        shuffled = selftest(emu, "race", block=(64, 1, 1))[:64].tolist()
    finally:
        emu.set_shuffle(SHUFFLE)
    assert out == [-1] * 63 + [0]
    assert shuffled != out and set(shuffled) - {-1} <= set(range(64))


def test_lanes_outside_the_group_read_as_poison(emu):
    """Lanes named in the mask that exited, or do not exist (48 threads: warp 1 has 16), take no
    part (allowed by CUDA); a lane reading one gets all-ones bits (-1 as an int)."""
    out = selftest(emu, "exited_lane")[:32].tolist()
    assert out == [t ^ 1 for t in range(32)][:2] + [-1, 0] + [t ^ 1 for t in range(4, 32)]
    out = selftest(emu, "missing_lane", block=(48, 1, 1))[:48].tolist()
    assert out == list(range(1, 32)) + [31] + list(range(33, 48)) + [-1]


SITE = r"csrc/emu/selftest\.cu:\d+"
ANON = r"\{anonymous\}"   # GCC's name of the anonymous namespace
REPORTS = [
    ("divergent_barrier", (64, 1, 1), 719,
     rf"thread \(5, 0, 0\): barrier divergence: this thread exited while 63 threads wait at "
     rf"__syncthreads \({SITE}\)"),
    ("two_barriers", (64, 1, 1), 719, rf"waits at __syncthreads \({SITE}\) while thread "
     rf"\(0, 0, 0\) waits at __syncthreads \({SITE}\)"),
    ("outside_mask", (32, 1, 1), 719,
     r"mask 0x0000ffff does not name the calling lane (1[6-9]|2\d|3[01])\b"),
    ("mask_mismatch", (32, 1, 1), 719, rf"__ballot_sync \({SITE}\) with mask 0xffffffff: lane 0 "
     rf"\(thread \(0, 0, 0\)\) waits at __ballot_sync \({SITE}\) with mask 0x0000ffff"),
    ("bad_width", (32, 1, 1), 719, r"width 24 is not a power of two"),
    ("deadlock", (32, 1, 1), 719,
     rf"__shfl_sync \({SITE}\) with mask 0xffffffff: lane 0 \(thread \(0, 0, 0\)\) waits at "
     rf"__syncthreads \({SITE}\) instead"),
    ("bounded", (256, 1, 1), 701,
     r"256 threads per block, over the kernel's __launch_bounds__\(128\)"),
    ("big_shared", (32, 1, 1), 701,
     rf"__shared__ at {SITE}: 40960 more bytes, 57376 in all with 16384 dynamic, over the 48 KiB"),
]


@pytest.mark.parametrize("name,block,code,pattern", REPORTS, ids=[r[0] for r in REPORTS])
def test_reports(emu, name, block, code, pattern):
    with pytest.raises(emulator.EmulatorError) as err:
        selftest(emu, name, block=block, smem=16384 if name == "big_shared" else 0)
    assert err.value.code == code
    assert re.search(rf"kernel {ANON}::{name}_kernel \(launched at {SITE}\)",
                     err.value.report), err.value.report
    assert re.search(pattern, err.value.report), err.value.report


LIMITS = [((1, 1, 1), (1025, 1, 1), 0, 9), ((1, 1, 1), (1, 1, 65), 0, 9),
          ((1, 1, 1), (32, 33, 1), 0, 9), ((2 ** 31, 1, 1), (1, 1, 1), 0, 9),
          ((1, 65536, 1), (1, 1, 1), 0, 9), ((1, 1, 65536), (1, 1, 1), 0, 9),
          ((0, 1, 1), (32, 1, 1), 0, 9), ((1, 1, 1), (32, 1, 1), 48 * 1024 + 1, 1),
          ((1, 65535, 1), (1, 1, 1), 0, 0), ((1, 1, 1), (1024, 1, 1), 48 * 1024, 0),
          ((1, 1, 1), (1, 1, 64), 0, 0)]


@pytest.mark.parametrize("grid,block,smem,code", LIMITS)
def test_launch_limits(emu, grid, block, smem, code):
    """sm_90's limits: 1024 threads (z <= 64), grid.x < 2**31, grid.y/z <= 65535, 48 KiB of
    shared memory without opt-in; the last three launches are at the limits and run."""
    if code == 0:
        selftest(emu, "empty", grid, block, smem)
        return
    with pytest.raises(emulator.EmulatorError) as err:
        selftest(emu, "empty", grid, block, smem)
    assert err.value.code == code
    assert "invalid configuration" in err.value.report or "shared memory" in err.value.report


# A process that loads an emulator library and runs one launch (no torch: starts in ~0.1 s).
DRIVER = r"""
import ctypes as C, sys
lib = C.CDLL(sys.argv[1])
lib.emu_device_alloc.restype = C.c_void_p
lib.emu_device_alloc.argtypes = [C.c_size_t]
what = sys.argv[2]
if what == "selftest":
    x = lib.emu_device_alloc(4096)
    u3 = C.c_uint * 3
    code = lib.emu_selftest(sys.argv[3].encode(), u3(1, 1, 1), u3(32, 1, 1), 0,
                            (C.c_int * 3)(int(sys.argv[4]), 0, 0), C.c_void_p(x))
else:   # multi_tensor_scale: "odd" chunk starts, or "shifted" 64-bit offsets
    n, chunk, shift = 3 * 16384 + 6, 1001 if what == "odd" else 16384, 0   # last chunks: 109, 6
    if what == "shifted":
        shift = 3 << 31
    x = lib.emu_device_alloc(4 * n)
    table = (C.c_int64 * 3)(x - 4 * shift, n + shift, 0)
    starts = list(range(0, n, chunk))
    chunks = (C.c_int64 * (2 * len(starts)))(*[v for s in starts for v in (0, s + shift)])
    code = lib.emu_multi_tensor_scale(table, chunks, C.c_int64(1), C.c_int64(len(starts)),
                                      C.c_int64(chunk), 0, C.byref(C.c_float(2.0)))
print("returned", code, flush=True)
"""


def run_driver(lib, *args, env=None):
    return subprocess.run([sys.executable, "-c", DRIVER, str(lib), *args], capture_output=True,
                          text=True, timeout=120, env=env)


FAULTS = [
    ("out_of_bounds", 1024,
     r"Segmentation fault.*?out_of_bounds_kernel.*? at \S*csrc/emu/selftest\.cu:\d+"),
    ("misaligned", 0, r"misaligned address .* for type 'const struct float4'.*16 byte alignment"),
    ("overflow", 100000, r"stack pointer is below its stack: a stack overflow"),
]


@pytest.mark.parametrize("name,arg,pattern", FAULTS, ids=[f[0] for f in FAULTS])
def test_faults_are_reported(emu, name, arg, pattern):
    """A fault ends the process after naming the kernel, block, thread and file:line."""
    r = run_driver(emu.path, "selftest", name, str(arg))
    assert r.returncode != 0, r.stdout + r.stderr
    assert re.search(rf"emu: kernel {ANON}::{name}_kernel \(launched at "
                     rf"{SITE}\), block \(0, 0, 0\), thread \(\d+, 0, 0\)", r.stderr), r.stderr
    assert re.search(pattern, r.stderr, re.S), r.stderr


# ---- packaging, and the sanitizer run ---------------------------------------------------------

def test_not_in_the_wheel():
    """setup.py builds csrc/cpu and csrc/cuda only: no emulator source reaches the wheel."""
    sources = [src for ext in emulator.extensions() for src in ext.sources]
    assert sources and not [src for src in sources if "emu" in Path(src).parts]


def test_builds_do_not_contract():
    """The premise of the bit-for-bit checks: the CPU extension's flags, which the emulated
    kernels get too, forbid implicit FMA contraction and value-changing math options (setup.py;
    nvcc's --fmad=false is the CUDA build's counterpart)."""
    flags = emulator.cpu_fp_flags()
    assert [f for f in flags if f.startswith("-ffp-contract=")][-1:] == ["-ffp-contract=off"], flags
    assert not [f for f in flags
                if re.match(r"-f(fast-math|unsafe-math|associative-math|reciprocal-math)", f)]
    try:
        exts = emulator.extensions(cuda=True)   # the CUDA one where nvcc (and cudart) is
    except SystemExit:
        exts = []
    for ext in exts:
        if ext.name == "fused_lm._C_cuda":
            assert "--fmad=false" in ext.extra_compile_args["nvcc"]


@pytest.mark.skipif(VARIANT != "default", reason="runs from the default variant only")
def test_sanitizers_and_shuffled_order(emu):
    """This module again (but the fault and mutation tests), on a library built with
    AddressSanitizer and UBSan, with threads and blocks in a seeded random order."""
    lib = emulator.build("asan")
    env = dict(os.environ, LD_PRELOAD=emulator.asan_preload(), FUSED_LM_EMU_LIB=str(lib),
               FUSED_LM_EMU_VARIANT="asan", FUSED_LM_EMU_SHUFFLE=str(SEED),
               ASAN_OPTIONS="detect_leaks=0", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p",
                        "no:cacheprovider", "-k", "not faults and not mutation and not sanitizers"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-6000:]
    assert re.search(r"\d+ passed", r.stdout), r.stdout[-2000:]


# ---- mutations the emulation must catch -------------------------------------------------------

APPLY = "csrc/include/fused_lm/multi_tensor_apply.cuh"
NORM = "csrc/cuda/multi_tensor_norm.cu"
SCALE = "csrc/cuda/multi_tensor_scale.cu"
# (id, file, text, replacement, the one unit to build, how it must show: "fault:<driver
# table>:<stderr pattern>" (the "asan-fault" ones on the ASan build: a read past the end that
# stays within the last page is invisible to the default build), "wrong:<case>" or
# "report:<pattern>"). The issue's "wrong grid
# stride": no kernel has a grid-stride loop (one block per chunk), so the nearest real stride is
# the block's step through its chunk. Its "missing __syncthreads" and "wrong shuffle offset" are
# in the norm's block reduction, the only kernel code with a barrier and shuffles.
MUTATIONS = [
    ("alignment-check-ignores-chunk-start", APPLY,
     "static_cast<const Ts*>(c.ptr(I)) + c.begin)", "static_cast<const Ts*>(c.ptr(I)))", SCALE,
     r"fault:odd:multi_tensor_apply\.cuh:\d+:\d+: runtime error: .* misaligned address .* for "
     r"type 'const struct Vec', which requires 16 byte alignment"),
    ("32-bit-element-index", APPLY, "for (int64_t i = c.begin + int64_t(threadIdx.x) * kILP;",
     "for (int i = c.begin + int(threadIdx.x) * kILP;", SCALE,
     r"fault:shifted:Segmentation fault.*?multi_tensor_apply_kernel<flm::ScaleOp, float>.*? at "
     r"\S*csrc/include/fused_lm/multi_tensor_apply\.cuh:\d+"),
    ("scalar-tail-reads-one-past-the-end", APPLY, "    if (j < c.end) {", "    if (j <= c.end) {",
     SCALE, r"asan-fault:odd:ERROR: AddressSanitizer: use-after-poison.*?"
     r"multi_tensor_apply_kernel<flm::ScaleOp, float>"),
    ("wrong-block-stride", APPLY, "const int64_t stride = int64_t(blockDim.x) * kILP;",
     "const int64_t stride = int64_t(blockDim.x);", SCALE, "wrong:scale"),
    ("missing-syncthreads", NORM, "  if (lane == 0) warp_out[warp] = v;\n  __syncthreads();\n",
     "  if (lane == 0) warp_out[warp] = v;\n", NORM, "wrong:norm"),
    ("wrong-shuffle-offset", NORM, "for (int off = 16; off > 0; off >>= 1)",
     "for (int off = 8; off > 0; off >>= 1)", NORM, "wrong:norm"),
    ("syncthreads-in-divergent-code", NORM, "  __syncthreads();\n  if (warp == 0) {\n",
     "  if (warp == 0) {\n  __syncthreads();\n", NORM,
     r"report:barrier divergence: this thread exited while 32 threads wait at __syncthreads "
     r"\(csrc/cuda/multi_tensor_norm\.cu:\d+\)"),
    ("shuffle-mask-misses-lanes", NORM, "__shfl_xor_sync(0xffffffffu, v, off)",
     "__shfl_xor_sync(0x0000ffffu, v, off)", NORM,
     r"report:__shfl_xor_sync \(csrc/cuda/multi_tensor_norm\.cu:\d+\): mask 0x0000ffff does not "
     r"name the calling lane 16"),
]


def _mutant_case(emu, what: str):
    if what == "scale":
        def run():
            ts = [torch.randn(n) for n in (40000, 4097)]
            multi_tensor_scale_(ts, torch.tensor(1.5), backend="cpu")
            return ts
    else:
        def run():
            ts = [torch.randn(n) for n in (40000, 4097)]
            return list(multi_tensor_norm(ts, 2.0, 1.0, backend="cpu"))
    cpu, cuda = twin(emu, run)
    if what == "norm":
        assert_close(cuda[0], cpu[0], torch.float32)
    else:
        check(cpu, cuda)


@pytest.mark.parametrize("path,old,new,unit,expect", [m[1:] for m in MUTATIONS],
                         ids=[m[0] for m in MUTATIONS])
def test_mutation_is_caught(emu, path, old, new, unit, expect):
    """Each mutation of the real kernel source (a temporary copy, built alone with the emulator)
    is caught as the expected fault, wrong result or report; the same check passes unmutated."""
    kind, _, rest = expect.partition(":")
    if kind.endswith("fault"):
        variant, lib, env = VARIANT, emu.path, None
        if kind == "asan-fault":
            variant, lib = "asan", emulator.build("asan")
            env = dict(os.environ, LD_PRELOAD=emulator.asan_preload(),
                       ASAN_OPTIONS="detect_leaks=0")
        mutant = emulator.build(variant, mutations=[(path, old, new)], units=[unit])
        table, _, pattern = rest.partition(":")
        assert run_driver(lib, table, env=env).returncode == 0
        r = run_driver(mutant, table, env=env)
        assert r.returncode != 0, r.stdout + r.stderr
        assert re.search(pattern, r.stderr, re.S), r.stderr
        assert re.search(r"emu: kernel flm::multi_tensor_apply_kernel<ScaleOp, float> "
                         r"\(launched at csrc/include/fused_lm/multi_tensor_apply\.cuh:\d+\), "
                         r"block \(\d+, 0, 0\), thread \(\d+, 0, 0\)", r.stderr), r.stderr
        return
    mutant = emulator.Emulator(emulator.build(VARIANT, mutations=[(path, old, new)], units=[unit]))
    case = "norm" if unit == NORM else "scale"
    _mutant_case(emu, case)
    if kind == "wrong":
        with pytest.raises(AssertionError):
            _mutant_case(mutant, rest)
    else:
        with pytest.raises(emulator.EmulatorError) as err:
            _mutant_case(mutant, case)
        assert re.search(rest, err.value.report), err.value.report
