"""Kept for code that imports the optimizer references from here: each lives in the module named
after its family, adamw.py (adamw_step) and lion.py (lion_step); the stochastic rounding both
kernels use is in rounding.py."""

from .adamw import adamw_step
from .lion import lion_step
from .rounding import stochastic_round_bf16

__all__ = ["adamw_step", "lion_step", "stochastic_round_bf16"]
