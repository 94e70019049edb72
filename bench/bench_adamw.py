"""One AdamW step over whole models' parameter lists, against torch.optim.AdamW and the peers.

What is timed, the bytes formula (fp32: read p, g, m, v + write p, m, v = 28 B per parameter),
the ceiling and the lists: bench/optim_common.py and bench/lists.py.

Providers: fused_lm per backend; torch.optim.AdamW fused / foreach (the references) and
single-tensor (on the CPU's tiny list only: torch's CPU default, the per-tensor loop the others
avoid); DeepSpeed's CPU Adam (CPU tensors only); Apex FusedAdam (CUDA only). Peers that are
missing are skipped with the reason.
"""

from __future__ import annotations

import math

import torch

from bench.harness import Case, Provider, Skip, peer
from bench.lists import describe, param_lists
from bench.optim_common import ADAMW, BYTES_PER_PARAM, deepspeed, fused, stepper


def cases(device: torch.device, quick: bool) -> list[Case]:
    out = []
    ceiling = "copy" if device.type == "cuda" else "rmw"
    for label, shapes in param_lists(device, quick).items():
        numel = sum(math.prod(s) for s in shapes)
        providers = [Provider(f"fused_lm-{b}", fused("adamw", b, shapes, device, quick))
                     for b in ("cuda", "triton", "cpu")]
        providers += [
            Provider("torch-fused", _torch_adamw("fused", shapes, device, quick), reference=True),
            Provider("torch-foreach", _torch_adamw("foreach", shapes, device, quick), reference=True),
        ]
        if label.startswith("tiny") and device.type == "cpu":
            # torch's default on CPU tensors; on a GPU (10k tensors x ~10 launches) it would take
            # half a minute per case and only restate the launch count.
            providers.append(Provider("torch-single", _torch_adamw("single", shapes, device, quick)))
        providers += [
            Provider("deepspeed-cpu-adam", deepspeed("adamw", shapes, device, quick), reference=True),
            Provider("apex-fused-adam", _apex(shapes, device, quick), reference=True),
        ]
        out.append(Case("adamw", "adamw-step", describe(label, shapes), "fp32", providers,
                        bytes=BYTES_PER_PARAM["adamw"] * numel, ceiling=ceiling))
    return out


def _torch_adamw(mode, shapes, device, quick):
    def setup():
        if mode == "foreach" and device.type == "cpu" and quick:
            # On CPU tensors torch's foreach kernels fall back to a per-op slow path (measured on
            # this 2-core CPU: 690 ms per step on gpt2-124M/16 against 40 ms fused), which alone
            # would take a third of the quick budget; torch's CPU default is single-tensor anyway.
            raise Skip("torch foreach AdamW on CPU is a slow per-op fallback; measured in --full only")
        flags = {"fused": dict(fused=True), "foreach": dict(foreach=True),
                 "single": dict(foreach=False)}[mode]
        try:   # fused CPU AdamW exists since torch 2.4; an older or odd build says so here
            torch.optim.AdamW([torch.zeros(1, device=device, requires_grad=True)], **flags)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise Skip(f"torch.optim.AdamW({mode}) unavailable on {device.type}: {exc}") from None
        return stepper(lambda ps: torch.optim.AdamW(ps, **ADAMW, **flags), "adamw", shapes, device, quick)
    return setup


def _apex(shapes, device, quick):
    def setup():
        if device.type != "cuda":
            raise Skip("Apex FusedAdam needs CUDA tensors")
        optimizers = peer("apex.optimizers", "apex")
        return stepper(lambda ps: optimizers.FusedAdam(ps, adam_w_mode=True, **ADAMW), "adamw",
                       shapes, device, quick)
    return setup


__all__ = ["cases"]
