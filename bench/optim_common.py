"""What the optimizer benchmarks share (bench_adamw, bench_lion, and bench_multi_tensor_norm's
clip+AdamW step): hyper-parameters, the bytes formula, leaf parameters with fixed gradients, the
stepper that cycles optimizers over independent copies, and the fused_lm and DeepSpeed providers.

Timed: one ``optimizer.step()`` with the gradients already set (fixed between calls); state is
created by one untimed step in setup. Several optimizers over independent copies of the list are
cycled (``rotating``) when one list fits in the last-level cache, so every call reads from DRAM.

Bytes per step, fp32 parameters, gradients and state (the least traffic any implementation can move):
* AdamW: read p, g, m, v (4 x 4 B) + write p, m, v (3 x 4 B) = 28 B per parameter.
* Lion:  read p, g, m    (3 x 4 B) + write p, m    (2 x 4 B) = 20 B per parameter.
Ceiling: the measured device copy bandwidth on a GPU (issue 4 asks for the fraction of it), the
in-place read-modify-write bandwidth on the CPU (an optimizer updates in place).

Parameter lists (issue 4, bench/lists.py): GPT-2 124M (its real shapes), a Llama-1B-shaped list
(GPU only; parameters, gradients and moments take 20 GB) and 10,000 tiny tensors of 1 to 64k
elements (log-uniform, seeded), where per-tensor launch cost dominates. ``quick`` (the CPU
default): GPT-2 with every dimension / 4 (1/16 of the elements) and 500 tiny tensors, about 25 s
for both optimizer families on 2 cores (half of it importing DeepSpeed and loading its ops).

DeepSpeed's CPU ops are skipped in quick runs until built once (their JIT build takes minutes).
The Triton provider does not run on the CPU: the interpreter is a correctness tool (about 10 ms
per 50k-element program), not a CPU backend.
"""

from __future__ import annotations

import math
import os

import torch

from bench.harness import Skip, peer, require_backend, rotating

ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
LION = dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=1e-2)
BYTES_PER_PARAM = {"adamw": 28, "lion": 20}     # fp32: see the module docstring
STATE_TENSORS = {"adamw": 4, "lion": 3}         # p, g and the moments resident per parameter


# ------------------------------------------------------------------------------------------------
# Inputs: leaf parameters with fixed gradients, one optimizer per copy, state made untimed.

_POOL: dict[torch.device, torch.Tensor] = {}


def random_tensor(shape, device) -> torch.Tensor:
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


def params(shapes, device) -> list[torch.Tensor]:
    """Leaf parameters of ``shapes`` holding random gradients."""
    out = []
    for s in shapes:
        p = random_tensor(s, device).requires_grad_()
        p.grad = random_tensor(s, device)
        out.append(p)
    return out


def stepper(build, opt: str, shapes, device, quick: bool):
    """``build(params) -> optimizer``; returns the timed fn (one step of the next optimizer).
    Quick runs keep at most 2 copies: the CPU here reports a 260 MB LLC, and 8 copies of every
    list (setup plus a warm step each) would take most of the family's time budget; so quick CPU
    numbers are partly cache-resident (fractions of the DRAM ceiling near or above 1) and compare
    providers with each other, not with DRAM."""
    footprint = STATE_TENSORS[opt] * 4 * sum(math.prod(s) for s in shapes)

    def make():
        optimizer = build(params(shapes, device))
        optimizer.step()   # creates the state, compiles/loads kernels: not timed
        return optimizer

    nxt = rotating(make, footprint, device, max_copies=2 if quick else 8)
    return lambda: nxt().step()


def fused(opt, backend, shapes, device, quick):
    def setup():
        try:
            import fused_lm.optim as fo
        except ImportError as exc:
            raise Skip(f"fused_lm.optim not available ({exc})") from None
        require_backend(backend, device)
        cls, kw = (fo.AdamW, ADAMW) if opt == "adamw" else (fo.Lion, LION)
        return stepper(lambda ps: cls(ps, backend=backend, **kw), opt, shapes, device, quick)
    return setup


def deepspeed(opt, shapes, device, quick):
    def setup():
        if device.type != "cpu":
            raise Skip("DeepSpeed's CPU optimizers run on CPU tensors (ZeRO-Offload)")
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        peer("deepspeed")
        from deepspeed.ops.op_builder import CPUAdamBuilder, CPULionBuilder

        builder = CPUAdamBuilder() if opt == "adamw" else CPULionBuilder()
        if quick and not deepspeed_op_built(builder):
            raise Skip(f"DeepSpeed's {builder.NAME} op is not built and its JIT build takes minutes; "
                       f"build it once: python -c 'from deepspeed.ops.op_builder import "
                       f"{type(builder).__name__} as B; B().load()'")
        if opt == "adamw":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return stepper(lambda ps: DeepSpeedCPUAdam(ps, adamw_mode=True, **ADAMW), opt, shapes,
                           device, quick)
        from deepspeed.ops.lion import DeepSpeedCPULion

        return stepper(lambda ps: DeepSpeedCPULion(ps, **LION), opt, shapes, device, quick)
    return setup


def deepspeed_op_built(builder) -> bool:
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


__all__ = ["ADAMW", "BYTES_PER_PARAM", "LION", "STATE_TENSORS", "deepspeed", "fused", "params",
           "random_tensor", "stepper"]
