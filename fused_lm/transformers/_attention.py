"""fused_lm attention behind transformers' ``AttentionInterface``.

transformers' attention modules compute q, k, v as (B, H, T, D) tensors (grouped-query heads not
expanded), then call ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, query, key,
value, attention_mask, dropout=..., scaling=..., [sliding_window=..., softcap=...], **kwargs)``
and expect ``(output (B, T, Hq, D), weights or None)``. The mask they pass comes from
``AttentionMaskInterface[config._attn_implementation]``: the function registered here,
``padding_mask``, hands over what the kernel can use directly:

* ``None`` when nothing is padded (causality, the sliding window and softcapping travel as the
  module's ``is_causal`` and the ``sliding_window`` / ``softcap`` keywords);
* the 2-D key-padding mask (B, Nk), bool (True = a real token), which ``attention_forward``
  unpads into packed sequences (``cu_seqlens``) for the varlen kernel and pads back;
* transformers' dense 4-D SDPA mask for everything the kernel cannot express (custom or/and mask
  overlays of multimodal models, block or chunked attention, static caches whose key slots are
  not all filled yet); ``attention_forward`` then falls back to transformers' SDPA path with a
  one-time warning.

Packed sequences reach the kernel from the flash-attention keywords ``cu_seq_lens_q/k`` and
``max_length_q/k`` (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``) or from
``position_ids`` that restart (a new sequence wherever the position does not grow by one, which
is transformers' own rule in ``masking_utils.find_packed_sequence_indices``).

Host synchronisation: unpadding needs the positions of the real tokens (``nonzero``) and the
longest sequence (it sizes the kernel grid), and packing from ``position_ids`` needs the sequence
starts. These are computed once per forward pass and reused by every layer: they are cached by
the identity (and version counter) of the mask / ``position_ids`` / ``max_length`` tensor, which
transformers passes unchanged to every layer. flash-attention's integration in transformers
recomputes them in every layer.

Layout: the kernel takes (B, T, H, D); ``query.transpose(1, 2)`` is a view of transformers'
tensors (last-dim stride 1), so nothing is copied except by unpadding.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from fused_lm.transformers._compat import transformers as _transformers

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, stacklevel=3)


# --------------------------------------------------------------------------------------------
# Per-forward caches keyed by tensor identity
# --------------------------------------------------------------------------------------------

class _IdentityCache:
    """The last few results of an expensive function of some tensors, keyed by the tensors'
    identity and version counters (an in-place change invalidates). Holds strong references to
    the keys (small int/bool tensors: masks, position ids), so an id cannot be reused while cached."""

    def __init__(self, size: int = 4):
        self.size = size
        self.entries: list[tuple[tuple, tuple, Any, Any]] = []

    def get(self, tensors: tuple, extra: Any, compute: Callable[[], Any]) -> Any:
        # Inference tensors have no version counter (and cannot be changed outside inference mode).
        versions = tuple(-1 if t.is_inference() else t._version for t in tensors)
        for keys, vers, ex, value in self.entries:
            if ex == extra and vers == versions and all(a is b for a, b in zip(keys, tensors)):
                return value
        value = compute()
        self.entries.insert(0, (tensors, versions, extra, value))
        del self.entries[self.size:]
        return value

    def clear(self) -> None:
        self.entries.clear()


_unpad_cache = _IdentityCache()
_packing_cache = _IdentityCache()
_int_cache = _IdentityCache()


def _as_int(value) -> int:
    """``max_length_q/k`` as a Python int (the collator gives a 0-d tensor): one sync per forward."""
    if isinstance(value, torch.Tensor):
        return _int_cache.get((value,), None, lambda: int(value.item()))
    return int(value)


class _Unpad:
    """Where the real tokens of a padded batch are, as the varlen kernel wants them."""

    def __init__(self, key_mask: torch.Tensor, n_q: int):
        batch, n_k = key_mask.shape
        dev = key_mask.device
        seqlens_k = key_mask.sum(-1, dtype=torch.int32)                       # (B,)
        self.cu_k = F.pad(torch.cumsum(seqlens_k, 0, dtype=torch.int32), (1, 0))
        idx_k = key_mask.reshape(-1).nonzero().reshape(-1)                    # flat b * Nk + t
        self.k_b, self.k_t = idx_k // n_k, idx_k % n_k
        if n_q == n_k:
            seqlens_q, self.cu_q, idx_q = seqlens_k, self.cu_k, idx_k
        elif n_q == 1:
            # Decoding one token per sequence: every row has exactly one (real) query.
            seqlens_q = torch.ones(batch, dtype=torch.int32, device=dev)
            self.cu_q = torch.arange(batch + 1, dtype=torch.int32, device=dev)
            idx_q = torch.arange(batch, device=dev)
        else:
            # Queries are the last n_q positions of the key sequence (a KV cache in front).
            q_mask = key_mask[:, -n_q:]
            seqlens_q = q_mask.sum(-1, dtype=torch.int32)
            self.cu_q = F.pad(torch.cumsum(seqlens_q, 0, dtype=torch.int32), (1, 0))
            idx_q = q_mask.reshape(-1).nonzero().reshape(-1)
        self.q_b, self.q_t = idx_q // n_q, idx_q % n_q
        longest = torch.stack([seqlens_q.max(), seqlens_k.max()]) if batch else torch.zeros(2)
        self.max_q, self.max_k = (int(x) for x in longest.tolist())


def _packing_from_position_ids(position_ids: torch.Tensor, batch: int, n: int):
    """(cu_seqlens (S+1,) int32, longest) over the flattened (B*n) tokens when ``position_ids``
    (1 or B, n) describe several sequences in a row (a new one wherever the position does not
    grow by exactly one, transformers' rule), else None."""
    pos = position_ids.reshape(-1, n).expand(batch, n)
    starts = torch.ones(batch, n, dtype=torch.bool, device=pos.device)
    starts[:, 1:] = (pos[:, 1:] - pos[:, :-1]) != 1
    first = starts.reshape(-1).nonzero().reshape(-1)
    if first.numel() == batch:
        return None
    cu = torch.cat([first, first.new_tensor([batch * n])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max().item())


# --------------------------------------------------------------------------------------------
# The mask function registered in AttentionMaskInterface
# --------------------------------------------------------------------------------------------

# Mask factories whose pattern is causal / bidirectional, sliding window or packing, i.e. fully
# described by the attention keywords and position_ids (anything else, e.g. multimodal overlays,
# blockwise or chunked attention, gets transformers' dense mask and the SDPA fallback).
_PLAIN_MASKS = {
    "causal_mask_function", "bidirectional_mask_function",
    "and_masks.<locals>.and_mask",
    "sliding_window_overlay.<locals>.inner_mask",
    "sliding_window_bidirectional_overlay.<locals>.inner_mask",
    "remap_positions_for_packed_sequence.<locals>.inner_mask",
    "packed_sequence_mask_function.<locals>.inner_mask",
}


def _plain_mask(fn, depth: int = 0) -> bool:
    if fn is None:
        return True
    if depth > 8 or getattr(fn, "__module__", None) != "transformers.masking_utils" or \
            getattr(fn, "__qualname__", None) not in _PLAIN_MASKS:
        return False
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            content = cell.cell_contents
        except ValueError:
            continue
        for inner in content if isinstance(content, (tuple, list)) else (content,):
            if callable(inner) and not isinstance(inner, torch.Tensor) and not _plain_mask(inner, depth + 1):
                return False
    return True


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0,
                 kv_offset: int = 0, mask_function: Optional[Callable] = None,
                 attention_mask: Optional[torch.Tensor] = None, **kwargs):
    """``AttentionMaskInterface`` entry of fused_lm: None (no padding), the 2-D key-padding mask
    (B, kv_length) bool, or, for patterns the kernel cannot express, transformers' dense SDPA
    mask (which makes ``attention_forward`` fall back to SDPA)."""
    contiguous_keys = (isinstance(q_offset, int) and isinstance(kv_offset, int)
                       and q_offset + q_length == kv_offset + kv_length)
    if contiguous_keys and _plain_mask(mask_function):
        if attention_mask is None:
            return None
        if attention_mask.dim() == 2:
            mask = attention_mask[:, -kv_length:]
            if mask.shape[-1] == kv_length:
                mask = mask.to(torch.bool)
                # One host sync per mask and forward (flash-attention's mask does the same).
                return None if bool(mask.all()) else mask
    from transformers.masking_utils import sdpa_mask

    for name in ("allow_is_causal_skip", "allow_is_bidirectional_skip"):
        kwargs.pop(name, None)
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                     q_offset=q_offset, kv_offset=kv_offset,
                     **({} if mask_function is None else {"mask_function": mask_function}),
                     attention_mask=attention_mask, allow_is_causal_skip=False,
                     allow_is_bidirectional_skip=False, **kwargs)


# --------------------------------------------------------------------------------------------
# attention_forward
# --------------------------------------------------------------------------------------------

def _check_layout(module, query, key, value) -> None:
    """transformers passes (B, H, T, D). Shapes that cannot be that are an error here rather than
    a silently wrong result (the kernel itself takes (B, T, H, D))."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"attention_forward takes transformers' 4-D (batch, heads, seq_len, "
                             f"head_dim) tensors; {name} is {shape}")
    b, hq, nq, d = query.shape
    _, hk, nk, dk = key.shape
    groups = getattr(module, "num_key_value_groups", None)
    problem = None
    if key.shape[0] != b or value.shape[0] != b:
        problem = "batch sizes differ"
    elif value.shape[1] != hk or value.shape[2] != nk:
        problem = "key and value differ in heads or length"
    elif dk != d:
        problem = f"query and key head dims differ ({d} and {dk})"
    elif hk == 0 or hq % hk != 0 or (isinstance(groups, int) and hq != hk * groups):
        problem = (f"{hq} query heads are not {groups if isinstance(groups, int) else 'a multiple'}"
                   f" x {hk} key/value heads")
    elif isinstance(getattr(module, "head_dim", None), int) and module.head_dim != d:
        problem = f"the last dim ({d}) is not the module's head_dim ({module.head_dim})"
    if problem is not None:
        hint = ""
        if hq == hk and nk > 0 and nq % nk == 0:         # dim 1 equal (T), dim 2 in GQA ratio (H)
            hint = " (they look like (B, T, H, D): transformers' interface passes (B, H, T, D))"
        raise ValueError(f"attention_forward: query {tuple(query.shape)}, key {tuple(key.shape)}, "
                         f"value {tuple(value.shape)} are not (batch, heads, seq_len, head_dim): "
                         f"{problem}{hint}")


def _window(sliding_window, causal: bool) -> Optional[tuple[int, int]]:
    """transformers' window of W tokens as the kernel's (left, right): causal keys j > i - W
    (masking_utils.sliding_window_overlay), i.e. (W - 1, 0); bidirectional |i - j| <= W
    (sliding_window_bidirectional_overlay), i.e. (W, W)."""
    if sliding_window is None or sliding_window <= 0:
        return None
    w = int(sliding_window)
    return (w - 1, 0) if causal else (w, w)


def _fallback_reason(query, key, value, attention_mask, dropout, kwargs) -> Optional[str]:
    if dropout and dropout > 0.0:
        return f"attention dropout {dropout} > 0 is not fused"
    for name in ("s_aux", "sinks"):
        if kwargs.get(name) is not None:
            return "attention sinks are not fused"
    if kwargs.get("position_bias") is not None:
        return "a position bias is not fused"
    if query.dtype not in _KERNEL_DTYPES or not (query.dtype == key.dtype == value.dtype):
        return f"dtypes {query.dtype}/{key.dtype}/{value.dtype} are not the kernel's"
    if value.shape[-1] != query.shape[-1]:
        return f"value head dim {value.shape[-1]} differs from the query's {query.shape[-1]}"
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            return (f"a {attention_mask.dim()}-D attention mask (custom masks, static caches, "
                    "mask overlays) is not a key-padding mask")
        if tuple(attention_mask.shape) != (query.shape[0], key.shape[2]):
            return (f"the 2-D mask {tuple(attention_mask.shape)} is not (batch, key length) = "
                    f"{(query.shape[0], key.shape[2])}")
    return None


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                      dropout: float = 0.0, scaling: Optional[float] = None,
                      sliding_window: Optional[int] = None, softcap: Optional[float] = None,
                      is_causal: Optional[bool] = None, **kwargs):
    """transformers' attention-interface signature over fused_lm's flash attention.

    query (B, Hq, Nq, D), key and value (B, Hkv, Nk, D) as transformers' attention modules pass
    them (Hq a multiple of Hkv, ``module.num_key_value_groups``; K and V are never expanded).
    Returns ``(attn_output (B, Nq, Hq, D), None)``.

    * ``scaling``: the score scale (default D**-0.5); ``softcap``: ``softcap * tanh(s / softcap)``
      of the scaled scores (Gemma 2); ``sliding_window=W``: transformers' window, keys
      j > i - W when causal (the kernel's ``window=(W-1, 0)``);
    * ``is_causal`` (default ``module.is_causal``): aligned bottom-right, so a query block at the
      end of a longer KV cache sees all cached keys;
    * ``attention_mask``: None, a (B, Nk) key-padding mask (True or 1 = real token; unpadded into
      packed sequences and padded back: padded query rows output 0), or a 4-D mask;
    * packed sequences: ``cu_seq_lens_q/k`` with ``max_length_q/k`` (flash-attention keywords),
      or ``position_ids`` (1 or B, Nq) that restart, when there is no padding mask and Nq == Nk.

    A 4-D mask, ``dropout > 0``, attention sinks (``s_aux``), a ``position_bias``, dtypes other
    than fp16/bf16/fp32/fp64 or a value head dim different from the query's fall back to
    transformers' SDPA path (its eager path when ``softcap`` or sinks are set), with a one-time
    warning naming the reason. Shapes that cannot be (B, H, T, D) raise ValueError.
    """
    _check_layout(module, query, key, value)
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    is_causal = bool(is_causal)
    if softcap is not None and softcap <= 0:
        softcap = None
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask != 0
    reason = _fallback_reason(query, key, value, attention_mask, dropout, kwargs)
    if reason is not None:
        return _fallback(reason, module, query, key, value, attention_mask, dropout, scaling,
                         sliding_window, softcap, is_causal, kwargs)
    if kwargs.get("output_attentions"):
        _warn_once("output_attentions", "fused_lm attention does not return attention weights "
                   "(output_attentions=True gives None); use attn_implementation='eager' for them")
    from fused_lm.nn.functional import flash_attention

    batch, n_heads, n_q, head_dim = query.shape
    n_k = key.shape[2]
    opts = dict(causal=is_causal, scale=scaling, window=_window(sliding_window, is_causal),
                softcap=softcap)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))       # (B, N, H, D) views

    packed = _packed_layout(kwargs, attention_mask, batch, n_q, n_k)
    if packed is not None:
        cu_q, cu_k, max_q, max_k = packed
        out = flash_attention(q.reshape(batch * n_q, n_heads, head_dim),
                              k.reshape(batch * n_k, -1, head_dim), v.reshape(batch * n_k, -1, head_dim),
                              cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                              max_seqlen_k=max_k, **opts)
        return out.view(batch, n_q, n_heads, head_dim), None
    if attention_mask is not None:
        plan = _unpad_cache.get((attention_mask,), n_q, lambda: _Unpad(attention_mask, n_q))
        out_u = flash_attention(q[plan.q_b, plan.q_t], k[plan.k_b, plan.k_t], v[plan.k_b, plan.k_t],
                                cu_seqlens_q=plan.cu_q, cu_seqlens_k=plan.cu_k,
                                max_seqlen_q=plan.max_q, max_seqlen_k=plan.max_k, **opts)
        out = out_u.new_zeros(batch, n_q, n_heads, head_dim).index_put((plan.q_b, plan.q_t), out_u)
        return out, None
    return flash_attention(q, k, v, **opts), None


def _packed_layout(kwargs, attention_mask, batch, n_q, n_k):
    """(cu_q, cu_k, max_q, max_k) when the call describes packed sequences, else None."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:
        if attention_mask is not None:
            raise ValueError("attention_forward: got both a padding mask and cu_seq_lens_q/k; "
                             "packed (flattened) batches carry no padding")
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        return (cu_q, cu_k, None if max_q is None else _as_int(max_q),
                None if max_k is None else _as_int(max_k))
    position_ids = kwargs.get("position_ids")
    if attention_mask is None and isinstance(position_ids, torch.Tensor) and n_q == n_k > 1 \
            and position_ids.dim() in (1, 2) and position_ids.shape[-1] == n_q \
            and position_ids.numel() in (n_q, batch * n_q):
        found = _packing_cache.get((position_ids,), batch,
                                   lambda: _packing_from_position_ids(position_ids, batch, n_q))
        if found is not None:
            cu, longest = found
            return cu, cu, longest, longest
    return None


# --------------------------------------------------------------------------------------------
# Fallback: transformers' SDPA (or eager) path with an explicit dense mask
# --------------------------------------------------------------------------------------------

def _segments(kwargs, batch, n):
    """(B, n) sequence ids of packed rows (from cu_seq_lens_q or restarting position_ids), or None."""
    cu = kwargs.get("cu_seq_lens_q")
    position_ids = kwargs.get("position_ids")
    if cu is None and isinstance(position_ids, torch.Tensor) and position_ids.dim() in (1, 2) \
            and position_ids.shape[-1] == n and position_ids.numel() in (n, batch * n):
        found = _packing_from_position_ids(position_ids, batch, n)
        cu = None if found is None else found[0]
    if cu is None:
        return None
    starts = torch.zeros(batch * n, dtype=torch.long, device=cu.device)
    starts[cu[1:-1].long()] = 1
    return starts.cumsum(0).view(batch, n)


def _dense_mask(query, key, attention_mask, sliding_window, is_causal, kwargs):
    """(B, 1, Nq, Nk) bool mask (True = attend) with attention_forward's semantics, or None when
    SDPA's own ``is_causal`` flag (or no mask) says the same."""
    batch, n_q, n_k, dev = query.shape[0], query.shape[2], key.shape[2], query.device
    window = _window(sliding_window, is_causal)
    seg = _segments(kwargs, batch, n_q) if n_q == n_k else None
    if attention_mask is None and seg is None and window is None and (not is_causal or n_q == n_k):
        return None
    i = torch.arange(n_q, device=dev)[:, None] + (n_k - n_q)          # bottom-right alignment
    j = torch.arange(n_k, device=dev)[None, :]
    vis = torch.ones(n_q, n_k, dtype=torch.bool, device=dev)
    if is_causal:
        vis &= j <= i
    if window is not None:
        vis &= (j >= i - window[0]) & (j <= i + window[1])
    mask = vis[None, None].expand(batch, 1, n_q, n_k)
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :]
    if seg is not None:
        mask = mask & (seg[:, None, :, None] == seg[:, None, None, :])
    return mask


def _fallback(reason, module, query, key, value, attention_mask, dropout, scaling, sliding_window,
              softcap, is_causal, kwargs):
    _warn_once(reason, f"fused_lm attention: {reason}; falling back to transformers' "
               f"{'eager' if softcap is not None or kwargs.get('s_aux') is not None else 'SDPA'} "
               "attention for these calls (same numerics, not fused). This warning is shown once.")
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask                                # already carries causality etc.
    else:
        mask = _dense_mask(query, key, attention_mask, sliding_window, is_causal, kwargs)
    rest = {k: v for k, v in kwargs.items()
            if k not in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}
    if softcap is not None or rest.get("s_aux") is not None or rest.get("sinks") is not None:
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is None:
            raise NotImplementedError(f"fused_lm attention: {reason}, and {type(module).__name__}'s "
                                      "module has no eager_attention_forward to fall back to")
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~mask, torch.finfo(query.dtype).min)
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        return eager(module, query, key, value, mask, dropout=dropout, scaling=scale,
                     softcap=softcap, **rest)
    _transformers()
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal if mask is None else False, **rest)


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------

def register(name: str = "fused_lm") -> None:
    """Registers ``attention_forward`` in transformers' ``AttentionInterface`` and its mask
    function (``padding_mask``) in ``AttentionMaskInterface`` under ``name``, so that
    ``from_pretrained(..., attn_implementation=name)`` and ``model.set_attn_implementation(name)``
    use fused_lm. Idempotent. transformers does not persist custom implementations: call it again
    in every new process before loading a model with ``attn_implementation=name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register: name must be a non-empty string, got {name!r}")
    _transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, padding_mask)
