"""Multi-tensor clamp: ``x_i = min(max(x_i, lo), hi)`` in place, one launch per (device, dtype).

The kernel of ``clip_grad_value_`` on every backend over the same tensor table
(ops/_multi_tensor.py):

* Triton: one program per chunk of CHUNK elements, BLOCK elements per iteration.
* CUDA C++: csrc/cuda/multi_tensor_clamp.cu (ClampOp of csrc/include/fused_lm/multi_tensor_clamp.h
  over multi_tensor_apply.cuh).
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
from fused_lm.ops._spec import MULTI_TENSOR_GPU_DEFAULT_WHY, FamilySpec, TensorList

SPEC = FamilySpec(
    name="multi_tensor_clamp", backends=("cuda", "triton", "cpu", "torch"), gpu_default="cuda",
    gpu_default_why=MULTI_TENSOR_GPU_DEFAULT_WHY,
    reference="fused_lm.reference.multi_tensor_clamp:multi_tensor_clamp",
    lists=(TensorList("x", "param"),))

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux dependency
    triton = None

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


def multi_tensor_clamp_(tensors: Sequence[torch.Tensor] | mt.TensorBatch, lo: float, hi: float, *,
                        backend: str | None = None) -> None:
    """Clamps every tensor of ``tensors`` (a list or a ``TensorBatch``) to ``[lo, hi]`` in place
    (clamp_min then clamp_max). Non-contiguous tensors are clamped through the torch path."""
    batch = mt.TensorBatch.of(tensors)
    lo, hi = float(lo), float(hi)
    for b in batch.buckets("multi_tensor_clamp", backend):
        if b.tensors:
            torch._foreach_clamp_min_(b.tensors, lo)
            torch._foreach_clamp_max_(b.tensors, hi)
        if b.table is not None:
            _launch(b.backend, b.dtype, lo, hi, b.table)


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
