"""Causal-LM losses for transformers models: ``causal_lm_loss`` (the ``loss_function`` contract)
and the logit-free forward used with ``apply_fused_lm(linear_cross_entropy=True)``.

transformers' ``ForCausalLMLoss(logits, labels, vocab_size, num_items_in_batch=None,
ignore_index=-100, shift_labels=None, **kwargs)``: labels are shifted left by one inside (position
t predicts token t+1; the last position gets ``ignore_index``) unless ``shift_labels`` is given;
with ``num_items_in_batch`` (the Trainer's count of non-ignored labels over all gradient
accumulation micro-batches) the loss is the sum divided by it, so accumulating micro-batches
gives the full batch's gradient; else the mean over non-ignored tokens. It upcasts the logits to
float32 first (a copy of the (N, V) logits); fused_lm's cross-entropy computes in float32 from
any input dtype, so no copy is made.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Optional

import torch
import torch.nn.functional as F


def _shifted(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """labels[..., 1:] with ``ignore_index`` appended: the target of every position."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _normalise(loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    if num_items_in_batch is None:
        return loss
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                   num_items_in_batch: Optional[torch.Tensor | int] = None, ignore_index: int = -100,
                   shift_labels: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` on fused_lm's cross-entropy kernel.

    logits (B, T, V) or (N, V) in any float dtype; labels (B, T) (shifted inside) or
    ``shift_labels`` (already aligned with the logits). With ``num_items_in_batch`` the summed
    loss is divided by it, else the mean over non-ignored tokens. Keyword options:
    ``z_loss`` (adds ``z_loss * logsumexp**2`` per token, PaLM) and ``label_smoothing``; other
    keywords (the model's forward passes all of its ``**kwargs``) are ignored, as transformers'
    loss does. Returns a float32 scalar.
    """
    from fused_lm.nn.functional import cross_entropy

    z_loss = float(kwargs.get("z_loss") or 0.0)
    label_smoothing = float(kwargs.get("label_smoothing") or 0.0)
    if shift_labels is None:
        if labels is None:
            raise ValueError("causal_lm_loss: labels (or shift_labels) are required")
        shift_labels = _shifted(labels, ignore_index)
    logits = logits.reshape(-1, vocab_size)
    target = shift_labels.reshape(-1).to(logits.device)
    if target.shape[0] != logits.shape[0]:
        raise ValueError(f"causal_lm_loss: {logits.shape[0]} logit rows but {target.shape[0]} labels")
    loss = cross_entropy(logits, target, ignore_index=ignore_index,
                         reduction="mean" if num_items_in_batch is None else "sum",
                         label_smoothing=label_smoothing, z_loss=z_loss)
    return _normalise(loss, num_items_in_batch)


def linear_causal_lm_loss(hidden: torch.Tensor, lm_head: torch.nn.Module, labels: Optional[torch.Tensor],
                          *, num_items_in_batch=None, ignore_index: int = -100,
                          shift_labels: Optional[torch.Tensor] = None, z_loss: float = 0.0,
                          softcap: Optional[float] = None) -> torch.Tensor:
    """``causal_lm_loss(lm_head(hidden), labels, ...)`` with the final logit ``softcap`` (Gemma 2)
    applied inside, by ``linear_cross_entropy``: the (N, V) logits are never materialised.
    hidden (B, T, H) or (N, H); lm_head an ``nn.Linear`` (weight (V, H), optional bias)."""
    from fused_lm.nn.functional import linear_cross_entropy

    if shift_labels is None:
        shift_labels = _shifted(labels, ignore_index)
    x = hidden.reshape(-1, hidden.shape[-1])
    target = shift_labels.reshape(-1).to(x.device)
    if target.shape[0] != x.shape[0]:
        raise ValueError(f"linear cross-entropy: {x.shape[0]} hidden rows (after logits_to_keep) "
                         f"but {target.shape[0]} labels")
    loss = linear_cross_entropy(x, lm_head.weight, target, linear_bias=getattr(lm_head, "bias", None),
                                reduction="mean" if num_items_in_batch is None else "sum",
                                ignore_index=ignore_index, z_loss=z_loss, softcap=softcap)
    return _normalise(loss, num_items_in_batch)


# --------------------------------------------------------------------------------------------
# The logit-free *ForCausalLM.forward
# --------------------------------------------------------------------------------------------

def _slice_to_keep(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """transformers' ``slice_logits_to_keep`` (int: the last n positions, 0 = all; 1-D tensor:
    these positions; 2-D int tensor: positions per row; 2-D bool: a mask, flattened)."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:
        slice_logits_to_keep = None
    if slice_logits_to_keep is not None:
        return slice_logits_to_keep(hidden, logits_to_keep)
    if isinstance(logits_to_keep, int):
        return hidden[:, slice(-logits_to_keep, None), :]
    return hidden[:, logits_to_keep, :]


def _output(template_cls, **values):
    """An instance of transformers' output dataclass, naming the cache field as this version does
    (``cache`` since 5.x, ``past_key_values`` before)."""
    names = {f.name for f in dataclasses.fields(template_cls)}
    if "cache" not in names and "cache" in values:
        values["past_key_values"] = values.pop("cache")
    elif "past_key_values" not in names:
        values.pop("past_key_values", None)
    return template_cls(**{k: v for k, v in values.items() if k in names})


def _cache_of(outputs):
    fields = {f.name for f in dataclasses.fields(outputs)} if dataclasses.is_dataclass(outputs) else set()
    for name in ("cache", "past_key_values"):
        if name in fields:
            return getattr(outputs, name)
    return None


_LOSS_ONLY = ("num_items_in_batch", "shift_labels", "ignore_index", "return_dict")


def fused_forward(stock):
    """A ``*ForCausalLM.forward`` that, in training with labels, computes the loss with
    ``linear_cross_entropy`` from the last hidden states and returns ``logits=None``; otherwise
    (eval, generation, no labels) it is ``stock``. ``stock`` is the class's own forward; the
    returned function has its signature (Trainer inspects it for columns and ``**kwargs``)."""
    signature = inspect.signature(stock)
    params = signature.parameters
    var_kw = next((p.name for p in params.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)

    @functools.wraps(stock)
    def forward(self, *args, **kwargs):
        options = getattr(self, "_fused_lm_options", None) or {}
        if not (self.training and options.get("linear_cross_entropy")):
            return stock(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        arguments = dict(bound.arguments)
        extra = dict(arguments.pop(var_kw, {}) if var_kw else {})
        if arguments.get("labels") is None:
            return stock(self, *args, **kwargs)
        del arguments["self"]
        labels = arguments.pop("labels")
        logits_to_keep = arguments.pop("logits_to_keep", 0)
        loss_kw = {k: extra.pop(k) for k in _LOSS_ONLY if k in extra}
        outputs = getattr(self, self.base_model_prefix)(**arguments, **extra)
        hidden = outputs[0] if not hasattr(outputs, "last_hidden_state") else outputs.last_hidden_state
        hidden = _slice_to_keep(hidden, logits_to_keep)
        loss = linear_causal_lm_loss(
            hidden, self.get_output_embeddings(), labels,
            num_items_in_batch=loss_kw.get("num_items_in_batch"),
            ignore_index=loss_kw.get("ignore_index", -100), shift_labels=loss_kw.get("shift_labels"),
            z_loss=options.get("z_loss", 0.0),
            softcap=getattr(self.config, "final_logit_softcapping", None))
        from transformers.modeling_outputs import CausalLMOutputWithPast

        result = _output(CausalLMOutputWithPast, loss=loss, logits=None,
                         cache=_cache_of(outputs),
                         hidden_states=getattr(outputs, "hidden_states", None),
                         attentions=getattr(outputs, "attentions", None))
        return_dict = loss_kw.get("return_dict")
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        return result if return_dict else result.to_tuple()

    forward._fused_lm_stock = stock
    return forward
