"""Cross-entropy and linear cross-entropy (issue 6) against torch eager, torch.compile, Liger-Kernel
and torch's chunked F.linear_cross_entropy.

CE bytes (the floor, written per case): the logits must be read once, and for forward+backward
the gradient written once: fwd N*V*itemsize, fwd+bwd 2*N*V*itemsize (= 4*N*V in bf16). Targets
(8*N) are negligible. Ceiling: device copy bandwidth.
Linear CE FLOPs: logits 2*N*H*V, dx 2*N*H*V, dW 2*N*H*V: 6*N*H*V for forward+backward.
Ceiling: bf16 matmul TFLOP/s measured in the same run. Peak memory is reported by the harness.

Targets (H100, issue 6): CE >= 0.9 of the bandwidth floor and >= 2x Liger; linear CE >= 0.6 of
the matmul ceiling and faster than Liger and torch's chunked path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.harness import Case, Provider, Skip, peer, require_backend, rotating
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


__all__ = ["cases"]
