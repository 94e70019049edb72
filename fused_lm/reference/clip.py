"""The references of fused_lm/clip.py (clip_grad_norm_, clip_grad_value_), kept under this name
for code that imports them from here: they live with their families, in multi_tensor_norm.py
(total_norm, clip_coefficient, clip_grad_norm) and multi_tensor_clamp.py (clip_grad_value)."""

from .multi_tensor_clamp import clip_grad_value
from .multi_tensor_norm import clip_coefficient, clip_grad_norm, total_norm

__all__ = ["clip_coefficient", "clip_grad_norm", "clip_grad_value", "total_norm"]
