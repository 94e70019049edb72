"""Draws docs/lr_schedules.png: every schedule of fused_lm.optim.lr_scheduler, read back from the
real LambdaLR objects (the lr each optimizer step runs at, as a fraction of the peak).

    python docs/plot_lr_schedules.py [--out docs/lr_schedules.png]
"""

from __future__ import annotations

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fused_lm.optim import lr_scheduler as ls  # noqa: E402

STEPS = 1000


def trace(make) -> list[float]:
    """The lr of each of STEPS optimizer steps under the scheduler ``make(optimizer)``."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make(opt)
    lrs = []
    for _ in range(STEPS):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "lr_schedules.png"))
    args = ap.parse_args()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    panels = [
        (axes[0], "warmup_decay(opt, warmup_steps=100, total_steps=900, decay, min_lr_ratio=0.1)",
         lambda d: (lambda o: ls.warmup_decay(o, 100, 900, d, min_lr_ratio=0.1))),
        (axes[1], "wsd(opt, warmup_steps=50, stable_steps=650, decay_steps=200, decay)",
         lambda d: (lambda o: ls.wsd(o, 50, 650, 200, d))),
    ]
    for ax, title, factory in panels:
        for decay in ("cosine", "linear", "sqrt"):
            ax.plot(range(STEPS), trace(factory(decay)), label=f'decay="{decay}"', lw=1.6)
        ax.set_title(title, fontsize=8.5)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("lr / peak lr")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
