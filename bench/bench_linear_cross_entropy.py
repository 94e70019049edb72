"""Linear cross-entropy (issue 6): the projection and the loss without materialising the logits,
against torch eager (matmul + F.cross_entropy), torch's chunked F.linear_cross_entropy and
Liger-Kernel's fused linear cross-entropy.

FLOPs: logits 2*N*H*V, dx 2*N*H*V, dW 2*N*H*V: 6*N*H*V for forward+backward. Ceiling: the matmul
TFLOP/s (bf16 on a GPU) measured in the same run. Peak memory is reported by the harness.
Target (H100, issue 6): >= 0.6 of the matmul ceiling and faster than Liger and torch's chunked path.

CPU row (issue 12, item 12): "fused_lm" is the public default path (fused_lm.nn.functional,
backend=None: on CPU tensors without the interpreter, the chunked torch path) next to
"torch-eager", which is also what torch 2.13's nn.LinearCrossEntropyLoss runs by default
(options=None: its reference path, linear + cross_entropy); "torch-chunked" is its opt-in chunked
path (options=LinearCrossEntropyOptions()). fwd+bwd at N=512, H=256, V=32000 fp32; target >= 0.95x.
`python -m bench.bench_linear_cross_entropy [rounds]` times it in interleaved rounds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.harness import Case, Provider, Skip, peer, require_backend, rotating
import fused_lm.nn.functional as FF
from fused_lm.ops.linear_cross_entropy import linear_cross_entropy

_SHORT = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}


def cases(device: torch.device, quick: bool) -> list[Case]:
    out: list[Case] = []
    lce_shapes = [(64, 32, 1000)] if quick else [(8192, 4096, 128256), (8192, 2304, 256000)]
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
        out.append(Case("linear_cross_entropy", "linear-ce-fwd+bwd", f"N={N} H={H} V={V}",
                        _SHORT[lce_dtype], providers, flops=flops, ceiling="matmul"))
    if device.type == "cpu":
        out += _cpu_cases(device)
    return out


def _cpu_cases(device) -> list[Case]:
    out = []
    dtype = torch.float32
    N, H, V = 512, 256, 32000
    make = _lce_inputs(N, H, V, dtype, device)
    footprint = (N * H + V * H) * 4
    providers = [
        Provider("fused_lm", _lce_default(make, footprint, device)),
        Provider("torch-eager", _lce_eager(make, footprint, device), reference=True),
        Provider("torch-chunked", _lce_torch_chunked(make, footprint, device)),
    ]
    out.append(Case("linear_cross_entropy", "linear-ce-fwd+bwd", f"N={N} H={H} V={V}", "fp32", providers,
                    flops=6 * N * H * V, ceiling="matmul", note="CPU default path vs torch"))
    return out


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


if __name__ == "__main__":                  # python -m bench.bench_linear_cross_entropy [rounds]
    import sys

    from bench import harness

    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    print("\n".join(harness.interleaved_rounds(_cpu_cases(torch.device("cpu")), rounds)))


__all__ = ["cases"]
