"""Multi-tensor norm: the global p-norm of many tensors in a constant number of launches.

The norm of tensors x_1..x_n viewed as one vector (what ``torch.nn.utils.get_total_norm``
returns) is

    ||x||_p = (sum_i sum_j |x_ij|^p)^(1/p)     ||x||_inf = max |x_ij|     ||x||_-inf = min |x_ij|

Two passes over the tensor table (ops/_multi_tensor.py), whatever the number of tensors:

1. partials: one program (Triton) / block (CUDA) / OpenMP iteration (CPU) per chunk of CHUNK
   elements reduces its slice to ONE float32 (sum of |x|, of x^2, of |x|^p, or max/min of |x|)
   into a per-device ``partials`` buffer. Tensors of several dtypes on one device are one launch
   per dtype, each writing its own slice of the same buffer.
2. finalise: one program reduces the device's partials and writes ``out = [norm, coef, flag]``
   with ``coef = clamp(max_norm / (norm + 1e-6), max=1)``, the clip coefficient, and ``flag`` = 1
   when the norm is not finite (an optimizer step with ``max_grad_norm`` skips then, as with
   GradScaler's found_inf), so clipping needs no further small launch.

Accumulation is float32 for every storage dtype (bf16/fp16 values are widened on load); the
result is a float32 0-d tensor on the first tensor's device (float64 when a tensor is float64,
which only the torch path handles). Several devices: each device's norm is moved to the first
tensor's device and combined there, as torch does. No host synchronisation anywhere.

Bytes moved: numel * itemsize read + 4 bytes per chunk (the partials), i.e. the pass should run
at the device's read bandwidth. Per-element math: csrc/include/fused_lm/norm_functors.h, shared by
the CUDA and CPU kernels; the Triton kernel below writes the same formulas.

Not registered as a torch.library custom op: like torch's clip_grad_norm_ (a Python loop of
foreach calls) it runs outside compiled regions; under torch.compile it is a graph break.

Beyond torch: empty tensors are fine for every norm type (torch raises for the inf norm of an
empty tensor); ``norm_type=0`` (not a norm) follows torch's composition exactly: the number of
tensors that have a non-zero element (torch computes ``vector_norm(stack(per-tensor counts), 0)``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch

from fused_lm import _backend, _ext
from fused_lm.ops import _multi_tensor as mt
from fused_lm.ops._spec import FamilySpec, TensorList

SPEC = FamilySpec(
    name="multi_tensor_norm", backends=("cuda", "triton", "cpu", "torch"), gpu_default="cuda",
    gpu_default_why=("not yet measured on a GPU: as multi_tensor_scale, the CUDA C++ kernel issues 16-byte vector "
                     "accesses with several loads in flight per thread, which one Triton program "
                     "per chunk does not express; revisit with bench/results of make gpu-check"),
    reference="fused_lm.reference.clip:total_norm",
    lists=(TensorList("x", "param"),))

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux dependency
    triton = None

# Reduction kinds, as in csrc/include/fused_lm/norm_functors.h (NormKind).
SUM_ABS, SUM_SQ, SUM_POW, MAX_ABS, MIN_ABS = 0, 1, 2, 3, 4

_cache = mt.TableCache()

if triton is not None:

    @triton.jit
    def _combine(a, b, KIND: tl.constexpr):
        # NaN-propagating max / min (tl.maximum may drop NaN on a GPU); sums propagate it anyway.
        if KIND == 3:
            r = tl.where((a != a) | (a > b), a, b)
        elif KIND == 4:
            r = tl.where((a != a) | (a < b), a, b)
        else:
            r = a + b
        return r

    @triton.jit
    def _reduce(acc, KIND: tl.constexpr):
        if KIND == 3:
            r = tl.max(acc, axis=0)
            r = tl.where(tl.max((acc != acc).to(tl.int32), axis=0) > 0, float("nan"), r)
        elif KIND == 4:
            r = tl.min(acc, axis=0)
            r = tl.where(tl.max((acc != acc).to(tl.int32), axis=0) > 0, float("nan"), r)
        else:
            r = tl.sum(acc, axis=0)
        return r

    @triton.jit
    def _norm_partials_kernel(table_ptr, chunks_ptr, partials_ptr, p, DTYPE: tl.constexpr,
                              KIND: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
                              BLOCK: tl.constexpr):
        # One program per chunk: reduce x[begin : end] of one tensor to one float32, full blocks
        # unmasked, then the masked tail (ops/_multi_tensor.py: vector access).
        _, row, begin, end = mt.chunk_of(table_ptr, chunks_ptr, 1, CHUNK)   # row: addr, numel, group
        x_ptr = mt.list_ptr(row, 0, DTYPE, ALIGNED)
        if KIND == 4:
            acc = tl.full([BLOCK], float("inf"), tl.float32)
        else:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
        n_full = (end - begin) // BLOCK * BLOCK
        for phase in tl.static_range(2):
            for i in range(0 if phase == 0 else n_full, n_full if phase == 0 else end - begin, BLOCK):
                offs = begin + i + tl.arange(0, BLOCK)                      # int64: begin is int64
                mask = offs < end
                x = mt.load(x_ptr + offs, mask, phase == 1).to(tl.float32)
                if KIND == 1:
                    # acc + x^2 rounded once, as NormOp::accumulate (masked lanes load 0)
                    acc = tl.fma(x, x, acc)
                else:
                    a = tl.abs(x)
                    if KIND == 2:
                        # |x|^p = 2^(p log2|x|) (torch's pow is not IEEE-rounded either; on a
                        # GPU lg2/ex2 are the approximate instructions, ~2^-22 absolute in the
                        # exponent, i.e. ~1e-7 relative per term); masked lanes add 0 (0^p is
                        # inf for p < 0).
                        t = tl.exp2(p * tl.log2(a))
                        if phase == 1:
                            t = tl.where(mask, t, 0.0)
                    elif KIND == 4:
                        t = a
                        if phase == 1:
                            t = tl.where(mask, a, float("inf"))
                    else:
                        t = a                                               # masked lanes: |0| = 0
                    acc = _combine(acc, t, KIND)
        tl.store(partials_ptr + tl.program_id(0), _reduce(acc, KIND))

    @triton.jit
    def _norm_finalize_kernel(partials_ptr, n, out_ptr, p, max_norm, KIND: tl.constexpr,
                              BLOCK: tl.constexpr):
        # One program: reduce the n partials, take the root, and the clip coefficient
        # clamp(max_norm / (norm + 1e-6), max=1) evaluated as torch does (reciprocal, multiply;
        # a NaN norm keeps a NaN coefficient). IEEE-rounded sqrt and divisions (div_rn, sqrt_rn:
        # torch's are; Triton's default '/' and sqrt are approximate on a GPU).
        if KIND == 4:
            acc = tl.full([BLOCK], float("inf"), tl.float32)
        else:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, n, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            x = tl.load(partials_ptr + offs, mask=offs < n, other=0.0)
            if KIND == 4:
                x = tl.where(offs < n, x, float("inf"))
            acc = _combine(acc, x, KIND)
        r = _reduce(acc, KIND)
        if KIND == 1:
            norm = tl.math.sqrt_rn(r)
        elif KIND == 2:
            norm = tl.exp2(tl.math.div_rn(tl.log2(r), p))
        else:
            norm = r
        coef = tl.math.div_rn(1.0, norm + 1e-6) * max_norm
        coef = tl.where(coef > 1.0, 1.0, coef)
        tl.store(out_ptr, norm)
        tl.store(out_ptr + 1, coef)
        tl.store(out_ptr + 2, tl.where(norm - norm == 0.0, 0.0, 1.0))   # x - x: NaN iff NaN or inf


# BLOCK 1024 elements x 16 iterations = one CHUNK per program (as multi_tensor_scale). Not yet
# tuned on a GPU.
_BLOCK = 1024
_FINAL_BLOCK = 1024


def norm_kind(norm_type: float) -> tuple[int, float]:
    """(reduction kind, p) of a norm type; ``norm_type=0`` is not handled here (see _count_norm)."""
    p = float(norm_type)
    if math.isnan(p) or p == 0.0:
        raise ValueError(f"norm_type={norm_type!r} has no kernel reduction; expected a non-zero "
                         f"number or +-inf")
    if p == 1.0:
        return SUM_ABS, p
    if p == 2.0:
        return SUM_SQ, p
    if p == math.inf:
        return MAX_ABS, p
    if p == -math.inf:
        return MIN_ABS, p
    return SUM_POW, p


def empty_norm(p: float) -> float:
    """The norm of no elements at all: the reduction's identity after the root (0 for p > 0 and
    inf; inf for p < 0 and -inf, where every |x|^p term would be at least 0^(1/p))."""
    return 0.0 if p > 0 else math.inf


def clip_coef(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """clamp(max_norm / (norm + 1e-6), max=1) with torch ops, exactly as torch.nn.utils does."""
    return torch.clamp(float(max_norm) / (norm + 1e-6), max=1.0)




def _launch_partials(which: str, dtype: torch.dtype, kind: int, p: float, partials: torch.Tensor,
                     table: mt.TensorTable) -> None:
    if which == "triton":
        _norm_partials_kernel[mt.launch_grid(table)](table.table, table.chunks, partials, p,
                                                     DTYPE=mt.tl_dtype(dtype), KIND=kind,
                                                     ALIGNED=table.aligned, CHUNK=table.chunk_size,
                                                     BLOCK=_BLOCK, **mt.LAUNCH_OPTIONS)
    else:
        _ext.cuda_ext() if which == "cuda" else _ext.cpu_ext()
        torch.ops.fused_lm.multi_tensor_norm_partials_(table.table, table.chunks, table.chunk_size,
                                                       dtype, partials, kind, p,
                                                       _ext.cuda_stream(partials.device))


def _finalize(which: str, partials: torch.Tensor, kind: int, p: float, max_norm: float) -> torch.Tensor:
    out = torch.empty(3, dtype=torch.float32, device=partials.device)
    if which == "triton":
        _norm_finalize_kernel[(1,)](partials, partials.numel(), out, p, float(max_norm), KIND=kind,
                                    BLOCK=_FINAL_BLOCK, **mt.LAUNCH_OPTIONS)
    else:
        torch.ops.fused_lm.multi_tensor_norm_finalize_(partials, out, kind, p, float(max_norm),
                                                       _ext.cuda_stream(partials.device))
    return out


def _buckets(tensors: list[torch.Tensor], info, backend: str | None):
    """(device, dtype, route, non-empty tensors) per (device, dtype) bucket with an element; with
    ``info`` (mt.tensor_info: one device, all checked) the tensors of kernel routes whose tensors
    are all contiguous are not listed (None): the table is built from ``info``'s columns."""
    if info is None:
        for (device, dtype), idx in mt.bucket_by_dtype(tensors).items():
            group = [tensors[i] for i in idx if tensors[i].numel() > 0]
            if group:
                yield device, dtype, _backend.select("multi_tensor_norm", device, dtype, backend), group, None
        return
    device = tensors[0].device
    for dtype, idx in mt.dtype_buckets(tensors, info):
        idx = idx[info[1, idx] > 0]
        if idx.size == 0:
            continue
        which = _backend.select("multi_tensor_norm", device, dtype, backend)
        if which != "torch" and info[3, idx].all():
            yield device, dtype, which, None, (info[0, idx], info[1, idx])
        else:
            yield device, dtype, which, [tensors[i] for i in idx.tolist()], None


def _route_norms(tensors: list[torch.Tensor], kind: int, p: float, max_norm: float,
                 backend: str | None, info=None) -> list[torch.Tensor]:
    """One result per (device, route): a float32 (3,) tensor [norm, coef, flag] from each kernel route
    (one partials buffer and one finalise per device and backend), or a 0-d norm from the torch
    route (dtypes the kernels do not take, or backend="torch")."""
    routes: OrderedDict[tuple, list] = OrderedDict()
    for device, dtype, which, group, rows in _buckets(tensors, info, backend):
        routes.setdefault((device, which), []).append((dtype, group, rows))
    results = []
    for (device, which), buckets in routes.items():
        if which == "torch":
            for dtype, group, _ in buckets:
                acc = torch.float64 if dtype == torch.float64 else torch.float32
                norms = torch._foreach_norm(group, p, dtype=acc)
                results.append(torch.linalg.vector_norm(torch.stack(norms), p))
            continue
        tables, keep = [], []
        for _, group, rows in buckets:
            if rows is not None:
                tables.append(_cache.get_rows(rows[0], rows[1], device))
            else:
                # Reads only: a non-contiguous tensor is read through a contiguous copy (kept
                # alive until the launch).
                dense = [t if t.is_contiguous() else t.contiguous() for t in group]
                keep.append(dense)
                tables.append(_cache.get([dense]))
        partials = torch.empty(sum(t.n_chunks for t in tables), dtype=torch.float32, device=device)
        offset = 0
        for (dtype, _, _), table in zip(buckets, tables):
            _launch_partials(which, dtype, kind, p, partials[offset:offset + table.n_chunks], table)
            offset += table.n_chunks
        results.append(_finalize(which, partials, kind, p, max_norm))
    return results


def _count_norm(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """norm_type=0 as torch composes it: vector_norm(stack(per-tensor nonzero counts), 0), i.e.
    the number of tensors with at least one non-zero (or NaN) element, as float32."""
    counts = [torch.count_nonzero(t).to(device) for t in tensors if t.numel() > 0]
    if not counts:
        return torch.zeros((), dtype=torch.float32, device=device)
    return (torch.stack(counts) > 0).sum().to(torch.float32)


def nonfinite_flag(norm: torch.Tensor) -> torch.Tensor:
    """float32 0-d: 1 when ``norm`` is NaN or +-inf, else 0 (torch ops)."""
    return (~torch.isfinite(norm)).to(torch.float32)


def multi_tensor_norm_coef_flag(tensors: Sequence[torch.Tensor], norm_type: float = 2.0,
                                max_norm: float = 1.0, *, backend: str | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(global norm, clip coefficient, non-finite flag) of ``tensors`` as float32 0-d tensors on
    the first tensor's device (no host synchronisation). With one device and kernel dtypes the
    three come from the finalise launch; otherwise per-device norms are combined with torch ops.
    An empty list gives ``(tensor(0.), tensor(1.), tensor(0.))`` on the CPU, as torch's
    ``get_total_norm`` returns ``tensor(0.)``."""
    tensors = list(tensors)
    return norm_coef_flag_of(tensors, mt.tensor_info(tensors), norm_type, max_norm, backend=backend)


def norm_coef_flag_of(tensors: list[torch.Tensor], info, norm_type: float = 2.0,
                      max_norm: float = 1.0, *, backend: str | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``multi_tensor_norm_coef_flag`` of the list ``tensors`` with ``info`` =
    ``mt.tensor_info(tensors)`` already computed (None: the per-tensor checks and general path)."""
    if info is None:
        mt.check_tensors(tensors)
    if not tensors:
        norm = torch.zeros((), dtype=torch.float32)
        return norm, clip_coef(norm, max_norm), nonfinite_flag(norm)
    first = tensors[0].device
    p = float(norm_type)
    if p == 0.0:
        norm = _count_norm(tensors, first)
        return norm, clip_coef(norm, max_norm), nonfinite_flag(norm)
    kind, p = norm_kind(p)
    results = _route_norms(tensors, kind, p, max_norm, backend, info)
    if len(results) == 1 and results[0].dim() == 1 and results[0].device == first:
        return results[0][0], results[0][1], results[0][2]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    if not results:
        norm = torch.full((), empty_norm(p), dtype=dtype, device=first)
    else:
        norms = [r[0] if r.dim() == 1 else r for r in results]
        norm = torch.linalg.vector_norm(torch.stack([n.to(first, dtype) for n in norms]), p)
    return norm, clip_coef(norm, max_norm), nonfinite_flag(norm)


def multi_tensor_norm_and_coef(tensors: Sequence[torch.Tensor], norm_type: float = 2.0,
                               max_norm: float = 1.0, *, backend: str | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(global norm, clip coefficient): ``multi_tensor_norm_coef_flag`` without the flag."""
    return multi_tensor_norm_coef_flag(tensors, norm_type, max_norm, backend=backend)[:2]


def multi_tensor_norm(tensors: Sequence[torch.Tensor], norm_type: float = 2.0, *,
                      backend: str | None = None) -> torch.Tensor:
    """The p-norm of all ``tensors`` viewed as one vector: a float32 0-d tensor on the first
    tensor's device (see the module docstring for launches, dtypes and devices)."""
    return multi_tensor_norm_and_coef(tensors, norm_type, 1.0, backend=backend)[0]
