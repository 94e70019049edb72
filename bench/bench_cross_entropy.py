"""Cross-entropy (issue 6) against torch eager, torch.compile and Liger-Kernel (the linear
cross-entropy: bench_linear_cross_entropy.py).

Bytes (the floor, written per case): the logits must be read once, and for forward+backward the
gradient written once: fwd N*V*itemsize, fwd+bwd 2*N*V*itemsize (= 4*N*V in bf16). Targets
(8*N) are negligible. Ceiling: device copy bandwidth. Peak memory is reported by the harness.

Target (H100, issue 6): >= 0.9 of the bandwidth floor and >= 2x Liger.

CPU rows (issue 12, item 12): what a user without a GPU gets. "fused_lm" is the public default
path (fused_lm.nn.functional, backend=None: on CPU tensors without the interpreter, the torch
path: F.cross_entropy) next to the torch code it replaces, "torch-eager" (the reference of the
speed-ups); target >= 0.95x. Cases: fwd+bwd at N=2048, V=32000 fp32 (plain; with torch's
options: class weights + label smoothing + ignored tokens; with our z-loss + softcap, against the
same math composed from torch ops). `python -m bench.bench_cross_entropy [rounds]` times them in
interleaved rounds (harness.interleaved_rounds), for a machine whose cores are shared.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.harness import Case, Provider, Skip, peer, require_backend, rotating
import fused_lm.nn.functional as FF
from fused_lm.ops.cross_entropy import cross_entropy

_SHORT = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}


def cases(device: torch.device, quick: bool) -> list[Case]:
    out: list[Case] = []
    if quick:
        ce_shapes = [(64, 1000)]
        dtypes = [torch.float32]
    else:
        ce_shapes = [(8192, v) for v in (32000, 50257, 128256, 256000)]
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


# ----------------------------------------------------------------------------- CPU rounds

if __name__ == "__main__":                  # python -m bench.bench_cross_entropy [rounds]
    import sys

    from bench import harness

    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    print("\n".join(harness.interleaved_rounds(_cpu_cases(torch.device("cpu")), rounds)))


__all__ = ["cases"]
