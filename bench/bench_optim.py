"""One optimizer step (AdamW, Lion) over whole models' parameter lists, against torch and the peers.

Timed: one ``optimizer.step()`` with the gradients already set (fixed between calls); state is
created by one untimed step in setup. Several optimizers over independent copies of the list are
cycled (``rotating``) when one list fits in the last-level cache, so every call reads from DRAM.

Bytes per step, fp32 parameters, gradients and state (the least traffic any implementation can move):
* AdamW: read p, g, m, v (4 x 4 B) + write p, m, v (3 x 4 B) = 28 B per parameter.
* Lion:  read p, g, m    (3 x 4 B) + write p, m    (2 x 4 B) = 20 B per parameter.
Ceiling: the measured device copy bandwidth on a GPU (issue 4 asks for the fraction of it), the
in-place read-modify-write bandwidth on the CPU (an optimizer updates in place).

Parameter lists (issue 4): GPT-2 124M (its real shapes), a Llama-1B-shaped list (GPU only;
parameters, gradients and moments take 20 GB) and 10,000 tiny tensors of 1 to 64k elements (log-uniform, seeded), where
per-tensor launch cost dominates. ``quick`` (the CPU default): GPT-2 with every dimension / 4
(1/16 of the elements) and 500 tiny tensors, about 25 s for the family on 2 cores (half of it
importing DeepSpeed and loading its ops).

Providers: fused_lm per backend; torch.optim.AdamW fused / foreach / single-tensor (the last on
the CPU's tiny list only: torch's CPU default, the per-tensor loop the others avoid);
lion-pytorch; DeepSpeed's CPU Adam and Lion (CPU tensors only); Apex FusedAdam (CUDA only).
Peers that are missing are skipped with the reason; DeepSpeed's CPU ops are skipped in quick runs
until built once (their JIT build takes minutes). The Triton provider does not run on the CPU:
the interpreter is a correctness tool (about 10 ms per 50k-element program), not a CPU backend.
"""

from __future__ import annotations

import math
import os

import torch

from bench.bench_multi_tensor import gpt2_shapes, tiny_shapes
from bench.harness import Case, Provider, Skip, peer, require_backend, rotating

ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
LION = dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=1e-2)
BYTES_PER_PARAM = {"adamw": 28, "lion": 20}     # fp32: see the module docstring
STATE_TENSORS = {"adamw": 4, "lion": 3}         # p, g and the moments resident per parameter


def llama_1b_shapes() -> list[tuple[int, ...]]:
    """Llama-3.2-1B-shaped list (1.24B parameters): tied 128256 x 2048 embedding, 16 blocks of
    RMSNorm + grouped-query attention (32 query heads, 8 key/value heads of 64) + SwiGLU 8192,
    final norm."""
    d, vocab, layers, kv, ffn = 2048, 128256, 16, 512, 8192
    shapes = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d,), (d, d), (kv, d), (kv, d), (d, d), (d,), (ffn, d), (ffn, d), (d, ffn)]
    return shapes + [(d,)]


def param_lists(device: torch.device, quick: bool) -> dict[str, list[tuple[int, ...]]]:
    if quick:
        return {"gpt2-124M/16": [tuple(max(1, x // 4) for x in s) for s in gpt2_shapes()],
                "tiny-500": tiny_shapes(500)}
    lists = {"gpt2-124M": gpt2_shapes()}
    if device.type == "cuda":
        lists["llama-1B"] = llama_1b_shapes()
    lists["tiny-10k"] = tiny_shapes(10_000)
    return lists


def cases(device: torch.device, quick: bool) -> list[Case]:
    out = []
    ceiling = "copy" if device.type == "cuda" else "rmw"
    for label, shapes in param_lists(device, quick).items():
        numel = sum(math.prod(s) for s in shapes)
        tiny = label.startswith("tiny")
        shape = f"{label} ({len(shapes)} tensors, {numel / 1e6:.1f}M)"
        for opt in ("adamw", "lion"):
            providers = [Provider(f"fused_lm-{b}", _fused(opt, b, shapes, device, quick))
                         for b in ("cuda", "triton", "cpu")]
            if opt == "adamw":
                providers += [
                    Provider("torch-fused", _torch_adamw("fused", shapes, device, quick), reference=True),
                    Provider("torch-foreach", _torch_adamw("foreach", shapes, device, quick), reference=True),
                ]
                if tiny and device.type == "cpu":
                    # torch's default on CPU tensors; on a GPU (10k tensors x ~10 launches) it
                    # would take half a minute per case and only restate the launch count.
                    providers.append(Provider("torch-single", _torch_adamw("single", shapes, device, quick)))
                providers += [
                    Provider("deepspeed-cpu-adam", _deepspeed(opt, shapes, device, quick), reference=True),
                    Provider("apex-fused-adam", _apex(shapes, device, quick), reference=True),
                ]
            else:
                providers += [
                    Provider("lion-pytorch", _lion_pytorch(False, shapes, device, quick), reference=True),
                    Provider("lion-pytorch-triton", _lion_pytorch(True, shapes, device, quick)),
                    Provider("deepspeed-cpu-lion", _deepspeed(opt, shapes, device, quick), reference=True),
                ]
            out.append(Case("optim", f"{opt}-step", shape, "fp32", providers,
                            bytes=BYTES_PER_PARAM[opt] * numel, ceiling=ceiling))
    return out


# ------------------------------------------------------------------------------------------------
# Inputs: leaf parameters with fixed gradients, one optimizer per copy, state made untimed.

_POOL: dict[torch.device, torch.Tensor] = {}


def _random(shape, device) -> torch.Tensor:
    """A fresh tensor of normal values copied from a 1M-value pool at a random offset: as random
    as the timing needs, and ~10x cheaper than torch.randn on the CPU (setup is part of the
    family's time budget)."""
    pool = _POOL.get(device)
    if pool is None:
        pool = _POOL[device] = torch.randn(1 << 20, device=device)
    n = math.prod(shape)
    start = int(torch.randint(0, pool.numel(), ()).item())
    reps = -(-(start + n) // pool.numel())
    src = pool if reps == 1 else pool.repeat(reps)
    return src[start:start + n].clone().view(shape)


def _params(shapes, device) -> list[torch.Tensor]:
    params = []
    for s in shapes:
        p = _random(s, device).requires_grad_()
        p.grad = _random(s, device)
        params.append(p)
    return params


def _stepper(build, opt: str, shapes, device, quick: bool):
    """``build(params) -> optimizer``; returns the timed fn (one step of the next optimizer).
    Quick runs keep at most 2 copies: the CPU here reports a 260 MB LLC, and 8 copies of every
    list (setup plus a warm step each) would take most of the family's time budget; so quick CPU
    numbers are partly cache-resident (fractions of the DRAM ceiling near or above 1) and compare
    providers with each other, not with DRAM."""
    footprint = STATE_TENSORS[opt] * 4 * sum(math.prod(s) for s in shapes)

    def make():
        optimizer = build(_params(shapes, device))
        optimizer.step()   # creates the state, compiles/loads kernels: not timed
        return optimizer

    nxt = rotating(make, footprint, device, max_copies=2 if quick else 8)
    return lambda: nxt().step()


def _fused(opt, backend, shapes, device, quick):
    def setup():
        try:
            import fused_lm.optim as fo
        except ImportError as exc:
            raise Skip(f"fused_lm.optim not available ({exc})") from None
        require_backend(backend, device)
        cls, kw = (fo.AdamW, ADAMW) if opt == "adamw" else (fo.Lion, LION)
        return _stepper(lambda ps: cls(ps, backend=backend, **kw), opt, shapes, device, quick)
    return setup


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
        return _stepper(lambda ps: torch.optim.AdamW(ps, **ADAMW, **flags), "adamw", shapes, device, quick)
    return setup


def _lion_pytorch(use_triton, shapes, device, quick):
    def setup():
        mod = peer("lion_pytorch", "lion-pytorch")
        if use_triton and device.type != "cuda":
            raise Skip("lion-pytorch's Triton kernel needs CUDA tensors")
        if use_triton:
            peer("triton")
        # decoupled_weight_decay=False: p *= 1 - lr * wd, the paper's (and fused_lm's) decay.
        return _stepper(lambda ps: mod.Lion(ps, use_triton=use_triton, **LION), "lion", shapes, device, quick)
    return setup


def _deepspeed(opt, shapes, device, quick):
    def setup():
        if device.type != "cpu":
            raise Skip("DeepSpeed's CPU optimizers run on CPU tensors (ZeRO-Offload)")
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        peer("deepspeed")
        from deepspeed.ops.op_builder import CPUAdamBuilder, CPULionBuilder

        builder = CPUAdamBuilder() if opt == "adamw" else CPULionBuilder()
        if quick and not _deepspeed_op_built(builder):
            raise Skip(f"DeepSpeed's {builder.NAME} op is not built and its JIT build takes minutes; "
                       f"build it once: python -c 'from deepspeed.ops.op_builder import "
                       f"{type(builder).__name__} as B; B().load()'")
        if opt == "adamw":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return _stepper(lambda ps: DeepSpeedCPUAdam(ps, adamw_mode=True, **ADAMW), opt, shapes,
                            device, quick)
        from deepspeed.ops.lion import DeepSpeedCPULion

        return _stepper(lambda ps: DeepSpeedCPULion(ps, **LION), opt, shapes, device, quick)
    return setup


def _deepspeed_op_built(builder) -> bool:
    """True when DeepSpeed's op is prebuilt in its wheel or already in the torch JIT cache."""
    try:
        from deepspeed.git_version_info import installed_ops

        if installed_ops.get(builder.NAME):
            return True
        from torch.utils.cpp_extension import _get_build_directory

        folder = _get_build_directory(builder.name, verbose=False)
        return os.path.exists(os.path.join(folder, f"{builder.name}.so"))
    except Exception:
        return False


def _apex(shapes, device, quick):
    def setup():
        if device.type != "cuda":
            raise Skip("Apex FusedAdam needs CUDA tensors")
        optimizers = peer("apex.optimizers", "apex")
        return _stepper(lambda ps: optimizers.FusedAdam(ps, adam_w_mode=True, **ADAMW), "adamw",
                        shapes, device, quick)
    return setup


__all__ = ["cases", "llama_1b_shapes", "param_lists"]
