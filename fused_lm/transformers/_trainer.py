"""FusedLMTrainer: transformers.Trainer with fused_lm.optim.AdamW clipping inside its step.

Stock Trainer (5.x ``_run_epoch``), at every optimizer step:
``grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm)`` when ``max_grad_norm > 0``, else
``clip_grad_norm_(params, inf)`` just to log the norm; then ``optimizer.step()``. That is one or
two extra passes over the gradients (norm, then the rewrite by the clip coefficient) before the
optimizer reads them again. ``fused_lm.optim.AdamW(max_grad_norm=...)`` computes the norm on the
device at the start of its step and multiplies each gradient by the clip coefficient as its
update kernel reads it, so the gradients are read once for the norm and once for the update and
never rewritten; the pre-clip norm is left in ``optimizer.grad_norm`` (a 0-d tensor).

This subclass overrides three Trainer hooks (tested with transformers 5.24):
* ``create_optimizer``: fused AdamW from TrainingArguments (``learning_rate``, ``adam_beta1/2``,
  ``adam_epsilon``, ``weight_decay`` on the parameters ``get_decay_parameter_names`` returns, 0
  on the others), with ``max_grad_norm=args.max_grad_norm`` (None when it is 0);
* ``_clip_grad_norm`` / ``_get_grad_norm``: no pass over the gradients when the optimizer clips
  in its step (and none at all with ``max_grad_norm=0``: the norm is not computed just to log it);
* ``_maybe_log_save_evaluate``: logs ``grad_norm`` from ``optimizer.grad_norm`` (read with
  ``.item()`` only on logging steps).
A user-provided optimizer (``optimizers=(opt, sched)`` or ``optimizer_cls_and_kwargs``) is left
alone: if it clips in its step (fused_lm with ``max_grad_norm``), Trainer's clip is skipped, with
a warning when TrainingArguments also asks for one; otherwise Trainer clips as usual.
"""

from __future__ import annotations

import warnings

import torch

from fused_lm.transformers._compat import TESTED_TRANSFORMERS, transformers as _transformers

_transformers()
from transformers import Trainer  # noqa: E402

# The AdamW flavours of TrainingArguments.optim that fused_lm.optim.AdamW stands in for.
_ADAMW_OPTIMS = {"adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw_apex_fused"}
_HOOKS = ("_clip_grad_norm", "_get_grad_norm", "_maybe_log_save_evaluate")


def _unwrap(optimizer):
    """The optimizer under accelerate's AcceleratedOptimizer (and similar wrappers)."""
    seen = 0
    while optimizer is not None and hasattr(optimizer, "optimizer") and seen < 4 \
            and not hasattr(optimizer, "max_grad_norm"):
        optimizer = optimizer.optimizer
        seen += 1
    return optimizer


class FusedLMTrainer(Trainer):
    """``transformers.Trainer`` whose default optimizer is ``fused_lm.optim.AdamW`` with gradient
    clipping inside the step: no separate clip or norm pass, ``grad_norm`` logged from the
    optimizer. Takes Trainer's arguments unchanged."""

    # Class-level, so they hold even if Trainer.__init__ itself builds the optimizer.
    _fused_lm_built = False
    _fused_lm_hooks = all(callable(getattr(Trainer, name, None)) for name in _HOOKS)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self._fused_lm_hooks:
            warnings.warn(
                f"FusedLMTrainer: this transformers ({getattr(_transformers(), '__version__', '?')}) "
                f"lacks Trainer.{'/'.join(_HOOKS)} (tested with {TESTED_TRANSFORMERS}); the optimizer "
                "will not clip in its step and Trainer clips as usual", stacklevel=2)

    # -- optimizer ---------------------------------------------------------------------------

    def create_optimizer(self, model=None):
        if self.optimizer is None and getattr(self, "optimizer_cls_and_kwargs", None) is None:
            self.optimizer = self._fused_adamw(self.model if model is None else model)
            self._fused_lm_built = True
            return self.optimizer
        optimizer = super().create_optimizer(model)
        inner = _unwrap(optimizer)
        if not self._fused_lm_built and self._clips_in_step() and self.args.max_grad_norm \
                and self.args.max_grad_norm > 0:
            warnings.warn(
                f"FusedLMTrainer: the optimizer you passed clips inside its step "
                f"(max_grad_norm={inner.max_grad_norm}); TrainingArguments(max_grad_norm="
                f"{self.args.max_grad_norm}) is not applied as a second clip. Set "
                "TrainingArguments(max_grad_norm=0) to silence this warning.", stacklevel=2)
        return optimizer

    def _fused_adamw(self, model):
        from fused_lm.optim import AdamW

        args = self.args
        optim = str(getattr(args.optim, "value", args.optim))
        if optim not in _ADAMW_OPTIMS:
            raise ValueError(f"FusedLMTrainer builds fused_lm.optim.AdamW, but TrainingArguments("
                             f"optim={optim!r}) asks for another optimizer; use one of "
                             f"{', '.join(sorted(_ADAMW_OPTIMS))}, or pass your own with "
                             "optimizers=(optimizer, scheduler)")
        if getattr(args, "optim_args", None):
            warnings.warn(f"FusedLMTrainer: TrainingArguments(optim_args={args.optim_args!r}) is "
                          "ignored by fused_lm.optim.AdamW", stacklevel=3)
        decay = set(self.get_decay_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if n in decay], "weight_decay": args.weight_decay},
                  {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
        max_norm = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None
        if not self._fused_lm_hooks or getattr(self, "is_deepspeed_enabled", False):
            max_norm = None        # Trainer (or DeepSpeed, from its config) clips instead
        return AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                     eps=args.adam_epsilon, max_grad_norm=max_norm)

    def _clips_in_step(self) -> bool:
        inner = _unwrap(self.optimizer)
        return self._fused_lm_hooks and getattr(inner, "max_grad_norm", None) is not None \
            and hasattr(inner, "grad_norm")

    # -- Trainer hooks -----------------------------------------------------------------------

    def _clip_grad_norm(self, model):
        if self._clips_in_step():
            return None                          # clipped by optimizer.step(), which runs next
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        if self._clips_in_step() or (self._fused_lm_built and grad_norm is None):
            return None                          # no pass over the gradients only to log a norm
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *args, **kwargs):
        if self._clips_in_step():
            grad_norm = _unwrap(self.optimizer).grad_norm    # 0-d tensor, .item() only when logged
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)
