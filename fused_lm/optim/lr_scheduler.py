"""Learning-rate schedules as standard torch schedulers (work with any torch optimizer)."""

from __future__ import annotations

import math

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay, as a ``LambdaLR`` of each group's initial lr:

        factor(s) = (s + 1) / warmup_steps                                  s < warmup_steps
        factor(s) = r + (1 - r) * (1 + cos(pi * min(1, (s - w) / (T - w)))) / 2   otherwise

    with r = ``min_lr_ratio``, w = ``warmup_steps``, T = ``total_steps``: the lr rises to its
    peak at the last warm-up step, then falls to ``min_lr_ratio * lr`` at ``total_steps`` and
    stays there.
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if total_steps <= 0 or total_steps < warmup_steps:
        raise ValueError(f"total_steps must be positive and >= warmup_steps ({warmup_steps}), "
                         f"got {total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    decay_steps = max(1, total_steps - warmup_steps)

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        progress = min(1.0, (s - warmup_steps) / decay_steps)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
