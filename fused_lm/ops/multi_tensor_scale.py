"""Multi-tensor scale: ``x_i *= s`` for every tensor of a list, in one launch per dtype.

The first op of the multi-tensor family (the building block of gradient unscaling and clipping),
implemented on every backend over the same tensor table (ops/_multi_tensor.py):

* Triton: one program per chunk of CHUNK elements, BLOCK elements per iteration.
* CUDA C++: csrc/cuda/multi_tensor_scale.cu (ScaleOp over multi_tensor_apply.cuh).
* CPU C++: csrc/cpu/multi_tensor_scale.cpp (the same ScaleOp under OpenMP).
* torch: ``torch._foreach_mul_``.

Memory traffic: 2 * numel * itemsize bytes (each element read once and written once).
The scale ``s`` may be a Python float or a one-element tensor on the tensors' device; a tensor is
read by the kernel, so a scale computed on the GPU costs no host synchronisation.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fused_lm import _backend, _ext
from fused_lm.ops import _multi_tensor as mt
from fused_lm.ops._spec import MULTI_TENSOR_GPU_DEFAULT_WHY, FamilySpec, TensorList

SPEC = FamilySpec(
    name="multi_tensor_scale", backends=("cuda", "triton", "cpu", "torch"), gpu_default="cuda",
    gpu_default_why=MULTI_TENSOR_GPU_DEFAULT_WHY,
    reference="fused_lm.reference.multi_tensor_scale:multi_tensor_scale",
    lists=(TensorList("x", "param"),))

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux dependency
    triton = None

if triton is not None:

    @triton.jit
    def _scale_kernel(table_ptr, chunks_ptr, scale_ptr, DTYPE: tl.constexpr,
                      ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        # One program per chunk: look up which tensor and which slice, then stream through it,
        # full blocks unmasked, then the masked tail (ops/_multi_tensor.py: vector access).
        _, row, begin, end = mt.chunk_of(table_ptr, chunks_ptr, 1, CHUNK)   # row: addr, numel, group
        x_ptr = mt.list_ptr(row, 0, DTYPE, ALIGNED)
        s = tl.load(scale_ptr)
        n_full = (end - begin) // BLOCK * BLOCK
        for phase in tl.static_range(2):
            for i in range(0 if phase == 0 else n_full, n_full if phase == 0 else end - begin, BLOCK):
                offs = begin + i + tl.arange(0, BLOCK)                      # int64: begin is int64
                mask = offs < end
                x = mt.load(x_ptr + offs, mask, phase == 1)
                mt.store(x_ptr + offs, (x.to(tl.float32) * s).to(DTYPE), mask, phase == 1)


# BLOCK 1024 elements x 16 iterations = one CHUNK per program. Not yet tuned on a GPU.
_BLOCK = 1024


def _check_scale(scale: float | torch.Tensor) -> float | torch.Tensor:
    """A Python float, or a float32 0-d tensor where it is (no host synchronisation)."""
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must be a number or a one-element tensor, got shape {tuple(scale.shape)}")
        if scale.is_complex():
            raise TypeError("scale must be real, got a complex tensor")
        return scale.reshape(()).to(torch.float32)
    return float(scale)


def multi_tensor_scale_(tensors: Sequence[torch.Tensor] | mt.TensorBatch, scale: float | torch.Tensor,
                        *, backend: str | None = None) -> None:
    """Multiplies every tensor in ``tensors`` (a list or a ``TensorBatch``) by ``scale`` in
    place, one launch per (device, dtype). Non-contiguous tensors are scaled through the torch
    path. A tensor ``scale`` on another device than a bucket's is copied there (non-blocking),
    as torch's clip_grads_with_norm_ moves its coefficient."""
    batch = mt.TensorBatch.of(tensors)
    scale = _check_scale(scale)
    on: dict = {}     # device -> the scale there, as the float32 0-d tensor the kernels read
    for b in batch.buckets("multi_tensor_scale", backend):
        s = on.get(b.device)
        if s is None:
            if not isinstance(scale, torch.Tensor):
                s = torch.full((), scale, dtype=torch.float32, device=b.device)
            else:
                s = scale if scale.device == b.device else scale.to(b.device, non_blocking=True)
            on[b.device] = s
        if b.tensors:
            torch._foreach_mul_(b.tensors, s)
        if b.table is not None:
            _launch(b.backend, b.dtype, s, b.table)


def _launch(which: str, dtype: torch.dtype, s: torch.Tensor, table: mt.TensorTable) -> None:
    if which != "triton":
        _ext.cuda_ext() if which == "cuda" else _ext.cpu_ext()
    if table.n_chunks == 0:
        return
    if which == "triton":
        _scale_kernel[mt.launch_grid(table)](table.table, table.chunks, s, DTYPE=mt.tl_dtype(dtype),
                                             ALIGNED=table.aligned, CHUNK=table.chunk_size,
                                             BLOCK=_BLOCK, **mt.LAUNCH_OPTIONS)
    else:
        torch.ops.fused_lm.multi_tensor_scale_(table.table, table.chunks, table.chunk_size, dtype,
                                               s, _ext.cuda_stream(s.device))
