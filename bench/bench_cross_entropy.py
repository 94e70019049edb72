"""Cross-entropy and linear cross-entropy (issue 6) against torch eager, torch.compile, Liger-Kernel
and torch's chunked F.linear_cross_entropy.

CE bytes (the floor, written per case): the logits must be read once, and for forward+backward
the gradient written once: fwd N*V*itemsize, fwd+bwd 2*N*V*itemsize (= 4*N*V in bf16). Targets
(8*N) are negligible. Ceiling: device copy bandwidth.
Linear CE FLOPs: logits 2*N*H*V, dx 2*N*H*V, dW 2*N*H*V: 6*N*H*V for forward+backward.
Ceiling: bf16 matmul TFLOP/s measured in the same run. Peak memory is reported by the harness.

Targets (H100, issue 6): CE >= 0.9 of the bandwidth floor and >= 2x Liger; linear CE >= 0.6 of
the matmul ceiling and faster than Liger and torch's chunked path.

CPU rows (issue 12, item 12): what a user without a GPU gets. "fused_lm" is the public default
path (fused_lm.nn.functional, backend=None: on CPU tensors without the interpreter, the torch
path: F.cross_entropy for the CE, the chunked torch path for the linear CE) next to the torch
code it replaces, "torch-eager" (the reference of the speed-ups); target >= 0.95x. For the
linear CE, "torch-eager" is also what torch 2.13's nn.LinearCrossEntropyLoss runs by default
(options=None: its reference path, linear + cross_entropy); "torch-chunked" is its opt-in
chunked path (options=LinearCrossEntropyOptions()). Cases: CE fwd+bwd at N=2048, V=32000 fp32
(plain; with torch's options: class weights + label smoothing + ignored tokens; with our z-loss
+ softcap, against the same math composed from torch ops), and linear CE fwd+bwd at N=512,
H=256, V=32000 fp32 against eager matmul + F.cross_entropy.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from bench.harness import Case, Provider, Skip, peer, require_backend, rotating
import fused_lm.nn.functional as FF
from fused_lm.ops.cross_entropy import cross_entropy
from fused_lm.ops.linear_cross_entropy import linear_cross_entropy

_SHORT = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}


def cases(device: torch.device, quick: bool) -> list[Case]:
    out: list[Case] = []
    if quick:
        ce_shapes = [(64, 1000)]
        lce_shapes = [(64, 32, 1000)]
        dtypes = [torch.float32]
    else:
        ce_shapes = [(8192, v) for v in (32000, 50257, 128256, 256000)]
        lce_shapes = [(8192, 4096, 128256), (8192, 2304, 256000)]
        dtypes = [torch.bfloat16, torch.float32]
    for N, V in ce_shapes:
        for dtype in dtypes:
            itemsize = torch.empty((), dtype=dtype).element_size()
            for op, backward in (("ce-fwd", False), ("ce-fwd+bwd", True)):
                nbytes = (2 if backward else 1) * N * V * itemsize   # read logits (+ write grad)
                footprint = N * V * itemsize
                make = _ce_inputs(N, V, dtype, device, backward)
                providers = [
                    Provider("fused_lm-triton", _ce_fused("triton", make, footprint, device, backward)),
                    Provider("fused_lm-torch", _ce_fused("torch", make, footprint, device, backward)),
                    Provider("torch-eager", _ce_torch(make, footprint, device, backward, False),
                             reference=True),
                    Provider("torch-compile", _ce_torch(make, footprint, device, backward, True, quick)),
                    Provider("liger", _ce_liger(make, footprint, device, backward)),
                ]
                out.append(Case("cross_entropy", op, f"N={N} V={V}", _SHORT[dtype], providers,
                                bytes=nbytes, ceiling="copy"))
    if device.type == "cpu":
        out += _cpu_cases(device)
    lce_dtype = torch.float32 if quick else torch.bfloat16
    for N, H, V in lce_shapes:
        flops = 6 * N * H * V                                 # logits, dx and dW matmuls
        make = _lce_inputs(N, H, V, lce_dtype, device)
        footprint = (N * H + V * H) * lce_dtype.itemsize
        providers = [
            Provider("fused_lm-triton", _lce_fused("triton", make, footprint, device)),
            Provider("fused_lm-torch", _lce_fused("torch", make, footprint, device)),
            Provider("torch-eager", _lce_eager(make, footprint, device), reference=True),
            Provider("torch-chunked", _lce_torch_chunked(make, footprint, device)),
            Provider("liger", _lce_liger(make, footprint, device)),
        ]
        out.append(Case("cross_entropy", "linear-ce-fwd+bwd", f"N={N} H={H} V={V}",
                        _SHORT[lce_dtype], providers, flops=flops, ceiling="matmul"))
    return out


# ----------------------------------------------------------------------------- CPU default path

_CPU_CE_OPTIONS = {
    "plain": {},
    "weight+smooth": {"weight": True, "label_smoothing": 0.1},     # torch has these: F.cross_entropy
    "zloss+softcap": {"z_loss": 1e-4, "softcap": 30.0},           # ours only: composed around it
}


def _cpu_cases(device) -> list[Case]:
    out = []
    N, V = 2048, 32000
    dtype = torch.float32
    nbytes = 2 * N * V * 4                                # read logits + write their gradient
    footprint = N * V * 4
    make = _ce_inputs(N, V, dtype, device, True)
    for name, opts in _CPU_CE_OPTIONS.items():
        w = torch.rand(V, device=device) + 0.5 if opts.get("weight") else None
        kw = {k: v for k, v in opts.items() if k != "weight"}
        providers = [
            Provider("fused_lm", _ce_default(make, footprint, device, w, kw)),
            Provider("torch-eager", _ce_torch_composed(make, footprint, device, w, kw), reference=True),
        ]
        out.append(Case("cross_entropy", f"ce-fwd+bwd {name}", f"N={N} V={V}", "fp32", providers,
                        bytes=nbytes, ceiling="copy", note="CPU default path vs torch"))
    N, H, V = 512, 256, 32000
    make = _lce_inputs(N, H, V, dtype, device)
    footprint = (N * H + V * H) * 4
    providers = [
        Provider("fused_lm", _lce_default(make, footprint, device)),
        Provider("torch-eager", _lce_eager(make, footprint, device), reference=True),
        Provider("torch-chunked", _lce_torch_chunked(make, footprint, device)),
    ]
    out.append(Case("cross_entropy", "linear-ce-fwd+bwd", f"N={N} H={H} V={V}", "fp32", providers,
                    flops=6 * N * H * V, ceiling="matmul", note="CPU default path vs torch"))
    return out


def _ce_default(make, footprint, device, weight, kw):
    def setup():
        return _timed(lambda x, t: FF.cross_entropy(x, t, weight, **kw),
                      rotating(make, footprint, device), True)
    return setup


def _ce_torch_composed(make, footprint, device, weight, kw):
    """torch's F.cross_entropy, with softcap and z-loss written out in torch ops as a user would."""
    softcap, z_loss = kw.get("softcap"), kw.get("z_loss", 0.0)
    smoothing = kw.get("label_smoothing", 0.0)

    def loss(x, t):
        if softcap:
            x = softcap * torch.tanh(x / softcap)
        out = F.cross_entropy(x, t, weight, label_smoothing=smoothing)
        if z_loss:
            valid = t != -100
            lse = torch.logsumexp(x, dim=-1)
            out = out + z_loss * torch.where(valid, lse * lse, 0.0).sum() / valid.sum()
        return out

    def setup():
        return _timed(loss, rotating(make, footprint, device), True)
    return setup


# ----------------------------------------------------------------------------- cross-entropy

def _ce_inputs(N, V, dtype, device, backward):
    def make():
        x = torch.randn(N, V, device=device, dtype=torch.float32).mul_(3).to(dtype)
        t = torch.randint(0, V, (N,), device=device)
        t[::97] = -100                                      # a few ignored tokens, as in packing
        return x.requires_grad_(backward), t
    return make


def _timed(loss_fn, nxt, backward):
    def fn():
        x, t = nxt()
        loss = loss_fn(x, t)
        if backward:
            x.grad = None
            loss.backward()
        return loss
    return fn


def _ce_fused(backend, make, footprint, device, backward):
    def setup():
        require_backend(backend, device)
        return _timed(lambda x, t: cross_entropy(x, t, backend=backend), rotating(make, footprint, device),
                      backward)
    return setup


def _ce_torch(make, footprint, device, backward, compiled, quick=False):
    def setup():
        fn = F.cross_entropy
        if compiled:
            if quick and device.type == "cpu":
                raise Skip("torch.compile skipped in quick CPU runs (compile time)")
            fn = torch.compile(F.cross_entropy)
        return _timed(fn, rotating(make, footprint, device), backward)
    return setup


def _ce_liger(make, footprint, device, backward):
    def setup():
        if device.type != "cuda":
            raise Skip("liger-kernel needs CUDA")
        lk = peer("liger_kernel.transformers", "liger-kernel")
        loss_mod = lk.LigerCrossEntropyLoss(reduction="mean")
        # Liger writes its gradient over the logits in forward (in place); the rotation gives it
        # fresh inputs as often as the others get them.
        return _timed(lambda x, t: loss_mod(x, t), rotating(make, footprint, device), backward)
    return setup


# ----------------------------------------------------------------------------- linear cross-entropy

def _lce_inputs(N, H, V, dtype, device):
    def make():
        x = (torch.randn(N, H, device=device) * 0.5).to(dtype).requires_grad_()
        W = (torch.randn(V, H, device=device) * H ** -0.5).to(dtype).requires_grad_()
        t = torch.randint(0, V, (N,), device=device)
        return x, W, t
    return make


def _lce_timed(loss_fn, nxt):
    def fn():
        x, W, t = nxt()
        loss = loss_fn(x, W, t)
        x.grad = W.grad = None
        loss.backward()
        return loss
    return fn


def _lce_fused(backend, make, footprint, device):
    def setup():
        require_backend(backend, device)
        return _lce_timed(lambda x, W, t: linear_cross_entropy(x, W, t, backend=backend),
                          rotating(make, footprint, device))
    return setup


def _lce_default(make, footprint, device):
    def setup():
        return _lce_timed(lambda x, W, t: FF.linear_cross_entropy(x, W, t),
                          rotating(make, footprint, device))
    return setup


def _lce_eager(make, footprint, device):
    def setup():
        return _lce_timed(lambda x, W, t: F.cross_entropy(x @ W.t(), t), rotating(make, footprint, device))
    return setup


def _lce_torch_chunked(make, footprint, device):
    def setup():
        options_cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
        if not hasattr(F, "linear_cross_entropy") or options_cls is None:
            raise Skip(f"torch {torch.__version__} has no chunked F.linear_cross_entropy")
        opts = options_cls()
        return _lce_timed(lambda x, W, t: F.linear_cross_entropy(x, W, t, options=opts),
                          rotating(make, footprint, device))
    return setup


def _lce_liger(make, footprint, device):
    def setup():
        if device.type != "cuda":
            raise Skip("liger-kernel needs CUDA")
        lk = peer("liger_kernel.transformers", "liger-kernel")
        loss_mod = lk.LigerFusedLinearCrossEntropyLoss(reduction="mean")
        return _lce_timed(lambda x, W, t: loss_mod(W, x, t), rotating(make, footprint, device))
    return setup


# ----------------------------------------------------------------------------- CPU rounds

def cpu_rounds(rounds: int = 5, reps: int = 5) -> list[str]:
    """The CPU rows in interleaved rounds (case order and provider order alternate between
    rounds), for a machine whose cores are shared: one round's ratio compares providers timed
    back to back; the table gives per-provider median times, the median ratio to torch-eager and
    its range over the rounds (the noise)."""
    import statistics
    import sys

    from bench import harness

    device = torch.device("cpu")
    cases = _cpu_cases(device)
    ceilings = harness.measure_ceilings(device, True)
    times: dict = {}
    ratios: dict = {}
    for r in range(rounds):
        for case in (cases if r % 2 == 0 else cases[::-1]):
            order = case.providers if r % 2 == 0 else case.providers[::-1]
            rows = harness.run_case(dataclasses.replace(case, providers=order), device, ceilings,
                                    True, reps)
            by = {row.provider: row.median_ms for row in rows if row.median_ms}
            for name, ms in by.items():
                times.setdefault((case.op, case.shape, name), []).append(ms)
            if "fused_lm" in by and "torch-eager" in by:
                ratios.setdefault((case.op, case.shape), []).append(by["torch-eager"] / by["fused_lm"])
            print(f"round {r + 1}/{rounds} {case.op} {case.shape}: "
                  + ", ".join(f"{name} {ms:.1f} ms" for name, ms in by.items()),
                  file=sys.stderr, flush=True)
    lines = [f"CPU rows, {rounds} interleaved rounds of {reps} timed calls, {torch.get_num_threads()} "
             "threads; ms = median over rounds; ratio = torch-eager time / fused_lm time",
             "| case | shape | fused_lm ms | torch-eager ms | ratio | range | others |",
             "|---|---|---|---|---|---|---|"]
    for (op, shape), rs in ratios.items():
        others = ", ".join(f"{name} {statistics.median(v):.1f} ms" for (o, s, name), v in times.items()
                           if (o, s) == (op, shape) and name not in ("fused_lm", "torch-eager"))
        lines.append(f"| {op} | {shape} | {statistics.median(times[(op, shape, 'fused_lm')]):.1f} | "
                     f"{statistics.median(times[(op, shape, 'torch-eager')]):.1f} | "
                     f"{statistics.median(rs):.2f}x | {min(rs):.2f}-{max(rs):.2f} | {others} |")
    return lines


if __name__ == "__main__":                  # python -m bench.bench_cross_entropy [rounds]
    import sys

    print("\n".join(cpu_rounds(int(sys.argv[1]) if len(sys.argv) > 1 else 5)))


__all__ = ["cases", "cpu_rounds"]
