"""``MultiheadAttention``: drop-in for ``torch.nn.MultiheadAttention`` over the fused attention
kernel (issue 7), plus grouped-query attention (``num_kv_heads``).

Differences from torch, all deliberate:

* ``batch_first=True`` by default (torch: False); ``batch_first=False`` is accepted.
* ``need_weights`` defaults to False and ``need_weights=True`` raises: the fused kernel never
  materialises the attention weights (use ``torch.nn.MultiheadAttention`` when you need them).
  A default of True, as torch's, would make every call that relies on the default fail, so the
  default differs; the returned weights are always None.
* ``is_causal=True`` alone (no ``attn_mask``) means a causal mask (torch requires the mask too;
  with both, as torch's fast path, the mask is taken to be causal and is not read).

State dict: identical to torch's when ``num_kv_heads`` is None (or equal to ``num_heads``) --
``in_proj_weight`` (3E, E) and ``in_proj_bias`` (3E,) when kdim == vdim == embed_dim, else
``q_proj_weight`` (E, E), ``k_proj_weight`` (E, kdim), ``v_proj_weight`` (E, vdim) -- plus
``out_proj.weight/bias``, ``bias_k``/``bias_v`` (1, 1, E) with ``add_bias_kv``. So
``load_state_dict(torch_mha.state_dict())`` works both ways. With ``num_kv_heads`` = G < H
(GQA), K and V project to G * head_dim = Ekv features, always with separate weights:
``q_proj_weight`` (E, E), ``k_proj_weight`` (Ekv, kdim), ``v_proj_weight`` (Ekv, vdim),
``in_proj_bias`` (E + 2 * Ekv,) ordered q, k, v; ``bias_k``/``bias_v`` (1, 1, Ekv).

Masks follow torch's MultiheadAttention convention: ``key_padding_mask`` (B, S) bool True =
ignore (or additive float) runs in the kernel; a general ``attn_mask`` (L, S) or (B * H, L, S)
(bool True = not allowed, or additive), and dropout in training mode, fall back to torch's SDPA
with a one-time warning.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

try:
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear as _OutProj
except ImportError:  # pragma: no cover - very old torch
    _OutProj = nn.Linear

from fused_lm.nn._functional_attention import _attention_bnhd


def _as_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """torch MHA convention (bool True = masked out, or additive) -> additive float."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class MultiheadAttention(nn.Module):
    """Multi-head attention with torch.nn.MultiheadAttention's constructor, forward arguments and
    state dict (see the module docstring for the differences). Returns ``(attn_output, None)``."""

    __constants__ = ["batch_first"]

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = True, device=None, dtype=None, *,
                 num_kv_heads: Optional[int] = None) -> None:
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be > 0, got {embed_dim} and {num_heads}")
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        if self.head_dim * num_heads != embed_dim:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if self.num_kv_heads <= 0 or num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        self.kv_dim = self.num_kv_heads * self.head_dim
        self._qkv_same_embed_dim = (self.kdim == embed_dim and self.vdim == embed_dim
                                    and self.kv_dim == embed_dim)
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **factory))
            self.k_proj_weight = nn.Parameter(torch.empty((self.kv_dim, self.kdim), **factory))
            self.v_proj_weight = nn.Parameter(torch.empty((self.kv_dim, self.vdim), **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(embed_dim + 2 * self.kv_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = _OutProj(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, self.kv_dim), **factory))
            self.bias_v = nn.Parameter(torch.empty((1, 1, self.kv_dim), **factory))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # torch.nn.MultiheadAttention's initialisation.
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def _project(self, query, key, value):
        e, ekv = self.embed_dim, self.kv_dim
        b = self.in_proj_bias
        b_q, b_k, b_v = (None, None, None) if b is None else b.split([e, ekv, ekv])
        if self._qkv_same_embed_dim:
            if query is key and key is value:                # self-attention: one GEMM
                qkv = F.linear(query, self.in_proj_weight, b)
                return qkv.split([e, ekv, ekv], dim=-1)
            w_q, w_k, w_v = self.in_proj_weight.split([e, ekv, ekv])
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = False,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        """query (B, L, E), key (B, S, kdim), value (B, S, vdim) (batch_first; (L, B, E) else;
        (L, E) unbatched). Returns (attn_output like query, None)."""
        if need_weights:
            raise ValueError("fused_lm.nn.MultiheadAttention does not compute attention weights "
                             "(need_weights=True): the fused kernel never materialises them. Pass "
                             "need_weights=False, or use torch.nn.MultiheadAttention for the weights.")
        del average_attn_weights
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"query, key, value must all be 3-D (batched) or 2-D (unbatched), got "
                             f"{query.dim()}-D, {key.dim()}-D, {value.dim()}-D")
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query[None], key[None], value[None]
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask[None]
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if query.shape[-1] != self.embed_dim:
            raise ValueError(f"query has {query.shape[-1]} features, expected embed_dim={self.embed_dim}")
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(f"key and value must share (batch, seqlen), got {tuple(key.shape[:2])} "
                             f"and {tuple(value.shape[:2])}")
        batch, n_q, n_k = query.shape[0], query.shape[1], key.shape[1]
        dtype = query.dtype
        q, k, v = self._project(query, key, value)          # (B, L, E), (B, S, Ekv), (B, S, Ekv)

        # Masks, as additive float: key_bias (B, S'), general mask (B, H, L, S').
        key_bias = None
        if key_padding_mask is not None:
            if key_padding_mask.shape != (batch, n_k):
                raise ValueError(f"key_padding_mask must have shape (batch, S) = {(batch, n_k)}, got "
                                 f"{tuple(key_padding_mask.shape)}")
            key_bias = _as_additive(key_padding_mask, torch.float32)
        mask = None
        causal = is_causal
        extra_keys = (self.bias_k is not None) + bool(self.add_zero_attn)
        if is_causal and extra_keys and attn_mask is None:
            # torch appends the extra keys visible to every query; a plain causal mask would not.
            attn_mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).triu(1)
        if attn_mask is not None and (not is_causal or extra_keys):
            causal = False
            mask = _as_additive(attn_mask, dtype)
            if mask.dim() == 2:
                if mask.shape != (n_q, n_k):
                    raise ValueError(f"2-D attn_mask must be (L, S) = {(n_q, n_k)}, got {tuple(mask.shape)}")
                mask = mask[None, None]
            elif mask.dim() == 3:
                if mask.shape != (batch * self.num_heads, n_q, n_k):
                    raise ValueError(f"3-D attn_mask must be (batch * num_heads, L, S) = "
                                     f"{(batch * self.num_heads, n_q, n_k)}, got {tuple(mask.shape)}")
                mask = mask.view(batch, self.num_heads, n_q, n_k)
            else:
                raise ValueError(f"attn_mask must be 2-D or 3-D, got {mask.dim()}-D")
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(batch, 1, self.kv_dim).to(k.dtype)], dim=1)
            v = torch.cat([v, self.bias_v.expand(batch, 1, self.kv_dim).to(v.dtype)], dim=1)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(batch, 1, self.kv_dim)], dim=1)
            v = torch.cat([v, v.new_zeros(batch, 1, self.kv_dim)], dim=1)
        if extra_keys:
            if key_bias is not None:
                key_bias = F.pad(key_bias, (0, extra_keys))
            if mask is not None:
                mask = F.pad(mask, (0, extra_keys))

        q = q.reshape(batch, n_q, self.num_heads, self.head_dim)
        k = k.reshape(batch, k.shape[1], self.num_kv_heads, self.head_dim)
        v = v.reshape(batch, v.shape[1], self.num_kv_heads, self.head_dim)
        if mask is not None and key_bias is not None:
            mask = mask + key_bias[:, None, None, :].to(mask.dtype)
            key_bias = None
        out = _attention_bnhd(q, k, v, key_bias=key_bias, causal=causal, mask=mask,
                              dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.reshape(batch, n_q, self.embed_dim))
        if unbatched:
            out = out[0]
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}")


__all__ = ["MultiheadAttention"]
