"""Hugging Face transformers in one line: ``fused_lm.transformers.apply_fused_lm(model)``.

    apply_fused_lm(model=None, *, model_type=None, attention=True, cross_entropy=True,
                   linear_cross_entropy=False, z_loss=0.0) -> model
    attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      sliding_window=None, softcap=None, is_causal=None, **kwargs)
    register(name="fused_lm")
    causal_lm_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                   shift_labels=None, **kwargs)
    FusedLMTrainer                                  # a transformers.Trainer subclass

transformers is an optional dependency: ``import fused_lm`` never imports it, and this module
imports it only when one of these is used (FusedLMTrainer, which needs transformers.Trainer and
accelerate, on first access). Tested with transformers ``TESTED_TRANSFORMERS``.
"""

from __future__ import annotations

from fused_lm.transformers._attention import attention_forward, register
from fused_lm.transformers._compat import TESTED_TRANSFORMERS
from fused_lm.transformers._loss import causal_lm_loss
from fused_lm.transformers._patch import SUPPORTED_MODEL_TYPES, apply_fused_lm

__all__ = ["apply_fused_lm", "attention_forward", "register", "causal_lm_loss", "FusedLMTrainer",
           "SUPPORTED_MODEL_TYPES", "TESTED_TRANSFORMERS"]


def __getattr__(name: str):
    if name == "FusedLMTrainer":
        from fused_lm.transformers._trainer import FusedLMTrainer

        globals()[name] = FusedLMTrainer
        return FusedLMTrainer
    raise AttributeError(f"module 'fused_lm.transformers' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {"FusedLMTrainer"})
