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
at the device's read bandwidth. Per-element math: csrc/include/fused_lm/multi_tensor_norm.h,
shared by the CUDA and CPU kernels; the Triton kernel below writes the same formulas.

One entry point, ``multi_tensor_norm(tensors, norm_type, max_norm, *, process_group, backend)``,
returns ``Norm(norm, coef, flag)``: every caller (get_total_norm, clip_grad_norm_, an optimizer's
``max_grad_norm``) reads the field it needs. Sharded tensors: a DTensor's local shard is reduced to
a partial norm, all-reduced over the mesh dimensions the DTensor is sharded on (sum of |x|^p, or
max / min for +-inf, then the root); plain tensors' partials over ``process_group`` when given
(ZeRO-style disjoint slices). fused_lm/optim/clip.py has the torch-signature wrappers.

Not registered as a torch.library custom op: like torch's clip_grad_norm_ (a Python loop of
foreach calls) it runs outside compiled regions; under torch.compile it is a graph break.

Beyond torch: empty tensors are fine for every norm type (torch raises for the inf norm of an
empty tensor); ``norm_type=0`` (not a norm) follows torch's composition exactly: the number of
tensors that have a non-zero element (torch computes ``vector_norm(stack(per-tensor counts), 0)``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import NamedTuple, Sequence

import torch

from fused_lm import _backend, _ext
from fused_lm.ops import _multi_tensor as mt
from fused_lm.ops._spec import MULTI_TENSOR_GPU_DEFAULT_WHY, FamilySpec, TensorList

SPEC = FamilySpec(
    name="multi_tensor_norm", backends=("cuda", "triton", "cpu", "torch"), gpu_default="cuda",
    gpu_default_why=MULTI_TENSOR_GPU_DEFAULT_WHY,
    reference="fused_lm.reference.multi_tensor_norm:total_norm",
    lists=(TensorList("x", "param"),))

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux dependency
    triton = None

# Reduction kinds, as in csrc/include/fused_lm/multi_tensor_norm.h (NormKind).
SUM_ABS, SUM_SQ, SUM_POW, MAX_ABS, MIN_ABS = 0, 1, 2, 3, 4

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


def _route_norms(batch: mt.TensorBatch, kind: int, p: float, max_norm: float,
                 backend: str | None) -> list[torch.Tensor]:
    """One result per (device, route): a float32 (3,) tensor [norm, coef, flag] from each kernel
    route (one partials buffer and one finalise per device and backend; non-contiguous tensors
    are read through contiguous copies), or a 0-d norm per dtype from the torch route (dtypes the
    kernels do not take, or backend="torch")."""
    routes: OrderedDict[tuple, list[mt.Bucket]] = OrderedDict()
    for b in batch.buckets("multi_tensor_norm", backend, copy_strided=True):
        routes.setdefault((b.device, b.backend), []).append(b)
    results = []
    for (device, which), buckets in routes.items():
        if which == "torch":
            for b in buckets:
                acc = torch.float64 if b.dtype == torch.float64 else torch.float32
                norms = torch._foreach_norm(b.tensors, p, dtype=acc)
                results.append(torch.linalg.vector_norm(torch.stack(norms), p))
            continue
        partials = torch.empty(sum(b.table.n_chunks for b in buckets), dtype=torch.float32,
                               device=device)
        offset = 0
        for b in buckets:
            _launch_partials(which, b.dtype, kind, p, partials[offset:offset + b.table.n_chunks],
                             b.table)
            offset += b.table.n_chunks
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


class Norm(NamedTuple):
    """What ``multi_tensor_norm`` returns, three 0-d tensors on the first tensor's device."""
    norm: torch.Tensor   # the global norm (float32; float64 when a tensor is float64)
    coef: torch.Tensor   # clamp(max_norm / (norm + 1e-6), max=1), the clip coefficient
    flag: torch.Tensor   # float32 1 when the norm is NaN or +-inf, else 0


def multi_tensor_norm(tensors: Sequence[torch.Tensor] | mt.TensorBatch, norm_type: float = 2.0,
                      max_norm: float = 1.0, *, process_group=None, backend: str | None = None
                      ) -> Norm:
    """``Norm(norm, coef, flag)`` of ``tensors`` (a list or a ``TensorBatch``: plain tensors or
    DTensors) viewed as one vector, as 0-d tensors on the first tensor's (local) device, with no
    host synchronisation. With one device and kernel dtypes the three come from the finalise
    launch; otherwise per-device norms are combined with torch ops. DTensors' partial norms are
    all-reduced over the mesh dimensions they are sharded on, plain tensors' over
    ``process_group`` when given (ZeRO-style sharding), else taken as global (single process,
    DDP). An empty list gives ``(tensor(0.), tensor(1.), tensor(0.))`` on the CPU, as torch's
    ``get_total_norm`` returns ``tensor(0.)``."""
    batch = mt.TensorBatch.of(tensors)
    p = float(norm_type)
    max_norm = float(max_norm)
    if batch.sharded or process_group is not None:
        norm = _sharded_norm(batch, p, max_norm, process_group, backend)
    else:
        norm = _local_norm(batch, p, max_norm, backend)
        if norm.dim() == 1:   # the finalise launch's [norm, coef, flag]
            return Norm(norm[0], norm[1], norm[2])
    return Norm(norm, clip_coef(norm, max_norm), nonfinite_flag(norm))


def _local_norm(batch: mt.TensorBatch, p: float, max_norm: float, backend: str | None
                ) -> torch.Tensor:
    """The norm of the batch's tensors on this process: the finalise launch's (3,) [norm, coef,
    flag] when one kernel route on the first device took every element, else a 0-d norm."""
    tensors = batch.tensors
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    first = tensors[0].device
    if p == 0.0:
        return _count_norm(tensors, first)
    kind, p = norm_kind(p)
    results = _route_norms(batch, kind, p, max_norm, backend)
    if len(results) == 1 and results[0].dim() == 1 and results[0].device == first:
        return results[0]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    if not results:
        return torch.full((), empty_norm(p), dtype=dtype, device=first)
    norms = [r[0] if r.dim() == 1 else r for r in results]
    return torch.linalg.vector_norm(torch.stack([n.to(first, dtype) for n in norms]), p)


# -- sharded tensors: FSDP2's DTensors, a process group over disjoint slices --------------------

def _shard_groups(batch: mt.TensorBatch, process_group) -> list[tuple[list, list]]:
    """(local tensors, process groups to all-reduce their partial norm over) per (device mesh,
    mesh dimensions a DTensor is sharded on), in order of first appearance; plain tensors form
    one group reduced over ``process_group`` (none without), which is there even when this rank
    holds no tensor, so that it still joins the all-reduce. ``Partial`` placements are first
    redistributed to ``Replicate`` (a partial sum's norm is not a part of the norm)."""
    groups: OrderedDict = OrderedDict()
    plain_pgs = [process_group] if process_group is not None else []
    for src, local in zip(batch.source, batch.tensors):
        if local is src:
            key, pgs = None, plain_pgs
        else:
            if any(pl.is_partial() for pl in src.placements):
                from torch.distributed.tensor import Replicate

                src = src.redistribute(src.device_mesh, [Replicate() if pl.is_partial() else pl
                                                         for pl in src.placements])
                local = mt.local_shard(src)
            dims = tuple(i for i, pl in enumerate(src.placements) if pl.is_shard())
            key = (id(src.device_mesh), dims)
            pgs = [src.device_mesh.get_group(d) for d in dims]
        groups.setdefault(key, ([], pgs))[0].append(local)
    if process_group is not None and None not in groups:
        groups[None] = ([], plain_pgs)
    return list(groups.values())


def _sharded_norm(batch: mt.TensorBatch, p: float, max_norm: float, process_group,
                  backend: str | None) -> torch.Tensor:
    """The global norm of sharded tensors: each group's local norm, all-reduced over its process
    groups, then the groups' norms combined on the first one's device."""
    if p == 0.0:
        raise NotImplementedError("norm_type=0 (torch's count of non-zero gradients) is not defined "
                                  "across shards; use a norm type p != 0")
    parts = []
    for local, pgs in _shard_groups(batch, process_group):
        norm = _local_norm(mt.TensorBatch(local), p, max_norm, backend)
        norm = norm[0] if norm.dim() == 1 else norm
        parts.append(_allreduce_norm(norm, p, pgs) if pgs else norm)
    if len(parts) == 1:
        return parts[0]
    first = parts[0].device
    dtype = torch.float64 if any(x.dtype == torch.float64 for x in parts) else torch.float32
    return torch.linalg.vector_norm(torch.stack([x.to(first, dtype) for x in parts]), p)


def _allreduce_norm(norm: torch.Tensor, p: float, groups: list) -> torch.Tensor:
    """Combines per-rank norms over ``groups`` into the norm of the union of the ranks' elements:
    the sum of p-th powers (then the root) for finite p, the max (min) for inf (-inf). NaN on any
    rank gives NaN everywhere (a flag travels with max/min, whose NaN handling is backend-defined)."""
    import torch.distributed as dist

    if math.isinf(p):
        nan = torch.isnan(norm)
        val = norm.masked_fill(nan, 0.0 if p > 0 else math.inf).reshape(1)
        flag = nan.to(norm.dtype).reshape(1)
        for g in groups:
            if p > 0:  # one message: the max of [norm, flag]
                buf = torch.cat([val, flag])
                dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=g)
                val, flag = buf[0:1], buf[1:2]
            else:
                dist.all_reduce(val, op=dist.ReduceOp.MIN, group=g)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=g)
        return torch.where(flag[0] > 0, torch.full_like(val[0], math.nan), val[0])
    power = (norm.double() if norm.dtype == torch.float64 else norm.float()).pow(p).reshape(1)
    for g in groups:
        dist.all_reduce(power, op=dist.ReduceOp.SUM, group=g)
    return power.pow(1.0 / p).reshape(()).to(norm.dtype)
