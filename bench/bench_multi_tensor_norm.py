"""The multi-tensor norm family: the global gradient norm and clipping by it (issue 5), fused_lm
against torch.nn.utils.get_total_norm / clip_grad_norm_.

Cases, on the GPT-2 124M parameter list and 10,000 tiny tensors (1 to 64k elements):

* ``norm``        get_total_norm only (the pass that reads every gradient once).
                  Bytes = numel * itemsize (+ 4 B per 16k-element chunk of partials, ignored).
                  Ceiling "copy": copy bandwidth per byte moved is the read bandwidth a pure read
                  can expect (no read-only ceiling is measured); target >= 0.9 of it (issue 5).
* ``norm+scale``  clip_grad_norm_ (norm pass, then the in-place scale by the coefficient).
                  Bytes = numel * itemsize (norm read) + 2 * numel * itemsize (scale read+write)
                  = 3 * numel * itemsize. Ceiling "rmw".

Providers: fused_lm per backend (cuda, triton, cpu), torch.nn.utils.clip_grad_norm_(foreach=True)
(the reference: ``_foreach_norm`` per (device, dtype), a stack, a norm, and ``_foreach_mul_``),
and foreach=False (the per-tensor loop) on the tiny list. The gradients keep their size between
calls: max_norm = 1, so after the first call the coefficient is max_norm / (max_norm + 1e-6).
The Triton provider does not run on the CPU (the interpreter is a correctness tool).

``quick`` (the CPU default): GPT-2 with every dimension / 4 (1/16 of the elements) and 500 tiny
tensors, float32 only.
"""

from __future__ import annotations

import math

import torch

from bench.harness import Case, Provider, require_backend, rotating
from bench.lists import describe, tensor_lists
from bench.optim_common import stepper


def _params(shapes, dtype, device):
    """Parameters holding random gradients (what both clip_grad_norm_ take)."""
    def make():
        out = []
        for s in shapes:
            p = torch.nn.Parameter(torch.empty(s, device=device, dtype=dtype))
            p.grad = torch.randn(s, device=device).to(dtype)
            out.append(p)
        return out
    return make


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def cases(device: torch.device, quick: bool) -> list[Case]:
    out = []
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    for label, shapes in tensor_lists(quick).items():
        numel = sum(math.prod(s) for s in shapes)
        for dtype in dtypes:
            itemsize = torch.empty((), dtype=dtype).element_size()
            read = numel * itemsize                    # one read of every gradient
            shape = describe(label, shapes)
            for op, nbytes, ceiling in (("norm", read, "copy"), ("norm+scale", 3 * read, "rmw")):
                providers = [Provider(f"fused_lm-{b}", _fused(op, b, shapes, dtype, device, read))
                             for b in ("cuda", "triton", "cpu")]
                providers.append(Provider("torch-foreach", _torch(op, True, shapes, dtype, device, read),
                                          reference=True))
                if label.startswith("tiny"):
                    providers.append(Provider("torch-loop", _torch(op, False, shapes, dtype, device, read)))
                out.append(Case("multi_tensor_norm", op, shape, _short(dtype), providers, bytes=nbytes, ceiling=ceiling))
    out += _fused_step_cases(device, quick)
    return out


def _fused(op, backend, shapes, dtype, device, footprint):
    def setup():
        require_backend(backend, device)
        from fused_lm.optim.clip import clip_grad_norm_, get_total_norm

        nxt = rotating(_params(shapes, dtype, device), footprint, device)
        if op == "norm":
            return lambda: get_total_norm([p.grad for p in nxt()], backend=backend)
        return lambda: clip_grad_norm_(nxt(), 1.0, backend=backend)
    return setup


def _torch(op, foreach, shapes, dtype, device, footprint):
    def setup():
        from torch.nn.utils import clip_grad_norm_, get_total_norm

        nxt = rotating(_params(shapes, dtype, device), footprint, device)
        if op == "norm":
            return lambda: get_total_norm([p.grad for p in nxt()], foreach=foreach)
        return lambda: clip_grad_norm_(nxt(), 1.0, foreach=foreach)
    return setup


def _fused_step_cases(device: torch.device, quick: bool) -> list[Case]:
    """Clip + AdamW step (issue 5, phase 2), fp32, on the optimizer family's parameter lists.

    Bytes per step: the minimum traffic of clipping folded into AdamW, 32 B per parameter = the
    norm pass (read g, 4 B) + the AdamW step (read p, g, m, v; write p, m, v: 28 B). The same
    formula for every provider, so GB/s compare times; torch's unfused path moves 40 B (its scale
    pass reads and writes g once more). Targets (GPU): fused clip+AdamW <= 1.15x the time of the
    fused_lm AdamW step alone (provider "fused_lm-<b>-noclip"), >= 1.5x faster than torch's
    clip_grad_norm_ + fused AdamW. Ceiling: copy on a GPU, rmw on the CPU (as bench_adamw).
    """
    out = []
    ceiling = "copy" if device.type == "cuda" else "rmw"
    for label, shapes in tensor_lists(quick).items():   # the optimizer lists, without Llama-1B
        numel = sum(math.prod(s) for s in shapes)
        shape = describe(label, shapes)
        providers = []
        for b in ("cuda", "triton", "cpu"):
            providers.append(Provider(f"fused_lm-{b}", _fused_adamw(b, 1.0, shapes, device, quick)))
            providers.append(Provider(f"fused_lm-{b}-noclip", _fused_adamw(b, None, shapes, device, quick)))
        providers.append(Provider("torch-clip+fused", _torch_clip_adamw("fused", shapes, device, quick),
                                  reference=True))
        providers.append(Provider("torch-clip+foreach", _torch_clip_adamw("foreach", shapes, device, quick)))
        out.append(Case("multi_tensor_norm", "clip+adamw-step", shape, "fp32", providers, bytes=32 * numel, ceiling=ceiling))
    return out


def _fused_adamw(backend, max_grad_norm, shapes, device, quick):
    def setup():
        require_backend(backend, device)
        from fused_lm.optim import AdamW

        return stepper(lambda ps: AdamW(ps, lr=1e-3, backend=backend, max_grad_norm=max_grad_norm),
                       "adamw", shapes, device, quick)
    return setup


class _ClipThenStep:
    """torch's recipe: clip_grad_norm_ (foreach) then the optimizer's step."""

    def __init__(self, params, optimizer):
        self.params, self.optimizer = params, optimizer

    def step(self):
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.optimizer.step()


def _torch_clip_adamw(impl, shapes, device, quick):
    def setup():
        kw = {"fused": dict(fused=True), "foreach": dict(foreach=True)}[impl]

        def build(ps):
            return _ClipThenStep(ps, torch.optim.AdamW(ps, lr=1e-3, **kw))
        return stepper(build, "adamw", shapes, device, quick)
    return setup


__all__ = ["cases"]
