"""Launching the attention kernels: one Problem per call, built by validation (op.py), yields
every kernel's arguments, constexprs, block configurations and grid -- for the launcher here
and for tools/triton_aot_check.py alike (nothing else repeats them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from fused_lm import _backend
from fused_lm.ops.attention import kernels as _k

try:
    import triton
except ImportError:  # pragma: no cover - triton is a Linux dependency
    triton = None

try:  # where Triton reports "out of shared memory / registers" at launch (3.x)
    from triton.runtime.errors import OutOfResources as _OutOfResources
except Exception:  # pragma: no cover - older layouts
    _OutOfResources = ()

KINDS = ("fwd", "pre", "dkdv", "dq")
PRECISIONS = ("ieee", "tf32", "tf32x3")
MIN_HEAD_DIM, MAX_HEAD_DIM = 1, 256
_LOG2E = 1.4426950408889634
_INT32_MAX = 2**31 - 1
_BOUND_CLAMP = 2**30          # window bounds beyond any sequence length are clamped to this
MAX_BLOCK_ROWS = 256          # no config has more rows per tile
_GRID_LIMITS = (2**31 - 1, 65535, 65535)      # CUDA's gridDim.x, .y, .z


# ----------------------------------------------------------------------------------------------
# Block configurations
# ----------------------------------------------------------------------------------------------

class Config(NamedTuple):
    block_m: int          # query rows per block (every kernel)
    block_n: int          # key rows per block (0: the kernel has none)
    num_warps: int
    num_stages: int


def _c(*rows):
    return [Config(*r) for r in rows]


# Block configurations per Triton version (major, minor), kernel, head-dim bucket (BLOCK_D <= 64,
# 128, 256) and operand class (operand_class: "16" fp16/bf16, "tf32" fp32 on TF32 tensor cores,
# "ieee" fp32 products by FMA, torch's default precision), preferred first; later entries are
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
# 12 bytes) -- those use mma.sync tiles. IEEE fp32 products run on FMA units with the operands
# in registers: the TF32 tiles spill there (3.6, fwd d=64 128x64: 53 KB), so they get 32x32
# tiles (16x16 at d=256), spill-free in 3.6 builds with every feature on (README "Attention").
_CONFIG_TABLES: dict[tuple[int, int], dict[tuple[str, int, str], list[Config]]] = {}


def _table(version: tuple[int, int]) -> dict[tuple[str, int, str], list[Config]]:
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
    t = {(kind, d, "tf32" if wide else "16"): v for (kind, d, wide), v in t.items()}
    for kind in ("fwd", "dkdv", "dq"):
        t[(kind, 64, "ieee")] = _c((32, 32, 4, 2), (16, 16, 4, 1))
        t[(kind, 128, "ieee")] = _c((32, 32, 4, 2), (16, 16, 4, 1))
        t[(kind, 256, "ieee")] = _c((16, 16, 4, 1),)
    if version >= (3, 9):
        # 3.9 spills 12 bytes with the 3.6 wgmma tile here.
        t[("dkdv", 128, "16")] = _c((16, 32, 4, 2), (16, 16, 4, 2))
    for d in (64, 128, 256):
        for cls in ("16", "tf32", "ieee"):
            t[("pre", d, cls)] = _c((64, 0, 4, 1))
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


def operand_class(dtype: torch.dtype, precision: str) -> str:
    """The config tables' operand class: "16" (fp16/bf16), "tf32" (fp32 at tf32 or tf32x3: TF32
    tensor cores) or "ieee" (fp32 products by FMA)."""
    if dtype != torch.float32:
        return "16"
    return "ieee" if precision == "ieee" else "tf32"


def launch_configs(kind: str, head_dim: int, dtype: torch.dtype, precision: str = "tf32",
                   version: Optional[tuple[int, int]] = None,
                   interpreted: Optional[bool] = None) -> list[Config]:
    """Block configurations for kernel ``kind`` (fwd | pre | dkdv | dq), preferred first, for
    fp32 products at ``precision`` (ignored for fp16/bf16)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if _backend.interpreter_on() if interpreted is None else interpreted:
        return _INTERPRETER_CONFIGS[kind]
    bd = block_d(head_dim)
    bucket = 64 if bd <= 64 else 128 if bd <= 128 else 256
    return _table_for(version)[(kind, bucket, operand_class(dtype, precision))]


def config_meta(kind: str, config: Config) -> dict:
    """The block constexprs of ``config`` for kernel ``kind``."""
    if kind == "pre":
        return dict(BLOCK_M=config.block_m)
    return dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n)


# ----------------------------------------------------------------------------------------------
# Precision
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# The problem
# ----------------------------------------------------------------------------------------------

def _bsh(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(stride_batch, stride_token, stride_head) of a (B, N, H, D) or varlen (T, H, D) tensor."""
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int]:
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def _row64(seqlen: int, *tensors: torch.Tensor) -> bool:
    """Whether row offsets within a sequence (rows up to seqlen plus one block) times the token
    stride of any of ``tensors`` pass int32."""
    return any((seqlen + MAX_BLOCK_ROWS) * abs(t.stride(-3)) > _INT32_MAX for t in tensors)


def check_grid(kind: str, grid: tuple) -> None:
    for axis, (n, limit) in enumerate(zip(grid, _GRID_LIMITS)):
        if n > limit:
            raise ValueError(f"flash attention {kind}: {n} programs on grid axis {axis} exceed "
                             f"CUDA's limit {limit} (batch x heads x blocks); split the batch")


# The scalar arguments of the custom ops (op.py), in order: their schema is written from this.
OP_PARAMS = (("max_seqlen_q", "int"), ("max_seqlen_k", "int"), ("scale", "float"),
             ("has_left", "bool"), ("left", "int"), ("has_right", "bool"), ("right", "int"),
             ("softcap", "float"), ("precision", "str"))


@dataclass(frozen=True)
class Problem:
    """One attention call after validation: sizes, features and the fp32 product precision.

    ``seqlen_q/k`` are the longest sequences when packed (``varlen``). The visibility bounds
    are final (causal folded in, bottom-right aligned, see the package docstring); ``left`` /
    ``right`` mean nothing without ``has_left`` / ``has_right``. ``precision`` "" follows torch's
    setting when the kernels run. ``row64``: some sequence spans more than 2**31 elements."""

    dtype: torch.dtype
    head_dim: int
    batch: int = 1
    n_heads: int = 1
    n_kv_heads: int = 1
    seqlen_q: int = 1
    seqlen_k: int = 1
    varlen: bool = False
    scale: float = 1.0
    softcap: float = 0.0
    has_left: bool = False
    left: int = 0
    has_right: bool = False
    right: int = 0
    bias: bool = False
    precision: str = ""
    row64: bool = False

    @classmethod
    def of(cls, q, k, bias, cu_q, max_q, max_k, scale, has_left, left, has_right, right,
           softcap, precision, *row_tensors) -> "Problem":
        """The problem of the custom op's inputs: q, k, bias, cu_seqlens_q, then OP_PARAMS
        (``row_tensors``: every (., D) tensor the kernels address besides q and k, for row64)."""
        varlen = cu_q is not None
        if varlen:
            batch, n_heads, n_kv_heads = cu_q.shape[0] - 1, q.shape[1], k.shape[1]
            seqlen_q, seqlen_k = max_q, max_k
        else:
            batch, seqlen_q, n_heads = q.shape[0], q.shape[1], q.shape[2]
            seqlen_k, n_kv_heads = k.shape[1], k.shape[2]
        row64 = _row64(seqlen_q, q, *row_tensors) or _row64(seqlen_k, k, *row_tensors)
        return cls(q.dtype, q.shape[-1], batch, n_heads, n_kv_heads, seqlen_q, seqlen_k, varlen,
                   scale, softcap, has_left, left, has_right, right, bias is not None, precision,
                   row64)

    def op_params(self) -> tuple:
        """The custom ops' scalar arguments, in the order of OP_PARAMS."""
        return (self.seqlen_q, self.seqlen_k, self.scale, self.has_left, self.left,
                self.has_right, self.right, self.softcap, self.precision)

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads

    def meta(self, kind: str) -> dict:
        """The constexprs of kernel ``kind`` except BLOCK_M/BLOCK_N (they come with the
        config)."""
        bd = block_d(self.head_dim)
        if kind == "pre":
            return dict(HEAD_DIM=self.head_dim, BLOCK_D=bd, IS_VARLEN=self.varlen, ROW64=self.row64)
        precision = self.precision or default_precision()
        return dict(HEAD_DIM=self.head_dim, BLOCK_D=bd, EVEN_D=self.head_dim == bd,
                    IS_VARLEN=self.varlen, HAS_LEFT=self.has_left, HAS_RIGHT=self.has_right,
                    HAS_SOFTCAP=self.softcap > 0, HAS_BIAS=self.bias,
                    # One compiled variant for fp16/bf16, where the operand precision is moot.
                    PRECISION=precision if self.dtype == torch.float32 else "ieee",
                    ROW64=self.row64)

    def configs(self, kind: str, interpreted: Optional[bool] = None) -> list[Config]:
        return launch_configs(kind, self.head_dim, self.dtype,
                              self.precision or default_precision(), interpreted=interpreted)

    def grid(self, kind: str, config: Config) -> tuple[int]:
        """The 1-D grid (see kernels._locate): blocks x batch x heads (kv heads for dkdv)."""
        if kind == "dkdv":
            return (triton.cdiv(self.seqlen_k, config.block_n) * self.batch * self.n_kv_heads,)
        return (triton.cdiv(self.seqlen_q, config.block_m) * self.batch * self.n_heads,)

    def _scalars(self):
        qk_scale = self.scale / self.softcap if self.softcap > 0 else self.scale * _LOG2E
        clamp = lambda x: max(-_BOUND_CLAMP, min(_BOUND_CLAMP, int(x)))  # noqa: E731
        return (qk_scale, self.softcap * _LOG2E, clamp(self.left) if self.has_left else 0,
                clamp(self.right) if self.has_right else 0)

    def args(self, kind: str, t: dict) -> tuple:
        """The runtime arguments of kernel ``kind`` from the tensors ``t`` (q, k, v, out, lse,
        bias, cu_q, cu_k; dout, delta, dq, dk, dv for the backward); absent optional tensors are
        replaced by lse (never read)."""
        vl = self.varlen
        lse = t["lse"]
        cu_q = t["cu_q"] if vl else lse
        cu_k = t["cu_k"] if vl else lse
        lse_strides = _lse_strides(lse, vl)
        if kind == "pre":
            return (t["out"], t["dout"], t["delta"], cu_q, *_bsh(t["out"], vl),
                    *_bsh(t["dout"], vl), *lse_strides, self.seqlen_q, self.n_heads)
        bias = t["bias"] if t["bias"] is not None else lse
        bias_stride = t["bias"].stride(0) if t["bias"] is not None else 0
        qk_scale, softcap_log2, wl, wr = self._scalars()
        sizes = (self.seqlen_q, self.seqlen_k)
        if kind == "fwd":
            return (t["q"], t["k"], t["v"], t["out"], lse, bias, cu_q, cu_k,
                    qk_scale, softcap_log2, wl, wr,
                    *_bsh(t["q"], vl), *_bsh(t["k"], vl), *_bsh(t["v"], vl), *_bsh(t["out"], vl),
                    *lse_strides, bias_stride, *sizes, self.n_heads, self.group)
        head = (t["q"], t["k"], t["v"], t["dout"], lse, t["delta"], bias)
        common = (qk_scale, softcap_log2, self.scale, wl, wr,
                  *_bsh(t["q"], vl), *_bsh(t["k"], vl), *_bsh(t["v"], vl), *_bsh(t["dout"], vl))
        if kind == "dkdv":
            return (*head, t["dk"], t["dv"], cu_q, cu_k, *common, *_bsh(t["dk"], vl),
                    *_bsh(t["dv"], vl), *lse_strides, bias_stride, *sizes, self.n_kv_heads,
                    self.group)
        return (*head, t["dq"], cu_q, cu_k, *common, *_bsh(t["dq"], vl), *lse_strides,
                bias_stride, *sizes, self.n_heads, self.group)

    def launch(self, kind: str, tensors: dict) -> None:
        """Launches kernel ``kind`` with the first config that fits; remembers the one that
        did (later configs are fall-backs for OutOfResources)."""
        kernel = getattr(_k, _k.KERNELS[kind])
        meta = self.meta(kind)
        configs = self.configs(kind)
        key = (kind, self.head_dim, self.dtype, tuple(sorted(meta.items())))
        args = self.args(kind, tensors)
        error = None
        for i in range(_chosen.get(key, 0), len(configs)):
            config = configs[i]
            grid = self.grid(kind, config)
            check_grid(kind, grid)
            try:
                kernel[grid](*args, **meta, **config_meta(kind, config),
                             num_warps=config.num_warps, num_stages=config.num_stages)
            except _OutOfResources as exc:  # type: ignore[misc]
                error = exc
                continue
            _chosen[key] = i
            return
        raise RuntimeError(f"flash attention {kind}: no block configuration fits this GPU "
                           f"(head dim {self.head_dim}, {self.dtype})") from error


_chosen: dict[tuple, int] = {}


# ----------------------------------------------------------------------------------------------
# Forward and backward: allocate -> launch
# ----------------------------------------------------------------------------------------------

def forward(q, k, v, bias, cu_q, cu_k, *params) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) for the custom op's inputs (params: OP_PARAMS)."""
    out = torch.empty_like(q)
    p = Problem.of(q, k, bias, cu_q, *params, v, out)
    if p.varlen:
        lse = torch.empty((p.n_heads, q.shape[0]), dtype=torch.float32, device=q.device)
    else:
        lse = torch.empty((p.batch, p.n_heads, p.seqlen_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or p.seqlen_q == 0:
        return out, lse
    p.launch("fwd", dict(q=q, k=k, v=v, out=out, lse=lse, bias=bias, cu_q=cu_q, cu_k=cu_k))
    return out, lse


def backward(dout, q, k, v, out, lse, bias, cu_q, cu_k, *params):
    """(dq, dk, dv) for the custom op's inputs (params: OP_PARAMS)."""
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    p = Problem.of(q, k, bias, cu_q, *params, v, out, dout, dq, dk, dv)
    if dk.numel() == 0 and dq.numel() == 0:
        return dq, dk, dv
    if p.seqlen_q == 0 or dq.numel() == 0:      # no query: no gradient reaches k and v
        return dq, dk.zero_(), dv.zero_()
    t = dict(q=q, k=k, v=v, out=out, lse=lse, bias=bias, cu_q=cu_q, cu_k=cu_k, dout=dout,
             delta=torch.empty_like(lse), dq=dq, dk=dk, dv=dv)
    p.launch("pre", t)
    if p.seqlen_k > 0 and dk.numel() > 0:
        p.launch("dkdv", t)
    p.launch("dq", t)
    return dq, dk, dv
