"""Plain-PyTorch attention: the twin of fused_lm/ops/attention/ (float64-capable).

Materialises the (Nq, Nk) score matrix, so it is for tests, benchmarks' eager baseline and
small inputs only. Semantics (identical to the kernel):

* layout (B, N, H, D), or packed (T, H, D) with ``cu_seqlens_q/k`` (looped per sequence);
* GQA/MQA: each key/value head serves ``Hq / Hkv`` consecutive query heads (repeated here);
* s = scale * q k^T, or softcap * tanh(scale * q k^T / softcap); plus ``key_bias[b, j]``;
* visibility with query i, key j, ``off = Nk - Nq`` (bottom-right, flash-attn >= 2.1):
  ``j >= i + off - left`` if left >= 0, ``j <= i + off + right`` if right >= 0; causal is the
  window (-1, 0) intersected with the given one. ``causal_top_left`` is torch SDPA's is_causal
  (``j <= i``);
* a query row that sees no key gives output 0 and lse = -inf.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def visibility(n_q: int, n_k: int, *, causal: bool = False, window: Optional[tuple[int, int]] = None,
               causal_top_left: bool = False, device=None) -> torch.Tensor:
    """(n_q, n_k) bool: True where query i may attend to key j."""
    i = torch.arange(n_q, device=device)[:, None]
    j = torch.arange(n_k, device=device)[None, :]
    off = n_k - n_q
    left, right = (-1, -1) if window is None else window
    vis = torch.ones(n_q, n_k, dtype=torch.bool, device=device)
    if causal:
        if causal_top_left:
            vis &= j <= i
        else:
            right = 0 if right < 0 else min(right, 0)
    if left >= 0:
        vis &= j >= i + off - left
    if right >= 0:
        vis &= j <= i + off + right
    return vis


def _dense(q, k, v, *, scale, causal, window, softcap, key_bias, causal_top_left):
    # q (B, Nq, Hq, D); k, v (B, Nk, Hkv, D)
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale                     # (B, H, Nq, Nk)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if key_bias is not None:
        s = s + key_bias.to(s.dtype)[:, None, None, :]
    vis = visibility(q.shape[1], k.shape[1], causal=causal, window=window,
                     causal_top_left=causal_top_left, device=q.device)
    s = s.masked_fill(~vis, float("-inf"))
    # Softmax with empty rows allowed: shift by the (detached) row max, 0 when the row is empty.
    m = s.detach().amax(dim=-1, keepdim=True) if s.shape[-1] > 0 else s.new_zeros(s.shape[:-1] + (1,))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    l = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(l == 0, torch.ones_like(l), l)
    out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    lse = (torch.log(l) + m).squeeze(-1)                                  # (B, H, Nq); -inf if empty
    return out, lse


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: Optional[float] = None, window: Optional[tuple[int, int]] = None,
              softcap: Optional[float] = None, key_bias: Optional[torch.Tensor] = None,
              cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
              causal_top_left: bool = False, return_lse: bool = False):
    """Attention in q's dtype. Returns out (like q), and lse ((B, Hq, Nq), or (Hq, T) when packed)
    when ``return_lse``."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kw = dict(scale=scale, causal=causal, window=window, softcap=softcap,
              causal_top_left=causal_top_left)
    if cu_seqlens_q is None:
        out, lse = _dense(q, k, v, key_bias=key_bias, **kw)
        return (out, lse) if return_lse else out
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    outs, lses = [], []
    for s in range(len(cq) - 1):
        o, l = _dense(q[None, cq[s]:cq[s + 1]], k[None, ck[s]:ck[s + 1]], v[None, ck[s]:ck[s + 1]],
                      key_bias=None, **kw)
        outs.append(o[0])
        lses.append(l[0])
    out = torch.cat(outs, dim=0) if outs else q.new_empty(q.shape)
    lse = torch.cat(lses, dim=-1) if lses else q.new_empty((q.shape[1], 0))
    return (out, lse) if return_lse else out


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 values rounded to TF32 (what a GPU tensor core multiplies: 1 + 10 mantissa bits,
    round to nearest with ties away from zero, as ``cvt.rna.tf32.f32``), returned as fp32. The
    twin of the interpreter's operand rounding in fused_lm/ops/attention/kernels.py (``_tf32``).

    A value in [2^(e-1), 2^e) keeps 11 significant bits: it is rounded to a multiple of
    2^(e-11); subnormals (fixed exponent) to multiples of 2^-136 (the same 13 dropped bits).
    Inf and NaN pass unchanged; rounding past the largest float gives inf."""
    x = x.to(torch.float32)
    x64 = x.to(torch.float64)
    _, e = torch.frexp(x64)
    quantum = torch.exp2(torch.clamp(e.to(torch.float64) - 11, min=-136.0))
    r = torch.copysign(torch.floor(x64.abs() / quantum + 0.5) * quantum, x64)
    return torch.where(torch.isfinite(x), r.to(torch.float32), x)
