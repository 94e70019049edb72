"""Functional attention: ``scaled_dot_product_attention`` (torch's signature) and
``flash_attention`` (flash-attn's feature set), over fused_lm/ops/attention/ (issues 7,
11, 12).

Backends (fused_lm/_backend.py, op "attention"): "triton" (CUDA tensors, or CPU tensors under
the Triton interpreter) runs the fused kernels; "torch" (CPU tensors otherwise, float64, or
FUSED_LM_BACKEND=torch) runs torch's own SDPA wherever its semantics reach, so a CPU user pays
nothing for the drop-in: the SDPA form always; ``flash_attention`` for causal (bottom-right
alignment through torch's top-left ``is_causal`` on the rows that see keys, or a boolean mask),
windows (a boolean mask), GQA (``enable_gqa``) and packed sequences (one SDPA call per
sequence), with the LSE from torch's CPU flash kernel when ``return_lse``. Only softcap (which
torch cannot express) runs the materialising float32 reference (fused_lm/reference/attention.py).

Numerics: fp16/bf16 inputs accumulate in fp32 and store P and dS in the input dtype before the
P V, dS K and dS^T Q products (as flash-attn). fp32 inputs multiply at ``input_precision``
("ieee" unless torch allows TF32 for CUDA matmuls; "tf32" is ~1e-3 relative, and the
interpreter rounds the operands to TF32 like the GPU so CI sees that error).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from fused_lm import _backend
from fused_lm.ops import attention as _fa

_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason in _warned:
        return
    _warned.add(reason)
    warnings.warn(f"fused_lm scaled_dot_product_attention: {reason}; falling back to "
                  "torch.nn.functional.scaled_dot_product_attention (same numerics, torch's speed). "
                  "This warning is shown once.", stacklevel=4)


def _torch_attention(q, k, v, *, key_bias=None, causal=False, mask=None, dropout_p=0.0,
                     scale=None):
    """torch SDPA on (B, N, H, D) tensors. ``causal`` is top-left (torch's); ``mask`` is an SDPA
    mask broadcastable to (B, H, Nq, Nk) (bool: True = attend, or additive); ``key_bias`` (B, Nk)
    additive."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))                 # (B, H, N, D)
    n_q, n_k = q.shape[1], k.shape[1]
    additive = None
    if mask is not None:
        additive = mask if mask.dtype != torch.bool else torch.zeros(
            mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    if key_bias is not None:
        kb = key_bias[:, None, None, :].to(q.dtype)
        additive = kb if additive is None else additive + kb
    if causal and additive is not None:
        tril = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril()
        additive = additive + torch.zeros(n_q, n_k, dtype=q.dtype, device=q.device).masked_fill(
            ~tril, float("-inf"))
        causal = False
    kwargs = {"enable_gqa": True} if qt.shape[1] != kt.shape[1] else {}
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=None if additive is None else additive.to(q.dtype),
                                         dropout_p=dropout_p, is_causal=causal, scale=scale, **kwargs)
    return out.transpose(1, 2)


def _kernel_problem(q, k, v) -> Optional[str]:
    """Why the fused kernel cannot take these (B, N, H, D) tensors, or None."""
    if not (q.dtype == k.dtype == v.dtype):
        return None  # torch raises its own error
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} is not a kernel dtype"
    d, dv = q.shape[-1], v.shape[-1]
    if k.shape[-1] != d or dv != d:
        return f"head dims differ (q/k {d}, v {dv})"
    if not _fa.MIN_HEAD_DIM <= d <= _fa.MAX_HEAD_DIM:
        return f"head dim {d} is not in [{_fa.MIN_HEAD_DIM}, {_fa.MAX_HEAD_DIM}]"
    return None


def _attention_bnhd(q, k, v, *, key_bias=None, causal=False, mask=None, dropout_p=0.0,
                    scale=None) -> torch.Tensor:
    """(B, N, H, D) attention with torch SDPA's semantics (top-left causal), on the kernel when
    it can take it, else torch SDPA (warning once when the kernel was the choice)."""
    which = _backend.select("attention", q.device, q.dtype)
    if which == "torch":
        return _torch_attention(q, k, v, key_bias=key_bias, causal=causal, mask=mask,
                                dropout_p=dropout_p, scale=scale)
    reason = None
    if dropout_p > 0.0:
        reason = f"dropout_p={dropout_p} > 0 is not fused"
    elif mask is not None:
        reason = "attn_mask is not a key-padding mask (shape (B or 1, 1, 1, Nk))"
    elif key_bias is not None and key_bias.requires_grad:
        reason = "attn_mask requires grad (the kernel does not differentiate the mask)"
    else:
        reason = _kernel_problem(q, k, v)
    if reason is not None:
        _warn_once(reason)
        return _torch_attention(q, k, v, key_bias=key_bias, causal=causal, mask=mask,
                                dropout_p=dropout_p, scale=scale)
    out, _ = _fa.attention(q, k, v, scale=scale, causal=causal, causal_top_left=True,
                           key_bias=key_bias)
    return out


def _key_padding_bias(attn_mask: torch.Tensor, batch: int, n_k: int) -> Optional[torch.Tensor]:
    """(B, Nk) float32 additive bias when ``attn_mask`` (SDPA convention: bool True = attend) is
    a key-padding mask, i.e. broadcastable with shape (B or 1, 1, 1, Nk); else None."""
    if attn_mask.dim() > 4 or attn_mask.dim() == 0:
        return None
    shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
    if shape[1] != 1 or shape[2] != 1 or shape[3] != n_k or shape[0] not in (1, batch):
        return None
    m = attn_mask.reshape(shape[0], n_k).expand(batch, n_k)
    if m.dtype == torch.bool:
        return torch.zeros(batch, n_k, dtype=torch.float32, device=m.device).masked_fill(
            ~m, float("-inf"))
    if m.is_floating_point():
        return m.to(torch.float32)
    return None


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``: (B, H, N, D) tensors
    (or (B, N, D), one head), torch's semantics (``is_causal`` aligned top-left, as torch).

    On the fused kernel: no mask, or a key-padding ``attn_mask`` (bool, True = attend, or
    additive float) of shape (B or 1, 1, 1, Nk) (or anything that reshapes to it by dropping
    leading ones, e.g. (B, 1, 1, Nk)); GQA with ``enable_gqa=True``. Other masks, masks that
    require grad, ``dropout_p > 0``, head dims that are not a multiple of 8 in [8, 256] and
    differing q/v head dims fall back to torch's SDPA with a one-time warning.
    """
    if not isinstance(query, torch.Tensor) or query.dim() not in (3, 4) or key.dim() != query.dim() \
            or value.dim() != query.dim():
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask,
                                              dropout_p=dropout_p, is_causal=is_causal,
                                              scale=scale, enable_gqa=enable_gqa)
    if query.dim() == 3:
        out = scaled_dot_product_attention(query[:, None], key[:, None], value[:, None],
                                           attn_mask=None if attn_mask is None else (
                                               attn_mask[:, None] if attn_mask.dim() == 3 else attn_mask),
                                           dropout_p=dropout_p, is_causal=is_causal, scale=scale)
        return out[:, 0]
    heads_differ = query.shape[1] != key.shape[1] or key.shape[1] != value.shape[1]
    if (is_causal and attn_mask is not None) or (heads_differ and not enable_gqa) or \
            query.shape[0] != key.shape[0] or query.device != key.device or \
            query.dtype != key.dtype or key.dtype != value.dtype or \
            (enable_gqa and (key.shape[1] == 0 or query.shape[1] % key.shape[1] != 0)):
        # torch reports these (or broadcasts batch dims we do not support): let it.
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask,
                                              dropout_p=dropout_p, is_causal=is_causal,
                                              scale=scale, **({"enable_gqa": True} if enable_gqa else {}))
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))          # (B, N, H, D) views
    key_bias, mask = None, None
    if attn_mask is not None:
        key_bias = _key_padding_bias(attn_mask, q.shape[0], k.shape[1])
        if key_bias is None:
            mask = attn_mask
    out = _attention_bnhd(q, k, v, key_bias=key_bias, causal=is_causal, mask=mask,
                          dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    scale: Optional[float] = None, window: Optional[tuple[int, int]] = None,
                    softcap: Optional[float] = None, cu_seqlens_q: Optional[torch.Tensor] = None,
                    cu_seqlens_k: Optional[torch.Tensor] = None, max_seqlen_q: Optional[int] = None,
                    max_seqlen_k: Optional[int] = None, return_lse: bool = False,
                    deterministic: bool = False, backend: Optional[str] = None,
                    input_precision: Optional[str] = None):
    """Flash attention with flash-attn's layout and features.

    q (B, Nq, Hq, D), k and v (B, Nk, Hkv, D); or packed q (Tq, Hq, D), k and v (Tk, Hkv, D) with
    ``cu_seqlens_q/k`` (S + 1,) int32 cumulative lengths on the device (``cu[0] = 0``,
    non-decreasing, ``cu[-1]`` = token count). Hq must be a multiple of Hkv (GQA/MQA: K and V are
    never expanded; dK/dV are summed over the query group in the kernel). D: any of 1 ... 256.
    fp16, bf16, fp32 (see ``input_precision`` for fp32 on GPUs).

    * ``causal``: aligned bottom-right when Nq != Nk (flash-attn >= 2.1): query i sees key j iff
      j <= i + Nk - Nq. Rows that see no key output 0 (lse -inf).
    * ``window=(left, right)``: query i sees keys i + Nk - Nq - left ... i + Nk - Nq + right;
      -1 is unbounded. With ``causal`` the right bound becomes min(right, 0).
    * ``softcap``: scores become softcap * tanh(scale * q.k / softcap) (Gemma 2).
    * ``max_seqlen_q/k``: the longest sequence (sizes the launch grid). When None it is computed
      once from ``cu_seqlens`` with one host synchronisation; pass it to avoid that (and under
      torch.compile). Checking the ``cu_seqlens`` values also needs a synchronisation, so on CUDA
      it runs only with FUSED_LM_CHECK=1 (always on CPU tensors).
    * ``return_lse``: also return the log-sum-exp of the scores, float32, (B, Hq, Nq) or packed
      (Hq, Tq); it is not differentiable.
    * ``deterministic``: accepted for flash-attn compatibility. The backward never uses atomics
      (dK/dV and dQ are separate kernels), so it is always bitwise reproducible run to run on
      the same GPU and configuration; the flag changes nothing.
    * ``input_precision``: how the kernels multiply fp32 inputs: "ieee" (exact fp32 products),
      "tf32" (TF32 tensor cores: ~1e-3 relative, fast) or "tf32x3" (three TF32 products per
      product: ~fp32 accuracy). None follows torch's CUDA matmul setting
      (``torch.backends.cuda.matmul.fp32_precision`` / ``allow_tf32`` /
      ``torch.set_float32_matmul_precision``: "ieee" unless TF32 is allowed). fp16/bf16 inputs
      ignore it; the torch path (CPU) is always full fp32.
    """
    del deterministic
    which = _backend.select("attention", q.device, q.dtype, backend)
    if which == "triton":
        out, lse = _fa.attention(q, k, v, scale=scale, causal=causal, window=window,
                                 softcap=softcap, cu_seqlens_q=cu_seqlens_q,
                                 cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                                 max_seqlen_k=max_seqlen_k, input_precision=input_precision)
        return (out, lse) if return_lse else out
    if input_precision is not None and input_precision not in _fa.PRECISIONS:
        raise ValueError(f"input_precision must be one of {', '.join(_fa.PRECISIONS)} or None, "
                         f"got {input_precision!r}")
    out, lse = _torch_flash_attention(q, k, v, causal=causal, scale=scale, window=window,
                                      softcap=softcap, cu_seqlens_q=cu_seqlens_q,
                                      cu_seqlens_k=cu_seqlens_k, need_lse=return_lse)
    return (out, lse) if return_lse else out


# ------------------------------------------------------------------------------------------------
# The torch path of flash_attention (CPU tensors without the interpreter, float64,
# FUSED_LM_BACKEND=torch): torch's own SDPA wherever its semantics reach, the reference elsewhere
# ------------------------------------------------------------------------------------------------

def _sdpa_mask(n_q: int, n_k: int, causal: bool, window, device):
    """How torch SDPA expresses flash_attention's visibility (bottom-right aligned) for one
    (n_q, n_k) problem: (is_causal, bool mask (n_q, n_k) or None, first visible row). Rows before
    the first visible row see no key."""
    left, right = (-1, -1) if window is None else window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    off = n_k - n_q
    if left < 0 and right < 0:
        return False, None, 0
    if left < 0 and right == 0:
        if off == 0 or n_q <= 1 and off >= 0:
            return off == 0, None, 0        # square: torch's is_causal; one query sees every key
        if off < 0:
            # Rows i < -off see nothing; row i >= -off sees keys j <= i + off: torch's top-left
            # is_causal on the square block q[-off:] x k.
            return True, None, -off
    from fused_lm.reference.attention import visibility

    return False, visibility(n_q, n_k, window=(left, right), device=device), 0


def _sdpa_dense(q, k, v, *, causal, scale, window, need_lse):
    """(B, N, H, D) attention with flash_attention's semantics through torch's SDPA. Returns
    (out, lse or None); lse (B, Hq, Nq) float32 when ``need_lse``."""
    n_q, n_k = q.shape[1], k.shape[1]
    is_causal, mask, first = _sdpa_mask(n_q, n_k, causal, window, q.device)
    if first:
        rest_out, rest_lse = _sdpa_dense(q[:, first:], k, v, causal=True, scale=scale,
                                         window=None, need_lse=need_lse)
        out = torch.cat([rest_out.new_zeros(q.shape[0], first, *q.shape[2:]), rest_out], dim=1)
        lse = None
        if need_lse:
            lse = torch.cat([rest_lse.new_full((*rest_lse.shape[:2], first), float("-inf")),
                             rest_lse], dim=2)
        return out, lse
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))                 # (B, H, N, D) views
    gqa = qt.shape[1] != kt.shape[1]
    lse = None
    if need_lse and q.device.type == "cpu":
        # torch's CPU flash kernel (the one F.scaled_dot_product_attention runs on CPU) also
        # returns the log-sum-exp; it takes GQA as is and an additive mask in q's dtype.
        additive = None if mask is None else torch.zeros(
            mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qt, kt, vt, 0.0, is_causal, attn_mask=additive, scale=scale)
        lse = lse.float()
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=is_causal,
                                             scale=scale, **({"enable_gqa": True} if gqa else {}))
    if mask is not None and lse is not None:
        # torch outputs 0 for a row that sees no key (as flash_attention) but lse 0, not -inf.
        lse = lse.masked_fill(~mask.any(dim=-1), float("-inf"))
    return out.transpose(1, 2), lse


def _torch_flash_attention(q, k, v, *, causal, scale, window, softcap, cu_seqlens_q,
                           cu_seqlens_k, need_lse):
    """flash_attention's torch path (see the routing table in README "Attention")."""
    from fused_lm.reference import attention as _ref

    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    sdpa_ok = (not softcap and q.numel() > 0 and k.numel() > 0 and q.shape[-1] == v.shape[-1]
               and (q.device.type == "cpu" or not need_lse))
    if sdpa_ok and varlen and cu_seqlens_q is not None and cu_seqlens_k is not None:
        # Packed sequences: one SDPA call per sequence (cu_seqlens are read on the host).
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        outs, lses = [], []
        for s in range(len(cq) - 1):
            qs, ks, vs = (t[None, a:b] for t, a, b in ((q, cq[s], cq[s + 1]), (k, ck[s], ck[s + 1]),
                                                       (v, ck[s], ck[s + 1])))
            if qs.shape[1] == 0:
                continue
            if ks.shape[1] == 0:
                outs.append(qs.new_zeros(qs.shape[1:]))
                if need_lse:
                    lses.append(qs.new_full((qs.shape[2], qs.shape[1]), float("-inf"),
                                            dtype=torch.float32))
                continue
            o, l = _sdpa_dense(qs, ks, vs, causal=causal, scale=scale, window=window,
                               need_lse=need_lse)
            outs.append(o[0])
            if need_lse:
                lses.append(l[0])
        out = torch.cat(outs) if outs else q.new_empty(q.shape)
        lse = None
        if need_lse:
            lse = torch.cat(lses, dim=-1) if lses else q.new_empty((q.shape[1], 0), dtype=torch.float32)
        return out, lse
    if sdpa_ok and not varlen:
        return _sdpa_dense(q, k, v, causal=causal, scale=scale, window=window, need_lse=need_lse)
    # softcap (and degenerate sizes): the materialising reference, in fp32 (float64 for float64).
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    out, lse = _ref.attention(q.to(compute), k.to(compute), v.to(compute), causal=causal,
                              scale=scale, window=window, softcap=softcap,
                              cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                              return_lse=True)
    return out.to(q.dtype), lse.float()


__all__ = ["scaled_dot_product_attention", "flash_attention"]
