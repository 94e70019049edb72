"""Kept for code that imports ``multi_tensor_scale`` from here: the reference lives in
multi_tensor_scale.py, the module named after its family."""

from .multi_tensor_scale import multi_tensor_scale

__all__ = ["multi_tensor_scale"]
