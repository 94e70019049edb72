"""Launching the attention kernels: constexprs, block configurations, grid, and the host
functions (allocate -> grid -> launch). The launcher and tools/triton_aot_check.py read these;
nothing else repeats them."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from fused_lm import _backend
from fused_lm.ops.attention.kernels import (_bwd_dkdv_kernel, _bwd_dq_kernel,
                                            _bwd_preprocess_kernel, _fwd_kernel)

try:
    import triton
except ImportError:  # pragma: no cover - triton is a Linux dependency
    triton = None

MIN_HEAD_DIM, MAX_HEAD_DIM = 1, 256
_LOG2E = 1.4426950408889634

try:  # where Triton reports "out of shared memory / registers" at launch (3.x)
    from triton.runtime.errors import OutOfResources as _OutOfResources
except Exception:  # pragma: no cover - older layouts
    _OutOfResources = ()

KINDS = ("fwd", "pre", "dkdv", "dq")
PRECISIONS = ("ieee", "tf32", "tf32x3")


class Config(NamedTuple):
    block_m: int          # query rows per block (every kernel)
    block_n: int          # key rows per block (0: the kernel has none)
    num_warps: int
    num_stages: int


def _c(*rows):
    return [Config(*r) for r in rows]


# Block configurations per Triton version (major, minor), kernel, head-dim bucket (BLOCK_D <= 64,
# 128, 256) and input width (False: fp16/bf16, True: fp32), preferred first; later entries are
# fall-backs tried on OutOfResources (GPUs with less shared memory per block than the H200's
# 227 KB: 163 KB on A100, 99 KB on consumer parts). NOT timed (no GPU session so far). Chosen
# from sm_90 builds without a GPU (tools/triton_aot_check.py --attention-sweep, strides
# specialised as the JIT does; ptxas registers and spills, shared memory, mma kind), by:
#   1. no register spills (regs <= 255) on the Triton the GPU runs (3.6) and on 3.9;
#   2. wgmma where possible: the M side of every product (BLOCK_M in fwd/dq, BLOCK_N in dK/dV)
#      >= 64 rows per warpgroup of 4 warps (mma.sync below that);
#   3. the largest BLOCK_M x BLOCK_N, then pipelining (2-3 stages) within 227 KB;
#   4. fall-backs: about 160 KB, then about 100 KB, then a small mma tile.
# Sweep numbers (3.6 | 3.9, bf16 causal): README "Attention". dK/dV holds two (BLOCK_N, D) fp32
# accumulators, so it cannot keep a 64-row wgmma tile spill-free at d=256 (or at d=128 on 3.9:
# 12 bytes) -- those use mma.sync tiles.
_CONFIG_TABLES: dict[tuple[int, int], dict[tuple[str, int, bool], list[Config]]] = {}


def _table(version: tuple[int, int]) -> dict[tuple[str, int, bool], list[Config]]:
    t = {
        ("fwd", 64, False): _c((128, 128, 8, 3), (128, 64, 8, 3), (32, 16, 4, 1)),
        ("fwd", 128, False): _c((128, 128, 8, 2), (128, 64, 8, 2), (32, 16, 4, 1)),
        ("fwd", 256, False): _c((128, 64, 8, 2), (128, 32, 8, 1), (32, 32, 4, 1)),
        ("fwd", 64, True): _c((128, 64, 8, 2), (64, 32, 4, 2), (32, 16, 4, 1)),
        ("fwd", 128, True): _c((128, 64, 8, 2), (128, 32, 8, 2), (32, 16, 4, 2)),
        ("fwd", 256, True): _c((32, 32, 4, 1), (16, 16, 4, 1)),
        ("dkdv", 64, False): _c((32, 128, 8, 2), (16, 64, 4, 2), (16, 16, 4, 2)),
        ("dkdv", 128, False): _c((16, 128, 8, 2), (16, 32, 4, 2), (16, 16, 4, 2)),
        ("dkdv", 256, False): _c((16, 32, 4, 1), (16, 16, 4, 1)),
        ("dkdv", 64, True): _c((16, 128, 8, 2), (16, 64, 4, 2), (16, 16, 4, 2)),
        ("dkdv", 128, True): _c((16, 32, 4, 2), (16, 16, 4, 1)),
        ("dkdv", 256, True): _c((16, 16, 4, 1),),
        ("dq", 64, False): _c((128, 64, 8, 3), (64, 32, 4, 3), (16, 16, 4, 2)),
        ("dq", 128, False): _c((128, 64, 8, 2), (64, 32, 4, 3), (16, 16, 4, 2)),
        ("dq", 256, False): _c((128, 32, 8, 2), (128, 16, 8, 2), (32, 16, 4, 1)),
        ("dq", 64, True): _c((128, 64, 8, 2), (64, 32, 4, 2), (16, 16, 4, 2)),
        ("dq", 128, True): _c((128, 32, 8, 2), (64, 16, 4, 2), (32, 16, 4, 2)),
        ("dq", 256, True): _c((32, 32, 4, 1), (32, 16, 4, 1)),
    }
    if version >= (3, 9):
        # 3.9 spills 12 bytes with the 3.6 wgmma tile here.
        t[("dkdv", 128, False)] = _c((16, 32, 4, 2), (16, 16, 4, 2))
    for d in (64, 128, 256):
        t[("pre", d, False)] = t[("pre", d, True)] = _c((64, 0, 4, 1))
    return t


_CONFIG_TABLES[(3, 6)] = _table((3, 6))
_CONFIG_TABLES[(3, 9)] = _table((3, 9))

# Under the interpreter one small config keeps CPU tests fast while still crossing block
# boundaries at N ~ 100.
_INTERPRETER_CONFIGS = {"fwd": _c((32, 32, 4, 1)), "dkdv": _c((32, 32, 4, 1)),
                        "dq": _c((32, 32, 4, 1)), "pre": _c((32, 0, 4, 1))}


def triton_version() -> tuple[int, int]:
    if triton is None:
        return (0, 0)
    major, minor = (triton.__version__.split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _table_for(version: Optional[tuple[int, int]] = None):
    """The table of ``version`` (default: the running Triton): its own, else the newest one not
    newer than it, else the oldest."""
    version = triton_version() if version is None else version
    keys = sorted(_CONFIG_TABLES)
    older = [k for k in keys if k <= version]
    return _CONFIG_TABLES[older[-1] if older else keys[0]]


def block_d(head_dim: int) -> int:
    """The head dim padded to a power of two, at least 16 (tl.dot's smallest K)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def launch_configs(kind: str, head_dim: int, dtype: torch.dtype,
                   version: Optional[tuple[int, int]] = None,
                   interpreted: Optional[bool] = None) -> list[Config]:
    """Block configurations for kernel ``kind`` (fwd | pre | dkdv | dq), preferred first."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if _backend.interpreter_on() if interpreted is None else interpreted:
        return _INTERPRETER_CONFIGS[kind]
    bd = block_d(head_dim)
    bucket = 64 if bd <= 64 else 128 if bd <= 128 else 256
    return _table_for(version)[(kind, bucket, dtype == torch.float32)]


def kernel_meta(kind: str, head_dim: int, dtype: torch.dtype, *, varlen: bool, has_left: bool,
                has_right: bool, softcap: bool, bias: bool, precision: str,
                row64: bool = False) -> dict:
    """The constexprs of kernel ``kind`` except BLOCK_M/BLOCK_N (they come with the config).
    ``row64``: some sequence spans more than 2**31 elements (row offsets in int64)."""
    bd = block_d(head_dim)
    if kind == "pre":
        return dict(HEAD_DIM=head_dim, BLOCK_D=bd, IS_VARLEN=varlen, ROW64=row64)
    return dict(HEAD_DIM=head_dim, BLOCK_D=bd, EVEN_D=head_dim == bd, IS_VARLEN=varlen,
                HAS_LEFT=has_left, HAS_RIGHT=has_right, HAS_SOFTCAP=softcap, HAS_BIAS=bias,
                # One compiled variant for fp16/bf16, where the operand precision is moot.
                PRECISION=precision if dtype == torch.float32 else "ieee", ROW64=row64)


def _row64(seqlen: int, *tensors: torch.Tensor) -> bool:
    """Whether row offsets within a sequence (rows up to seqlen plus one block) times the token
    stride of any of ``tensors`` pass int32."""
    return any((seqlen + _MAX_BLOCK_ROWS) * abs(t.stride(-3)) > _INT32_MAX for t in tensors)


def config_meta(kind: str, config: Config) -> dict:
    if kind == "pre":
        return dict(BLOCK_M=config.block_m)
    return dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n)


def grid_size(kind: str, config: Config, batch: int, heads: int, seqlen_q: int,
              seqlen_k: int) -> int:
    """Programs of the 1-D grid (see _locate): blocks x batch x heads (kv heads for dkdv)."""
    if kind == "dkdv":
        return triton.cdiv(seqlen_k, config.block_n) * batch * heads
    return triton.cdiv(seqlen_q, config.block_m) * batch * heads


_GRID_LIMITS = (2**31 - 1, 65535, 65535)      # CUDA's gridDim.x, .y, .z
_chosen: dict[tuple, int] = {}


def _check_grid(kind: str, grid: tuple) -> None:
    for axis, (n, limit) in enumerate(zip(grid, _GRID_LIMITS)):
        if n > limit:
            raise ValueError(f"flash attention {kind}: {n} programs on grid axis {axis} exceed "
                             f"CUDA's limit {limit} (batch x heads x blocks); split the batch")


def _launch(kernel, kind: str, head_dim: int, dtype: torch.dtype, sizes: tuple, args,
            meta: dict) -> None:
    """Launches ``kernel`` with the first config that fits; remembers the one that did.
    ``sizes`` = (batch, heads, seqlen_q, seqlen_k) for grid_size."""
    configs = launch_configs(kind, head_dim, dtype)
    key = (kind, head_dim, dtype, tuple(sorted(meta.items())))
    first = _chosen.get(key, 0)
    error = None
    for i in range(first, len(configs)):
        config = configs[i]
        grid = (grid_size(kind, config, *sizes),)
        _check_grid(kind, grid)
        try:
            kernel[grid](*args, **meta, **config_meta(kind, config),
                                num_warps=config.num_warps, num_stages=config.num_stages)
        except _OutOfResources as exc:  # type: ignore[misc]
            error = exc
            continue
        _chosen[key] = i
        return
    raise RuntimeError(f"flash attention {kind}: no block configuration fits this GPU "
                       f"(head dim {head_dim}, {dtype})") from error


def default_precision() -> str:
    """The fp32 operand precision torch uses for CUDA matmuls: "tf32" when TF32 is allowed
    (``torch.backends.cuda.matmul.fp32_precision = "tf32"``, ``allow_tf32 = True`` or
    ``torch.set_float32_matmul_precision("high" | "medium")``), else "ieee" (torch's default).
    torch >= 2.9 has ``fp32_precision`` (it also reflects the legacy settings and never raises on
    mixed use, where reading ``allow_tf32`` does); older torch has the float32 matmul precision."""
    matmul = torch.backends.cuda.matmul
    try:
        value = matmul.fp32_precision
    except (AttributeError, RuntimeError):
        value = None
    if value in ("ieee", "tf32"):
        return value
    if value == "none":                      # "inherit", and nothing set above: the default
        return "ieee"
    try:
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    except (AttributeError, RuntimeError):  # pragma: no cover - torch < 1.12
        return "tf32" if getattr(matmul, "allow_tf32", False) else "ieee"


def _precision(value: str) -> str:
    return default_precision() if value == "" else value


# ----------------------------------------------------------------------------------------------
# Host functions: check -> allocate -> grid -> launch
# ----------------------------------------------------------------------------------------------

_INT32_MAX = 2**31 - 1
_BOUND_CLAMP = 2**30          # window bounds beyond any sequence length are clamped to this
_MAX_BLOCK_ROWS = 256         # no config has more rows per tile


def _bsh(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(stride_batch, stride_token, stride_head) of a (B, N, H, D) or varlen (T, H, D) tensor."""
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int]:
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def _dims(q, k, cu_q, max_q, max_k):
    varlen = cu_q is not None
    if varlen:
        batch, n_heads, n_kv_heads = cu_q.shape[0] - 1, q.shape[1], k.shape[1]
        seqlen_q, seqlen_k = max_q, max_k
    else:
        batch, seqlen_q, n_heads = q.shape[0], q.shape[1], q.shape[2]
        seqlen_k, n_kv_heads = k.shape[1], k.shape[2]
    return varlen, batch, n_heads, n_kv_heads, seqlen_q, seqlen_k


def _scalars(scale: float, softcap: float, has_left, left, has_right, right):
    qk_scale = scale / softcap if softcap > 0 else scale * _LOG2E
    clamp = lambda x: max(-_BOUND_CLAMP, min(_BOUND_CLAMP, int(x)))  # noqa: E731
    return (qk_scale, softcap * _LOG2E, clamp(left) if has_left else 0,
            clamp(right) if has_right else 0)


def _forward_impl(q, k, v, bias, cu_q, cu_k, max_q, max_k, scale, has_left, left, has_right,
                  right, softcap, precision):
    varlen, batch, n_heads, n_kv_heads, seqlen_q, seqlen_k = _dims(q, k, cu_q, max_q, max_k)
    head_dim = q.shape[-1]
    out = torch.empty_like(q)
    if varlen:
        lse = torch.empty((n_heads, q.shape[0]), dtype=torch.float32, device=q.device)
    else:
        lse = torch.empty((batch, n_heads, seqlen_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or seqlen_q == 0:
        return out, lse
    qk_scale, softcap_log2, wl, wr = _scalars(scale, softcap, has_left, left, has_right, right)
    dummy = lse
    args = (q, k, v, out, lse, bias if bias is not None else dummy,
            cu_q if varlen else dummy, cu_k if varlen else dummy,
            qk_scale, softcap_log2, wl, wr,
            *_bsh(q, varlen), *_bsh(k, varlen), *_bsh(v, varlen), *_bsh(out, varlen),
            *_lse_strides(lse, varlen), bias.stride(0) if bias is not None else 0,
            seqlen_q, seqlen_k, n_heads, n_heads // n_kv_heads)
    meta = kernel_meta("fwd", head_dim, q.dtype, varlen=varlen, has_left=has_left,
                       has_right=has_right, softcap=softcap > 0, bias=bias is not None,
                       precision=_precision(precision),
                       row64=_row64(seqlen_q, q, out) or _row64(seqlen_k, k, v))
    _launch(_fwd_kernel, "fwd", head_dim, q.dtype, (batch, n_heads, seqlen_q, seqlen_k), args,
            meta)
    return out, lse


def _backward_impl(dout, q, k, v, out, lse, bias, cu_q, cu_k, max_q, max_k, scale, has_left,
                   left, has_right, right, softcap, precision):
    varlen, batch, n_heads, n_kv_heads, seqlen_q, seqlen_k = _dims(q, k, cu_q, max_q, max_k)
    head_dim = q.shape[-1]
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if dk.numel() == 0 and dq.numel() == 0:
        return dq, dk, dv
    if seqlen_q == 0 or dq.numel() == 0:      # no query: no gradient reaches k and v
        return dq, dk.zero_(), dv.zero_()
    qk_scale, softcap_log2, wl, wr = _scalars(scale, softcap, has_left, left, has_right, right)
    group = n_heads // n_kv_heads
    delta = torch.empty_like(lse)
    cu_q_arg = cu_q if varlen else lse
    cu_k_arg = cu_k if varlen else lse
    lse_strides = _lse_strides(lse, varlen)
    flags = dict(varlen=varlen, has_left=has_left, has_right=has_right, softcap=softcap > 0,
                 bias=bias is not None, precision=_precision(precision),
                 row64=_row64(seqlen_q, q, out, dout, dq) or _row64(seqlen_k, k, v, dk, dv))
    _launch(_bwd_preprocess_kernel, "pre", head_dim, q.dtype, (batch, n_heads, seqlen_q, seqlen_k),
            (out, dout, delta, cu_q_arg, *_bsh(out, varlen), *_bsh(dout, varlen), *lse_strides,
             seqlen_q, n_heads),
            kernel_meta("pre", head_dim, q.dtype, **flags))
    bias_arg = bias if bias is not None else lse
    bias_stride = bias.stride(0) if bias is not None else 0
    if seqlen_k > 0 and dk.numel() > 0:
        _launch(_bwd_dkdv_kernel, "dkdv", head_dim, q.dtype,
                (batch, n_kv_heads, seqlen_q, seqlen_k),
                (q, k, v, dout, lse, delta, bias_arg, dk, dv, cu_q_arg, cu_k_arg,
                 qk_scale, softcap_log2, scale, wl, wr,
                 *_bsh(q, varlen), *_bsh(k, varlen), *_bsh(v, varlen), *_bsh(dout, varlen),
                 *_bsh(dk, varlen), *_bsh(dv, varlen), *lse_strides, bias_stride,
                 seqlen_q, seqlen_k, n_kv_heads, group),
                kernel_meta("dkdv", head_dim, q.dtype, **flags))
    _launch(_bwd_dq_kernel, "dq", head_dim, q.dtype, (batch, n_heads, seqlen_q, seqlen_k),
            (q, k, v, dout, lse, delta, bias_arg, dq, cu_q_arg, cu_k_arg,
             qk_scale, softcap_log2, scale, wl, wr,
             *_bsh(q, varlen), *_bsh(k, varlen), *_bsh(v, varlen), *_bsh(dout, varlen),
             *_bsh(dq, varlen), *lse_strides, bias_stride,
             seqlen_q, seqlen_k, n_heads, group),
            kernel_meta("dq", head_dim, q.dtype, **flags))
    return dq, dk, dv
