"""Multi-tensor clamp: ``x_i = min(max(x_i, lo), hi)`` in place, one launch per (device, dtype).

The kernel of ``clip_grad_value_`` on every backend over the same tensor table
(ops/_multi_tensor.py):

* Triton: one program per chunk of CHUNK elements, BLOCK elements per iteration.
* CUDA C++: csrc/cuda/multi_tensor_clamp.cu (ClampOp of norm_functors.h over multi_tensor_apply.cuh).
* CPU C++: csrc/cpu/multi_tensor_clamp.cpp (the same ClampOp under OpenMP).
* torch: ``torch._foreach_clamp_min_`` then ``torch._foreach_clamp_max_`` (what torch's
  clip_grad_value_ runs: two passes).

The order is torch's: clamp_min then clamp_max, so ``lo > hi`` gives ``hi`` everywhere, and NaN
stays NaN. The bounds are rounded to float32, then the result to the storage dtype.
Memory traffic: 2 * numel * itemsize bytes (one read, one write; torch's foreach path moves twice
that).
"""

from __future__ import annotations

from typing import Sequence

import torch

from fused_lm import _backend, _ext
from fused_lm.ops import _multi_tensor as mt
from fused_lm.ops._spec import FamilySpec, TensorList

SPEC = FamilySpec(
    name="multi_tensor_clamp", backends=("cuda", "triton", "cpu", "torch"), gpu_default="cuda",
    gpu_default_why=("not yet measured on a GPU: as multi_tensor_scale, the CUDA C++ kernel issues 16-byte vector "
                     "accesses with several loads in flight per thread, which one Triton program "
                     "per chunk does not express; revisit with bench/results of make gpu-check"),
    reference="fused_lm.reference.clip:clip_grad_value",
    lists=(TensorList("x", "param"),))

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux dependency
    triton = None

_cache = mt.TableCache()

if triton is not None:

    @triton.jit
    def _clamp_kernel(table_ptr, chunks_ptr, lo, hi, lo_q, hi_q, DTYPE: tl.constexpr,
                      ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        # Compare with the float32 bounds, store the bounds already rounded to DTYPE (lo_q, hi_q,
        # exact in DTYPE): the result is an input element or a pre-rounded bound, so the final cast
        # is exact whatever the cast's rounding (the interpreter truncates float32 -> bfloat16).
        _, row, begin, end = mt.chunk_of(table_ptr, chunks_ptr, 1, CHUNK)   # row: addr, numel, group
        x_ptr = mt.list_ptr(row, 0, DTYPE, ALIGNED)
        n_full = (end - begin) // BLOCK * BLOCK
        for phase in tl.static_range(2):    # full blocks unmasked, then the tail (_multi_tensor.py)
            for i in range(0 if phase == 0 else n_full, n_full if phase == 0 else end - begin, BLOCK):
                offs = begin + i + tl.arange(0, BLOCK)
                mask = offs < end
                x = mt.load(x_ptr + offs, mask, phase == 1).to(tl.float32)
                x = tl.where(x < lo, lo_q, x)    # comparisons with NaN are false: NaN is kept
                x = tl.where(x > hi, hi_q, x)
                mt.store(x_ptr + offs, x.to(DTYPE), mask, phase == 1)


_BLOCK = 1024


def multi_tensor_clamp_(tensors: Sequence[torch.Tensor], lo: float, hi: float, *,
                        backend: str | None = None) -> None:
    """Clamps every tensor of ``tensors`` to ``[lo, hi]`` in place (clamp_min then clamp_max)."""
    tensors = list(tensors)
    info = mt.tensor_info(tensors)
    if info is None:
        mt.check_tensors(tensors)
    lo, hi = float(lo), float(hi)
    if info is not None:
        device = tensors[0].device if tensors else None
        for dtype, idx in mt.dtype_buckets(tensors, info):
            idx = idx[info[1, idx] > 0]
            if idx.size == 0:
                continue
            which = _backend.select("multi_tensor_clamp", device, dtype, backend)
            if which != "torch" and info[3, idx].all():   # all contiguous: table from info
                _launch(which, dtype, lo, hi, _cache.get_rows(info[0, idx], info[1, idx], device))
            else:
                _clamp_group(which, dtype, [tensors[i] for i in idx.tolist()], lo, hi)
        return
    for (device, dtype), idx in mt.bucket_by_dtype(tensors).items():
        group = [tensors[i] for i in idx if tensors[i].numel() > 0]
        if group:
            which = _backend.select("multi_tensor_clamp", device, dtype, backend)
            _clamp_group(which, dtype, group, lo, hi)




def _clamp_group(which: str, dtype: torch.dtype, group: list[torch.Tensor], lo: float, hi: float) -> None:
    """Clamps one (device, dtype) bucket of non-empty tensors: non-contiguous ones through torch."""
    dense = [t for t in group if t.is_contiguous()]
    strided = [t for t in group if not t.is_contiguous()]
    if which == "torch":
        dense, strided = [], group
    if strided:
        torch._foreach_clamp_min_(strided, lo)
        torch._foreach_clamp_max_(strided, hi)
    if dense:
        _launch(which, dtype, lo, hi, _cache.get([dense]))


def _launch(which: str, dtype: torch.dtype, lo: float, hi: float, table: mt.TensorTable) -> None:
    if which == "triton":
        lo_q, hi_q = (float(torch.tensor(b, dtype=torch.float32).to(dtype)) for b in (lo, hi))
        _clamp_kernel[mt.launch_grid(table)](table.table, table.chunks, lo, hi, lo_q, hi_q,
                                             DTYPE=mt.tl_dtype(dtype), ALIGNED=table.aligned,
                                             CHUNK=table.chunk_size, BLOCK=_BLOCK,
                                             **mt.LAUNCH_OPTIONS)
    else:
        _ext.cuda_ext() if which == "cuda" else _ext.cpu_ext()
        torch.ops.fused_lm.multi_tensor_clamp_(table.table, table.chunks, table.chunk_size, dtype,
                                               lo, hi, _ext.cuda_stream(table.table.device))
