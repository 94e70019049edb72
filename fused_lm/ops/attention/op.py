"""The entry point: validation (-> a Problem), and the torch.library custom ops with autograd
(torch.compile(fullgraph=True) traces through them)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

from fused_lm.ops.attention import launch as _launch
from fused_lm.ops._spec import FamilySpec
from fused_lm.ops.attention.launch import (MAX_HEAD_DIM, MIN_HEAD_DIM, OP_PARAMS, PRECISIONS,
                                           Problem)

try:
    import triton
except ImportError:  # pragma: no cover - triton is a Linux dependency
    triton = None

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

SPEC = FamilySpec(
    name="attention", backends=("triton", "torch"), gpu_default="triton",
    gpu_default_why="the only kernel backend (no C++ kernel); not yet measured on a GPU "
                    "(bench/bench_attention.py)",
    reference="fused_lm.reference.attention:attention", dtypes=KERNEL_DTYPES)


def checked_mode() -> bool:
    """FUSED_LM_CHECK=1 turns on the checks that read device values (a host synchronisation)."""
    return os.environ.get("FUSED_LM_CHECK", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------

# One schema for the scalars of both ops (launch.OP_PARAMS: Problem.op_params() writes them,
# Problem.of reads them); the Python functions pass them through as *params.
_PARAMS = ", ".join(f"{kind} {name}" for name, kind in OP_PARAMS)
_TENSORS = "Tensor q, Tensor k, Tensor v"
_OPTIONAL = "Tensor? bias, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k"


@torch.library.custom_op("fused_lm::flash_attn_fwd", mutates_args=(),
                         schema=f"({_TENSORS}, {_OPTIONAL}, {_PARAMS}) -> (Tensor, Tensor)")
def _flash_attn_fwd(q, k, v, bias, cu_q, cu_k, *params):
    return _launch.forward(q, k, v, bias, cu_q, cu_k, *params)


@_flash_attn_fwd.register_fake
def _flash_attn_fwd_fake(q, k, v, bias, cu_q, cu_k, *params):
    if cu_q is not None:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    return torch.empty_like(q), lse


@torch.library.custom_op(
    "fused_lm::flash_attn_bwd", mutates_args=(),
    schema=f"(Tensor dout, {_TENSORS}, Tensor out, Tensor lse, {_OPTIONAL}, {_PARAMS}) "
           "-> (Tensor, Tensor, Tensor)")
def _flash_attn_bwd(dout, q, k, v, out, lse, bias, cu_q, cu_k, *params):
    return _launch.backward(dout, q, k, v, out, lse, bias, cu_q, cu_k, *params)


@_flash_attn_bwd.register_fake
def _flash_attn_bwd_fake(dout, q, k, v, *_):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, bias, cu_q, cu_k, *params = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, cu_q, cu_k)
    ctx.params = params
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    # The lse output is not differentiable (as in flash-attn): its gradient is ignored.
    q, k, v, out, lse, bias, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = _flash_attn_bwd(dout, q, k, v, out, lse, bias, cu_q, cu_k, *ctx.params)
    return (dq, dk, dv) + (None,) * (3 + len(OP_PARAMS))


_flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Validation and the entry point
# ----------------------------------------------------------------------------------------------

def _check_cu_seqlens(name: str, cu: torch.Tensor, total: int, max_seqlen: Optional[int],
                      device: torch.device) -> torch.Tensor:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(cu).__name__}")
    if cu.dim() != 1 or cu.shape[0] < 2:
        raise ValueError(f"{name} must be 1-D with batch + 1 >= 2 entries, got shape {tuple(cu.shape)}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 (or int64), got {cu.dtype}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    if cu.device.type == "cpu" or checked_mode():
        # Reads the values: a host synchronisation on GPU, so only in checked mode there.
        values = cu.detach().to("cpu", torch.int64)
        if values[0].item() != 0:
            raise ValueError(f"{name}[0] must be 0, got {values[0].item()}")
        lengths = values[1:] - values[:-1]
        if (lengths < 0).any():
            bad = int(torch.nonzero(lengths < 0)[0, 0]) + 1
            raise ValueError(f"{name} must be non-decreasing (cumulative sequence lengths); "
                             f"{name}[{bad}] = {values[bad].item()} < {name}[{bad - 1}] = "
                             f"{values[bad - 1].item()}")
        if values[-1].item() != total:
            raise ValueError(f"{name}[-1] = {values[-1].item()} does not match the token count "
                             f"{total} of the packed tensor")
        if max_seqlen is not None and lengths.max().item() > max_seqlen:
            raise ValueError(f"max_seqlen for {name} is {max_seqlen} but the longest sequence has "
                             f"{lengths.max().item()} tokens")
    return cu.to(torch.int32) if cu.dtype != torch.int32 else cu


def _max_seqlen(cu: torch.Tensor) -> int:
    # One host synchronisation (documented): pass max_seqlen_* to avoid it (and under compile).
    return int((cu[1:] - cu[:-1]).max().item())


@dataclass
class Call:
    """A validated call: the tensors as the kernels take them and the Problem."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_bias: Optional[torch.Tensor]
    cu_seqlens_q: Optional[torch.Tensor]
    cu_seqlens_k: Optional[torch.Tensor]
    problem: Problem


def validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
             causal: bool = False, window: Optional[tuple[int, int]] = None,
             softcap: Optional[float] = None, key_bias: Optional[torch.Tensor] = None,
             cu_seqlens_q: Optional[torch.Tensor] = None,
             cu_seqlens_k: Optional[torch.Tensor] = None, max_seqlen_q: Optional[int] = None,
             max_seqlen_k: Optional[int] = None, causal_top_left: bool = False,
             input_precision: Optional[str] = None) -> Call:
    """Checks a call (clear errors naming what was wrong and what was expected) and builds its
    Problem."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in KERNEL_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; the Triton kernel takes float16, bfloat16 "
                            "or float32 (other dtypes use the torch backend)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    want = 3 if varlen else 4
    layout = "(total_tokens, heads, head_dim)" if varlen else "(batch, seqlen, heads, head_dim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != want:
            raise ValueError(f"{name} must be {want}-D {layout}, got shape {tuple(t.shape)}")
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim or v.shape[-1] != head_dim:
        raise ValueError(f"q, k, v must share the head dim, got {q.shape[-1]}, {k.shape[-1]}, "
                         f"{v.shape[-1]}")
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {head_dim}")
    if input_precision is not None and input_precision not in PRECISIONS:
        raise ValueError(f"input_precision must be one of {', '.join(PRECISIONS)} or None, got "
                         f"{input_precision!r}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    n_heads, n_kv_heads = q.shape[-2], k.shape[-2]
    if n_kv_heads == 0 or n_heads % n_kv_heads != 0:
        raise ValueError(f"query heads ({n_heads}) must be a multiple of key/value heads ({n_kv_heads})")
    if not varlen and q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must share the batch size, got {q.shape[0]} and {k.shape[0]}")
    if varlen:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError("packed sequences need both cu_seqlens_q and cu_seqlens_k")
        if key_bias is not None:
            raise ValueError("key_bias is not supported with packed sequences (pack without padding)")
        cu_seqlens_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, q.device)
        cu_seqlens_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, q.device)
        if cu_seqlens_q.shape != cu_seqlens_k.shape:
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length, got "
                             f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}")
        max_q = _max_seqlen(cu_seqlens_q) if max_seqlen_q is None else int(max_seqlen_q)
        max_k = _max_seqlen(cu_seqlens_k) if max_seqlen_k is None else int(max_seqlen_k)
    else:
        if max_seqlen_q is not None or max_seqlen_k is not None:
            raise ValueError("max_seqlen_q/max_seqlen_k apply only to packed sequences (cu_seqlens)")
        max_q, max_k = q.shape[1], k.shape[1]
    if key_bias is not None:
        if key_bias.shape != (q.shape[0], k.shape[1]):
            raise ValueError(f"key_bias must have shape (batch, seqlen_k) = {(q.shape[0], k.shape[1])}, "
                             f"got {tuple(key_bias.shape)}")
        if key_bias.device != q.device:
            raise ValueError(f"key_bias is on {key_bias.device} but q is on {q.device}")
        key_bias = key_bias.to(torch.float32).contiguous()
    for name, t in (("q", q), ("k", k), ("v", v)):
        # Tile offsets (rows within one block x the token stride) are int32 in the kernels;
        # batch, head and block starts are int64.
        if abs(t.stride(-3)) * _launch.MAX_BLOCK_ROWS > _launch._INT32_MAX:
            raise ValueError(f"{name}: token stride {t.stride(-3)} is too large (at most "
                             f"{_launch._INT32_MAX // _launch.MAX_BLOCK_ROWS} elements between "
                             "tokens)")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))

    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    softcap = 0.0 if softcap is None else float(softcap)
    if softcap < 0:
        raise ValueError(f"softcap must be > 0 (or None/0 for none), got {softcap}")
    left, right = (-1, -1) if window is None else window
    if not (isinstance(left, int) and isinstance(right, int)) or left < -1 or right < -1:
        raise ValueError(f"window must be (left, right) ints >= -1 (-1: unbounded), got {window}")
    has_left, has_right = left >= 0, right >= 0
    if causal:
        if causal_top_left:
            # torch SDPA: key j visible to query i iff j <= i, i.e. right = -(Nk - Nq).
            if window is not None:
                raise ValueError("causal_top_left takes no window")
            has_right, right = True, (max_q - max_k)
        else:
            has_right, right = True, (0 if right < 0 else min(right, 0))
    problem = Problem.of(q, k, key_bias, cu_seqlens_q, max_q, max_k, scale, has_left,
                         max(left, 0), has_right, right, softcap, input_precision or "", v)
    return Call(q, k, v, key_bias, cu_seqlens_q, cu_seqlens_k, problem)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
              causal: bool = False, window: Optional[tuple[int, int]] = None,
              softcap: Optional[float] = None, key_bias: Optional[torch.Tensor] = None,
              cu_seqlens_q: Optional[torch.Tensor] = None,
              cu_seqlens_k: Optional[torch.Tensor] = None, max_seqlen_q: Optional[int] = None,
              max_seqlen_k: Optional[int] = None, causal_top_left: bool = False,
              input_precision: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton flash attention; returns ``(out, lse)``. Layout (B, N, H, D) or varlen (T, H, D)
    with ``cu_seqlens_*`` (see the package docstring). ``key_bias`` (B, Nk) float32 is added to
    the scores of every query (key-padding masks: 0 or -inf); it gets no gradient.
    ``causal_top_left`` aligns the causal mask top-left (torch SDPA's ``is_causal``) instead of
    bottom-right; it needs no window. ``input_precision`` (fp32 inputs only): "ieee", "tf32" or
    "tf32x3" for the products; None follows torch's CUDA matmul setting (default_precision(),
    read when the kernels run)."""
    if triton is None:
        raise RuntimeError("flash attention needs triton (pip install triton)")
    c = validate(q, k, v, scale=scale, causal=causal, window=window, softcap=softcap,
                 key_bias=key_bias, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                 max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                 causal_top_left=causal_top_left, input_precision=input_precision)
    return _flash_attn_fwd(c.q, c.k, c.v, c.key_bias, c.cu_seqlens_q, c.cu_seqlens_k,
                           *c.problem.op_params())
