"""Learning-rate schedules as standard ``torch.optim.lr_scheduler.LambdaLR`` objects (they work
with any torch optimizer, save and resume through ``state_dict``, and compose with
``SequentialLR`` / ``ChainedScheduler`` like any torch scheduler).

Notation: ``s`` is the scheduler's step count (``LambdaLR.last_epoch``: 0 at construction, +1 per
``scheduler.step()``), so the ``(s+1)``-th optimizer step runs at ``lr_s = f(s) * lr`` where
``lr`` is the group's initial learning rate; ``r`` is ``min_lr_ratio``. Every schedule warms up
linearly to the peak in ``w = warmup_steps`` steps (``f(s) = (s + 1) / w`` for ``s < w``: the
first step already moves, the peak is reached at ``s = w - 1``), then decays along one shape
``g`` of the progress ``x`` in [0, 1] through the decay window,

    f = r + (1 - r) * g(x),   g(x) = (1 + cos(pi x)) / 2   "cosine"
                              g(x) = 1 - x                 "linear"
                              g(x) = 1 - sqrt(x)           "sqrt"

and stays at ``f = r`` from the end of the window on. ``g(0) = 1`` and ``g(1) = 0``, so the
schedule is continuous at both ends of the window. "sqrt" (the "1-sqrt" cooldown of Hägele et
al. 2024, "Scaling Laws and Compute-Optimal Training beyond Fixed Training Durations",
arXiv:2405.18392) drops fastest at the start of the window and flattens towards its end; it
matches or beats cosine and linear cooldowns in their experiments.

- :func:`warmup_decay`: the decay window is ``[w, T)`` with ``T = total_steps``:
  ``x = (s - w) / (T - w)``; ``f(s) = r`` for ``s >= T``.
- :func:`wsd`: warm-up, stable, decay (Hu et al. 2024, "MiniCPM: Unveiling the Potential of Small
  Language Models with Scalable Training Strategies", arXiv:2404.06395): ``f = 1`` on
  ``[w, w + S)`` with ``S = stable_steps``, then the window ``[w + S, w + S + D)`` with
  ``D = decay_steps``: ``x = (s - w - S) / D``; ``f(s) = r`` for ``s >= w + S + D``. The stable
  phase needs no total step count, so a run can branch a decay off any checkpoint of it.
- :func:`warmup_cosine`: ``warmup_decay(..., decay="cosine")`` with ``min_lr_ratio=0.1`` by
  default (kept for existing code).

The factor is a small callable object (not a closure), so ``LambdaLR.state_dict()`` saves the
schedule's parameters with the step count and the scheduler pickles.
"""

from __future__ import annotations

import math
import operator

import torch

DECAYS = ("cosine", "linear", "sqrt")


def _shape(decay: str, x: float) -> float:
    if decay == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * x))
    if decay == "linear":
        return 1.0 - x
    return 1.0 - math.sqrt(x)


class _Schedule:
    """The factor ``f(s)`` of the module docstring for a warm-up of ``warmup`` steps, a plateau
    of ``stable`` steps, and a ``decay`` window of ``decay_steps`` steps."""

    def __init__(self, warmup: int, stable: int, decay_steps: int, decay: str,
                 min_lr_ratio: float):
        self.warmup, self.stable, self.decay_steps = warmup, stable, decay_steps
        self.decay, self.min_lr_ratio = decay, min_lr_ratio

    def __call__(self, s: int) -> float:
        w, r = self.warmup, self.min_lr_ratio
        start = w + self.stable                      # first step of the decay window
        if s >= start + self.decay_steps:
            return r
        if s < w:
            return (s + 1) / w
        if s < start:
            return 1.0
        x = (s - start) / self.decay_steps           # 0 <= x < 1 (the window is not empty here)
        return r + (1.0 - r) * _shape(self.decay, x)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(warmup={self.warmup}, stable={self.stable}, "
                f"decay_steps={self.decay_steps}, decay={self.decay!r}, "
                f"min_lr_ratio={self.min_lr_ratio})")


def _steps(name: str, value) -> int:
    """A non-negative integer step count (ints and integer-like objects; not floats or bools)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer number of steps, got {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer number of steps, got {value!r}") from None
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {n}")
    return n


def _check_common(optimizer, decay: str, min_lr_ratio: float) -> float:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if decay not in DECAYS:
        raise ValueError(f"decay={decay!r}: expected one of {', '.join(map(repr, DECAYS))}")
    if isinstance(min_lr_ratio, bool) or not isinstance(min_lr_ratio, (int, float)) \
            or not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be a number in [0, 1], got {min_lr_ratio!r}")
    return float(min_lr_ratio)


def warmup_decay(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                 decay: str = "cosine",
                 min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps`` steps, then ``decay`` ("cosine" | "linear" | "sqrt")
    down to ``min_lr_ratio`` times each group's initial lr at ``total_steps``, where it stays
    (formulas in the module docstring). ``warmup_steps=0`` starts at the peak;
    ``warmup_steps == total_steps`` warms up then drops to the floor. Raises ``ValueError`` for
    ``total_steps < max(1, warmup_steps)``, an unknown ``decay`` or ``min_lr_ratio`` outside
    [0, 1], ``TypeError`` for non-integer step counts."""
    r = _check_common(optimizer, decay, min_lr_ratio)
    w = _steps("warmup_steps", warmup_steps)
    total = _steps("total_steps", total_steps)
    if total < max(1, w):
        raise ValueError(f"total_steps must be >= 1 and >= warmup_steps ({w}), got {total}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _Schedule(w, 0, total - w, decay, r))


def wsd(optimizer: torch.optim.Optimizer, warmup_steps: int, stable_steps: int,
        decay_steps: int, decay: str = "linear",
        min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up-stable-decay: linear warm-up over ``warmup_steps`` steps, the peak lr for
    ``stable_steps`` steps, then ``decay`` ("linear" | "sqrt" | "cosine") over ``decay_steps``
    steps down to ``min_lr_ratio`` times each group's initial lr, where it stays (formulas in
    the module docstring). Any phase may be empty (``decay_steps=0`` drops to the floor after
    the plateau), but not all three. Raises like :func:`warmup_decay`."""
    r = _check_common(optimizer, decay, min_lr_ratio)
    w = _steps("warmup_steps", warmup_steps)
    stable = _steps("stable_steps", stable_steps)
    d = _steps("decay_steps", decay_steps)
    if w + stable + d == 0:
        raise ValueError("warmup_steps + stable_steps + decay_steps must be >= 1, got 0")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _Schedule(w, stable, d, decay, r))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """``warmup_decay(optimizer, warmup_steps, total_steps, "cosine", min_lr_ratio)``, with a
    floor of 10% of the peak by default."""
    return warmup_decay(optimizer, warmup_steps, total_steps, "cosine", min_lr_ratio)
