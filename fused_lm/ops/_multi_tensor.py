"""Device-side tensor tables for multi-tensor kernels (layout: csrc/include/fused_lm/tensor_table.h).

A multi-tensor launch processes L parallel lists of tensors (params, grads, moments, ...) in ONE
kernel launch, whatever the number of tensors. The host writes, once, an int64 table

    table  (n_tensors, L + 2):  [addr_0, ..., addr_{L-1}, numel, group]
    chunks (n_chunks, 2):       [tensor index, first element]      (CHUNK elements per chunk)

and uploads it (pinned memory, non-blocking: no host synchronisation). One CUDA block, Triton
program or OpenMP iteration handles one chunk. The same two tables drive the Triton, CUDA and CPU
kernels, so there is no kernel-argument size ceiling and no per-tensor launch.

`TableCache` keeps the uploaded tables between calls, keyed by the host table itself (addresses,
sizes, groups; compared with ``torch.equal``): a call whose tensors did not move costs no device
work; when only addresses moved, the chunk table is reused and only the address table is new.

`TensorBatch` is how the one-list ops (norm, scale, clamp) see their tensors: described once, then
routed once. Plain tensors on one device take the fast path: `tensor_info` reads, in one C++ call
(``fused_lm._C.multi_tensor_info``; a Python twin without the extension), their addresses, sizes,
dtypes and contiguity and checks them (plain, dense, real floating, one device), and the buckets
and tables come from those columns with numpy (``dtype_buckets``, ``TableCache.get_rows``), no
per-tensor Python. Anything else (DTensor shards, several devices, a tensor that fails the checks)
takes the general path: per-tensor checks with messages (``check_tensors``), local shards
(``local_shard``), buckets by (device, dtype). Either way ``TensorBatch.buckets(op)`` yields one
``Bucket`` per (device, dtype) with the backend ``_backend.select`` picks for the op, and the
table the kernel reads or the tensors the torch path takes.

Triton kernels (the helpers at the bottom, shared by every multi-tensor kernel):

* Vector access. The addresses come from the table, so the compiler knows nothing of their
  alignment and emits 2-4 byte loads. When every address of a table is ``ALIGN`` (16) bytes
  aligned (``TensorTable.aligned``, read from the host copy: no synchronisation), the launchers
  pick the ``ALIGNED`` variant, where ``list_ptr`` declares each address a multiple of 16 and
  ``chunk_of`` each chunk start a multiple of the chunk size (a multiple of 8 elements, so every
  chunk of an aligned tensor starts 16-byte aligned). A masked access vectorises only when the
  mask is known constant over the vector, which ``offs < end`` is not (``end`` is loaded), so the
  chunk is walked in two phases: full blocks unmasked (``load``/``store`` with ``MASKED=False``,
  128-bit accesses in the aligned variant), then one masked block for the tail.
* Launch limits: one program per chunk on grid axis 0 (``launch_grid``: at most 2**31 - 1
  programs, the limit of CUDA's grid.x) and int64 arithmetic on program ids and element offsets,
  so tensors beyond 2**31 elements work.
* Numerics: ``LAUNCH_OPTIONS`` turns off the compiler's multiply-add contraction
  (``enable_fp_fusion=False``); the kernels write ``tl.fma`` where they mean one and use the
  IEEE-rounded ``div_rn``/``sqrt_rn``, so a GPU run computes what the interpreter and the C++
  functors compute (csrc/include/fused_lm/adamw.h, lion.h), bit for bit for the optimizers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from fused_lm import _backend

# Elements per chunk. 16384 elements give each 256-thread CUDA block 16 iterations of 4-wide
# vector accesses, and a 124M-parameter model ~7.6k chunks: enough to fill 132 SMs several times
# over while keeping the chunk table small. Not yet tuned on a GPU (no GPU session so far).
CHUNK = 16384
# Bytes of one 128-bit vector access: the alignment the ALIGNED kernel variants assume.
ALIGN = 16
# Programs on grid axis 0 (CUDA's grid.x limit; Triton puts program_id(0) there).
MAX_GRID_X = 2**31 - 1
# Options of every multi-tensor Triton launch (and of their AOT compile in
# tools/triton_aot_check.py): no multiply-add contraction, see the module docstring.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


@dataclass
class TensorTable:
    table: torch.Tensor    # (n_tensors, L + 2) int64, on the tensors' device
    chunks: torch.Tensor   # (n_chunks, 2) int64, on the tensors' device
    n_chunks: int
    chunk_size: int
    lists: int
    _host: tuple = ()      # pinned host copies, kept alive until the async upload is done
    _aligned: bool | None = None   # cache of ``aligned`` (device tables)

    @property
    def n_tensors(self) -> int:
        return self.table.shape[0]

    @property
    def aligned(self) -> bool:
        """Every address of the table is ALIGN-byte aligned and the chunk size a multiple of 8
        elements (so every chunk start is too): the kernels may use 128-bit accesses. Read from
        the host copy (no device work); a device table's copy never changes, a CPU table may be
        patched in place (fused_lm/optim/_base.py), so it is read again there."""
        host = self.table if self.table.device.type == "cpu" else (self._host[0] if self._host else None)
        if host is None or self.chunk_size % 8:
            return False
        if self.table.device.type != "cpu" and self._aligned is not None:
            return self._aligned
        addrs = host.numpy()[:, :self.lists]
        ok = addrs.size == 0 or not int(np.bitwise_or.reduce(addrs, axis=None)) % ALIGN
        self._aligned = ok
        return ok


def launch_grid(table: TensorTable) -> tuple[int]:
    """The grid of a one-program-per-chunk launch, checked against MAX_GRID_X."""
    if table.n_chunks > MAX_GRID_X:
        raise ValueError(f"{table.n_chunks} chunks of {table.chunk_size} elements exceed the "
                         f"{MAX_GRID_X} programs of a launch grid; expected fewer elements per "
                         f"launch or a larger chunk_size")
    return (table.n_chunks,)


def check_tensors(tensors: Sequence[torch.Tensor]) -> None:
    """Every item is a dense tensor of a real floating dtype (the errors name the first that is
    not). The slow, message-producing twin of the C++ ``multi_tensor_info`` check."""
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{i}] is a {type(t).__name__}, expected a torch.Tensor")
        if t.layout != torch.strided:
            raise TypeError(f"tensors[{i}] has layout {t.layout}; expected dense tensors")
        if t.is_complex() or not t.is_floating_point():
            raise TypeError(f"tensors[{i}] has dtype {t.dtype}; expected a real floating dtype")


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


def host_table(lists: Sequence[Sequence[torch.Tensor]], groups: Sequence[int] | None = None
               ) -> np.ndarray:
    """The (n, L + 2) int64 host table [addr_0, ..., addr_{L-1}, numel, group] of ``lists``."""
    n = len(lists[0])
    n_lists = len(lists)
    host = np.empty((n, n_lists + 2), dtype=np.int64)
    for k, lst in enumerate(lists):
        host[:, k] = [t.data_ptr() for t in lst]
    host[:, n_lists] = np.fromiter((t.numel() for t in lists[0]), dtype=np.int64, count=n)
    host[:, n_lists + 1] = groups if groups is not None else 0
    return host


def build_table(lists: Sequence[Sequence[torch.Tensor]], groups: Sequence[int] | None = None,
                chunk_size: int = CHUNK, device: torch.device | None = None) -> TensorTable:
    """Builds and uploads the tables for ``lists`` (assumed valid: see ``check_lists``)."""
    n = len(lists[0])
    device = device if device is not None else (lists[0][0].device if n else torch.device("cpu"))
    return build_table_from_host(host_table(lists, groups), chunk_size, device)


def _chunk_table(numel: np.ndarray, chunk_size: int) -> np.ndarray:
    """(n_chunks, 2) int64 [tensor index, first element]: empty tensors get no chunk."""
    n = numel.shape[0]
    per_tensor = (numel + chunk_size - 1) // chunk_size         # empty tensors get no chunk
    owner = np.repeat(np.arange(n, dtype=np.int64), per_tensor)
    first = np.cumsum(per_tensor) - per_tensor
    start = (np.arange(owner.size, dtype=np.int64) - np.repeat(first, per_tensor)) * chunk_size
    return np.stack([owner, start], axis=1) if owner.size else np.zeros((0, 2), dtype=np.int64)


def build_table_from_host(host: np.ndarray, chunk_size: int, device: torch.device,
                          chunks: TensorTable | None = None) -> TensorTable:
    """Uploads the host table ``host`` (n, L + 2) (taken over: the caller must not modify it) and
    its chunk table; ``chunks``: a table with the same sizes whose chunk table is reused."""
    n_lists = host.shape[1] - 2
    table_h = torch.from_numpy(host)
    if chunks is None:
        chunks_h = torch.from_numpy(np.ascontiguousarray(_chunk_table(host[:, n_lists], chunk_size)))
    else:
        chunks_h = chunks.chunks if device.type == "cpu" else chunks._host[1]
    if device.type == "cpu":
        return TensorTable(table_h, chunks_h, chunks_h.shape[0], chunk_size, n_lists)
    table_h = table_h.pin_memory()
    if chunks is None:
        chunks_h = chunks_h.pin_memory()
        chunks_d = chunks_h.to(device, non_blocking=True)
    else:
        chunks_d = chunks.chunks
    return TensorTable(table_h.to(device, non_blocking=True), chunks_d, chunks_h.shape[0],
                       chunk_size, n_lists, (table_h, chunks_h))


class _Entry:
    __slots__ = ("device", "chunk_size", "key", "table")

    def __init__(self, device, chunk_size, key, table):
        self.device, self.chunk_size, self.key, self.table = device, chunk_size, key, table


class TableCache:
    """A small LRU of uploaded tables keyed by their host table (every address, size and group;
    compared with ``torch.equal``) with the device and chunk size. A table depends on nothing else
    (the kernels take the dtype). When only addresses moved (gradients reallocated), the new
    entry reuses the chunk table of the one with the same sizes (no chunk rebuild or upload)."""

    def __init__(self, size: int = 8):
        self._size = size
        self._entries: list[_Entry] = []     # least recently used first

    def get(self, lists, groups=None, chunk_size: int = CHUNK) -> TensorTable:
        """The table of ``lists`` (valid: see ``check_lists``) and ``groups``."""
        n = len(lists[0])
        device = lists[0][0].device if n else torch.device("cpu")
        return self.get_host(host_table(lists, groups), device, chunk_size)

    def get_rows(self, addrs: np.ndarray, numels: np.ndarray, device: torch.device,
                 chunk_size: int = CHUNK) -> TensorTable:
        """The one-list table of tensors with addresses ``addrs`` and sizes ``numels`` (int64)."""
        host = np.empty((addrs.shape[0], 3), dtype=np.int64)
        host[:, 0] = addrs
        host[:, 1] = numels
        host[:, 2] = 0
        return self.get_host(host, device, chunk_size)

    def get_host(self, host: np.ndarray, device: torch.device, chunk_size: int = CHUNK) -> TensorTable:
        """The table whose host table is ``host`` (n, L + 2) int64 (taken over on a miss)."""
        key = torch.from_numpy(host)
        lists = host.shape[1] - 2
        same_sizes = None
        for i in range(len(self._entries) - 1, -1, -1):
            e = self._entries[i]
            if e.device != device or e.chunk_size != chunk_size or e.key.shape != key.shape:
                continue
            if torch.equal(e.key, key):
                if i != len(self._entries) - 1:
                    self._entries.append(self._entries.pop(i))
                return e.table
            if same_sizes is None and torch.equal(e.key[:, lists:], key[:, lists:]):
                same_sizes = e
        # A CPU table is the host array itself; a device table keeps its pinned copy.
        table = build_table_from_host(host, chunk_size, device,
                                      same_sizes.table if same_sizes is not None else None)
        self._entries.append(_Entry(device, chunk_size, key, table))
        if len(self._entries) > self._size:
            self._entries.pop(0)
        return table

    def clear(self) -> None:
        self._entries.clear()


_native_info = None   # fused_lm._C.multi_tensor_info once looked up; False when unavailable
# c10::ScalarType values of the dtypes the kernels and the torch path see (the Python twin of the
# C++ helper gives the same codes; other floating dtypes get codes of their own).
_DTYPE_CODES: dict[torch.dtype, int] = {torch.float16: 5, torch.float32: 6, torch.float64: 7,
                                        torch.bfloat16: 15}
# The types the fast path takes: no tensor subclass but Parameter (a DTensor, a tensor subclass
# with a storage of its own elsewhere, goes through ``local_shard`` on the general path).
PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """The tensor a kernel reads and writes for ``t``: a DTensor's local shard (an alias of its
    storage, what ``to_local()`` returns under no_grad), else ``t`` itself."""
    return getattr(t, "_local_tensor", t)


def tensor_info_py(tensors: list) -> np.ndarray | None:
    """The Python twin of ``fused_lm._C.multi_tensor_info`` (see ``tensor_info``)."""
    n = len(tensors)
    out = np.empty((4, n), dtype=np.int64)
    device = None
    for i, t in enumerate(tensors):
        if (type(t) not in PLAIN_TYPES or t.layout != torch.strided or not t.is_floating_point()
                or t.is_neg()):
            return None
        if device is None:
            device = t.device
            if device.type not in ("cpu", "cuda"):
                return None
        elif t.device != device:
            return None
        code = _DTYPE_CODES.get(t.dtype)
        if code is None:
            code = _DTYPE_CODES.setdefault(t.dtype, 1000 + len(_DTYPE_CODES))
        out[0, i] = t.data_ptr()
        out[1, i] = t.numel()
        out[2, i] = code
        out[3, i] = t.is_contiguous()
    return out


def tensor_info(tensors: list) -> np.ndarray | None:
    """(4, n) int64 [addresses; numels; dtype codes; contiguous (0/1)] of a list of plain (no
    tensor subclass but Parameter), dense, real floating tensors all on one CPU or CUDA device; None
    when any of that does not hold (the caller then runs its per-tensor checks, which raise, and
    its general path). One C++ call when the CPU extension is built."""
    global _native_info
    if _native_info is None:
        from fused_lm import _ext

        _native_info = (getattr(_ext.cpu_ext(), "multi_tensor_info", False)
                        if _ext.has_cpu() else False)
    if _native_info:
        info = _native_info(tensors)
        return None if info is None else info.numpy()
    return tensor_info_py(tensors)


def dtype_buckets(tensors: list, info: np.ndarray) -> list[tuple[torch.dtype, np.ndarray]]:
    """(dtype, indices) of each dtype of ``tensors`` (described by ``info``, see ``tensor_info``),
    in the order of first appearance, as ``bucket_by_dtype``."""
    n = info.shape[1]
    if n == 0:
        return []
    codes = info[2]
    if (codes == codes[0]).all():
        return [(tensors[0].dtype, np.arange(n))]
    uniq, first = np.unique(codes, return_index=True)
    return [(tensors[int(first[j])].dtype, np.flatnonzero(codes == uniq[j]))
            for j in np.argsort(first, kind="stable")]


def bucket_by_dtype(tensors: Sequence[torch.Tensor]) -> dict[tuple, list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype): one launch per bucket."""
    buckets: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.device, t.dtype), []).append(i)
    return buckets


class Bucket(NamedTuple):
    """The tensors of one (device, dtype) of a ``TensorBatch`` that one op runs on one backend.
    ``table``: the kernel's table of the contiguous non-empty tensors (None on the torch route
    or when there is none); ``tensors``: what the kernel does not take, for the op's torch path
    (the whole bucket on the torch route, else the non-contiguous tensors); ``keep``: contiguous
    copies read through ``table`` (``copy_strided``), alive until the launch."""
    device: torch.device
    dtype: torch.dtype
    backend: str
    table: TensorTable | None
    tensors: list
    keep: list


# The tables of every one-list op (norm, scale and clamp of the same tensors share an entry: a
# table holds addresses and sizes only, the kernels take the dtype).
_TABLES = TableCache(size=16)


class TensorBatch:
    """A list of tensors described once for the one-list multi-tensor ops (norm, scale, clamp).

    ``source``: the tensors as given; ``tensors``: what the kernels read and write (local shards
    of DTensors); ``info``: the ``tensor_info`` columns on the fast path (plain tensors on one
    device, already checked), else None; ``sharded``: some tensor is a DTensor. Bad input raises
    here with the message of ``check_tensors``, before any op touches a tensor. Build it once and
    pass it to several ops (``clip_grad_norm_``: the norm, then the scale)."""

    __slots__ = ("source", "tensors", "info", "sharded")

    def __init__(self, tensors: Iterable[torch.Tensor]):
        self.source = list(tensors)
        self.info = tensor_info(self.source)
        if self.info is not None:
            self.tensors, self.sharded = self.source, False
            return
        self.tensors = [local_shard(t) for t in self.source]
        self.sharded = any(t is not s for t, s in zip(self.tensors, self.source))
        check_tensors(self.tensors)

    @classmethod
    def of(cls, tensors) -> "TensorBatch":
        """``tensors`` if already a batch, else the batch of it."""
        return tensors if isinstance(tensors, cls) else cls(tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def buckets(self, op: str, backend: str | None = None, *, copy_strided: bool = False
                ) -> Iterator[Bucket]:
        """One ``Bucket`` per (device, dtype) holding an element, in the order of first
        appearance, routed by ``_backend.select(op, device, dtype, backend)``. Empty tensors are
        left out. ``copy_strided`` (ops that only read): non-contiguous tensors of kernel routes
        are read through contiguous copies in the table instead of being left to the torch path."""
        info = self.info
        if info is not None:
            device = self.tensors[0].device if self.tensors else None
            for dtype, idx in dtype_buckets(self.tensors, info):
                idx = idx[info[1, idx] > 0]
                if idx.size == 0:
                    continue
                which = _backend.select(op, device, dtype, backend)
                if which != "torch" and info[3, idx].all():   # all contiguous: table from info
                    yield Bucket(device, dtype, which,
                                 _TABLES.get_rows(info[0, idx], info[1, idx], device), [], [])
                else:
                    yield _bucket(device, dtype, which, [self.tensors[i] for i in idx.tolist()],
                                  copy_strided)
            return
        for (device, dtype), idx in bucket_by_dtype(self.tensors).items():
            group = [self.tensors[i] for i in idx if self.tensors[i].numel() > 0]
            if group:
                yield _bucket(device, dtype, _backend.select(op, device, dtype, backend), group,
                              copy_strided)


def _bucket(device, dtype, which: str, group: list, copy_strided: bool) -> Bucket:
    """The bucket of the non-empty tensors ``group`` (general path, or a non-contiguous one)."""
    if which == "torch":
        return Bucket(device, dtype, which, None, group, [])
    if copy_strided:
        dense = [t if t.is_contiguous() else t.contiguous() for t in group]
        return Bucket(device, dtype, which, _TABLES.get([dense]), [], dense)
    dense = [t for t in group if t.is_contiguous()]
    strided = [t for t in group if not t.is_contiguous()]
    return Bucket(device, dtype, which, _TABLES.get([dense]) if dense else None, strided, [])


TL_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def tl_dtype(dtype: torch.dtype):
    """The triton.language dtype of a torch dtype (imported lazily: triton is optional)."""
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


# ---------------------------------------------------------------------------------------------
# Triton pieces shared by the multi-tensor kernels (see the module docstring).

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux dependency
    triton = None

if triton is not None:
    _ALIGN = tl.constexpr(ALIGN)

    @triton.jit
    def chunk_of(table_ptr, chunks_ptr, LISTS: tl.constexpr, CHUNK: tl.constexpr):
        # (tensor index, its table row, first element, end) of this program's chunk. int64
        # throughout: 2 * pid and the element offsets may pass 2**31.
        pid = tl.program_id(0).to(tl.int64)
        tensor = tl.load(chunks_ptr + 2 * pid)
        begin = tl.multiple_of(tl.load(chunks_ptr + 2 * pid + 1), CHUNK)   # starts: k * CHUNK
        row = table_ptr + tensor * (LISTS + 2)
        end = tl.minimum(begin + CHUNK, tl.load(row + LISTS))
        return tensor, row, begin, end

    @triton.jit
    def list_ptr(row, k, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
        # The address of list k of a table row as a DTYPE pointer; ALIGNED: declared a multiple
        # of 16 bytes (the host checked every address of the table).
        ptr = tl.load(row + k).to(tl.pointer_type(DTYPE))
        if ALIGNED:
            ptr = tl.multiple_of(ptr, _ALIGN)
        return ptr

    @triton.jit
    def load(ptr, mask, MASKED: tl.constexpr):
        # An unmasked load (vectorisable) in the full-block phase, masked (other=0) in the tail.
        if MASKED:
            x = tl.load(ptr, mask=mask, other=0.0)
        else:
            x = tl.load(ptr)
        return x

    @triton.jit
    def store(ptr, x, mask, MASKED: tl.constexpr):
        if MASKED:
            tl.store(ptr, x, mask=mask)
        else:
            tl.store(ptr, x)
