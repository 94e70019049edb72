"""Device-side tensor tables for multi-tensor kernels (layout: csrc/include/fused_lm/tensor_table.h).

A multi-tensor launch processes L parallel lists of tensors (params, grads, moments, ...) in ONE
kernel launch, whatever the number of tensors. The host writes, once, an int64 table

    table  (n_tensors, L + 2):  [addr_0, ..., addr_{L-1}, numel, group]
    chunks (n_chunks, 2):       [tensor index, first element]      (CHUNK elements per chunk)

and uploads it (pinned memory, non-blocking: no host synchronisation). One CUDA block, Triton
program or OpenMP iteration handles one chunk. The same two tables drive the Triton, CUDA and CPU
kernels, so there is no kernel-argument size ceiling and no per-tensor launch.

`TableCache` keeps the uploaded tables between calls and rebuilds them only when an address,
size or dtype changes (checking costs one ``data_ptr()`` per tensor; no device work).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

# Elements per chunk. 16384 elements give each 256-thread CUDA block 16 iterations of 4-wide
# vector accesses, and a 124M-parameter model ~7.6k chunks: enough to fill 132 SMs several times
# over while keeping the chunk table small. Not yet tuned on a GPU (no GPU session so far).
CHUNK = 16384


@dataclass
class TensorTable:
    table: torch.Tensor    # (n_tensors, L + 2) int64, on the tensors' device
    chunks: torch.Tensor   # (n_chunks, 2) int64, on the tensors' device
    n_chunks: int
    chunk_size: int
    lists: int
    _host: tuple = ()      # pinned host copies, kept alive until the async upload is done

    @property
    def n_tensors(self) -> int:
        return self.table.shape[0]


def check_lists(lists: Sequence[Sequence[torch.Tensor]]) -> None:
    """Every list has the same length, the i-th tensors have the same numel, and every tensor is
    dense, contiguous and on one device."""
    if not lists:
        raise ValueError("expected at least one tensor list")
    n = len(lists[0])
    for k, lst in enumerate(lists):
        if len(lst) != n:
            raise ValueError(f"tensor list {k} has {len(lst)} tensors, list 0 has {n}")
    device = lists[0][0].device if n else None
    for k, lst in enumerate(lists):
        for i, t in enumerate(lst):
            if t.layout != torch.strided:
                raise TypeError(f"tensor {i} of list {k} has layout {t.layout}; expected dense (strided) tensors")
            if not t.is_contiguous():
                raise ValueError(f"tensor {i} of list {k} is not contiguous; multi-tensor kernels need contiguous tensors")
            if t.device != device:
                raise ValueError(f"tensor {i} of list {k} is on {t.device}, expected {device}")
            if t.numel() != lists[0][i].numel():
                raise ValueError(f"tensor {i} of list {k} has {t.numel()} elements, "
                                 f"list 0 has {lists[0][i].numel()}")


def build_table(lists: Sequence[Sequence[torch.Tensor]], groups: Sequence[int] | None = None,
                chunk_size: int = CHUNK, device: torch.device | None = None) -> TensorTable:
    """Builds and uploads the tables for ``lists`` (assumed valid: see ``check_lists``)."""
    n = len(lists[0])
    n_lists = len(lists)
    device = device if device is not None else (lists[0][0].device if n else torch.device("cpu"))
    host = np.empty((n, n_lists + 2), dtype=np.int64)
    for k, lst in enumerate(lists):
        host[:, k] = [t.data_ptr() for t in lst]
    numel = np.fromiter((t.numel() for t in lists[0]), dtype=np.int64, count=n)
    host[:, n_lists] = numel
    host[:, n_lists + 1] = groups if groups is not None else 0
    per_tensor = (numel + chunk_size - 1) // chunk_size         # empty tensors get no chunk
    owner = np.repeat(np.arange(n, dtype=np.int64), per_tensor)
    first = np.cumsum(per_tensor) - per_tensor
    start = (np.arange(owner.size, dtype=np.int64) - np.repeat(first, per_tensor)) * chunk_size
    chunks = np.stack([owner, start], axis=1) if owner.size else np.zeros((0, 2), dtype=np.int64)
    table_h = torch.from_numpy(host)
    chunks_h = torch.from_numpy(np.ascontiguousarray(chunks))
    if device.type == "cpu":
        return TensorTable(table_h, chunks_h, chunks_h.shape[0], chunk_size, n_lists)
    table_h, chunks_h = table_h.pin_memory(), chunks_h.pin_memory()
    return TensorTable(table_h.to(device, non_blocking=True), chunks_h.to(device, non_blocking=True),
                       chunks_h.shape[0], chunk_size, n_lists, (table_h, chunks_h))


def table_key(lists: Sequence[Sequence[torch.Tensor]], groups=None) -> tuple:
    """What a table depends on: every address, size and dtype, and the group of each tensor."""
    return (tuple(tuple(t.data_ptr() for t in lst) for lst in lists),
            tuple(t.numel() for t in lists[0]),
            tuple(lst[0].dtype if lst else None for lst in lists),
            tuple(groups) if groups is not None else None)


class TableCache:
    """A small LRU of uploaded tables keyed by ``table_key``."""

    def __init__(self, size: int = 8):
        self._size = size
        self._tables: OrderedDict[tuple, TensorTable] = OrderedDict()

    def get(self, lists, groups=None, chunk_size: int = CHUNK) -> TensorTable:
        key = (table_key(lists, groups), chunk_size)
        table = self._tables.get(key)
        if table is None:
            table = build_table(lists, groups, chunk_size)
            self._tables[key] = table
            if len(self._tables) > self._size:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(key)
        return table

    def clear(self) -> None:
        self._tables.clear()


def bucket_by_dtype(tensors: Sequence[torch.Tensor]) -> dict[tuple, list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype): one launch per bucket."""
    buckets: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.device, t.dtype), []).append(i)
    return buckets


TL_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def tl_dtype(dtype: torch.dtype):
    """The triton.language dtype of a torch dtype (imported lazily: triton is optional)."""
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]
