"""One Lion step over whole models' parameter lists, against lion-pytorch and DeepSpeed.

What is timed, the bytes formula (fp32: read p, g, m + write p, m = 20 B per parameter), the
ceiling and the lists: bench/optim_common.py and bench/lists.py. torch has no Lion: the
references are lion-pytorch (what users run) and DeepSpeed's CPU Lion (CPU tensors only); missing
peers are skipped with the reason.
"""

from __future__ import annotations

import math

import torch

from bench.harness import Case, Provider, Skip, peer
from bench.lists import describe, param_lists
from bench.optim_common import BYTES_PER_PARAM, LION, deepspeed, fused, stepper


def cases(device: torch.device, quick: bool) -> list[Case]:
    out = []
    ceiling = "copy" if device.type == "cuda" else "rmw"
    for label, shapes in param_lists(device, quick).items():
        numel = sum(math.prod(s) for s in shapes)
        providers = [Provider(f"fused_lm-{b}", fused("lion", b, shapes, device, quick))
                     for b in ("cuda", "triton", "cpu")]
        providers += [
            Provider("lion-pytorch", _lion_pytorch(False, shapes, device, quick), reference=True),
            Provider("lion-pytorch-triton", _lion_pytorch(True, shapes, device, quick)),
            Provider("deepspeed-cpu-lion", deepspeed("lion", shapes, device, quick), reference=True),
        ]
        out.append(Case("lion", "lion-step", describe(label, shapes), "fp32", providers,
                        bytes=BYTES_PER_PARAM["lion"] * numel, ceiling=ceiling))
    return out


def _lion_pytorch(use_triton, shapes, device, quick):
    def setup():
        mod = peer("lion_pytorch", "lion-pytorch")
        if use_triton and device.type != "cuda":
            raise Skip("lion-pytorch's Triton kernel needs CUDA tensors")
        if use_triton:
            peer("triton")
        # decoupled_weight_decay=False: p *= 1 - lr * wd, the paper's (and fused_lm's) decay.
        return stepper(lambda ps: mod.Lion(ps, use_triton=use_triton, **LION), "lion", shapes, device, quick)
    return setup


__all__ = ["cases"]
