"""Drop-in torch.optim optimizers on multi-tensor kernels, and their helpers."""

from fused_lm.optim import lr_scheduler
from fused_lm.optim.adamw import AdamW
from fused_lm.optim.lion import Lion
from fused_lm.optim.param_groups import param_groups

__all__ = ["AdamW", "Lion", "param_groups", "lr_scheduler"]
