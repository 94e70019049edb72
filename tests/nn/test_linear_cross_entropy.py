"""Linear cross-entropy (issue 6): chunked x @ W.T + b -> CE against the float64 reference that
materialises the logits, with chunking forced to several chunks; and the proof that the full
(N, V) logits are never allocated."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fused_lm.nn as fnn
from fused_lm.nn import functional as FF
from fused_lm.ops.linear_cross_entropy import chunk_rows, linear_cross_entropy
from fused_lm.reference import cross_entropy as ref
from tests._helpers import assert_close, backend_devices, randn, requires_cuda

BACKENDS = backend_devices(("triton", "torch"))

OPTIONS = {
    "plain": {},
    "all": {"softcap": 4.0, "label_smoothing": 0.1, "z_loss": 1e-3, "weight": True},
}


def _problem(N, H, V, dtype, device, bias, n_ignored=3):
    x = randn(N, H, dtype=dtype, device=device)
    W = randn(V, H, dtype=dtype, device=device, scale=1 / math.sqrt(H) * 2)
    b = randn(V, dtype=dtype, device=device, scale=0.1) if bias else None
    t = torch.randint(0, V, (N,), device=device)
    t[torch.randperm(N, device=device)[:n_ignored]] = -100
    return x, W, b, t


def _run(fn, tensors, grad_output=None):
    """loss and the gradients of (loss . grad_output) w.r.t. every tensor (None entries kept)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    loss = fn(*leaves)
    g = torch.randn_like(loss, dtype=torch.float64) if grad_output is None else grad_output
    loss.backward(g.to(loss.dtype))
    return loss, [None if t is None else t.grad for t in leaves], g


def _kw(opts, V, device):
    kw = dict(OPTIONS[opts])
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(V, device=device) + 0.25
    return kw


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", list(OPTIONS))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_reference(backend, device, dtype, bias, opts, reduction):
    N, H, V = 29, 24, 1000                      # chunk 8 -> 4 chunks, the last one partial
    kw = _kw(opts, V, device)
    x, W, b, t = _problem(N, H, V, dtype, device, bias)
    loss, grads, g = _run(lambda x, W, b: linear_cross_entropy(
        x, W, t, linear_bias=b, reduction=reduction, chunk_size=8, backend=backend, **kw), (x, W, b))
    rloss, rgrads, _ = _run(lambda x, W, b: ref.linear_cross_entropy(
        x, W, t, linear_bias=b, reduction=reduction, **kw),
        (x.double(), W.double(), None if b is None else b.double()), g)
    assert loss.dtype == torch.float32 and loss.shape == ((N,) if reduction == "none" else ())
    # bf16 logits are rounded once before the CE (as in eager); the loss is otherwise float32-exact
    assert_close(loss, rloss, torch.float32 if dtype == torch.float32 else dtype, what="loss")
    for name, got, exp in zip(("dx", "dW", "db"), grads, rgrads):
        if exp is not None:
            assert got.dtype == dtype
            assert_close(got, exp, dtype, what=name)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_chunking_does_not_change_the_result(backend, device, monkeypatch):
    """One chunk, forced chunks by argument and by FUSED_LM_LCE_CHUNK agree (float32)."""
    N, H, V = 21, 16, 700
    x, W, b, t = _problem(N, H, V, torch.float32, device, True)
    results = []
    for chunk, env in ((0, None), (5, None), (0, "4")):
        if env:
            monkeypatch.setenv("FUSED_LM_LCE_CHUNK", env)
        loss, grads, _ = _run(lambda x, W, b: linear_cross_entropy(
            x, W, t, linear_bias=b, label_smoothing=0.1, chunk_size=chunk, backend=backend),
            (x, W, b), torch.ones(()))
        results.append([loss] + grads)
    for other in results[1:]:
        for a, e in zip(other, results[0]):
            assert_close(a, e, torch.float32, scale=10)


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor (in elements) produced by any torch op inside the block."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_never_allocates_full_logits(backend, device, reduction):
    """With chunks of 16 tokens, no tensor of the forward or backward reaches N*V elements:
    the largest are the chunk logits (16*V), dW (V*H) and x/dx (N*H)."""
    N, H, V, C = 96, 20, 900, 16
    x, W, b, t = _problem(N, H, V, torch.float32, device, True)
    leaves = [v.requires_grad_() for v in (x, W, b)]
    with _LargestAllocation() as probe:
        loss = linear_cross_entropy(*leaves[:2], t, linear_bias=leaves[2], reduction=reduction,
                                    chunk_size=C, backend=backend)
        loss.sum().backward()
    assert probe.largest <= max(C * V * 4, V * H, N * H), probe.largest   # torch path: fp32 temps
    assert probe.largest < N * V // 2


def test_chunk_size_from_budget(monkeypatch):
    # 256 MiB of bf16 chunk logits at V=128256 -> 1046 rows -> 1024 (multiple of 128)
    assert chunk_rows(8192, 128256, 2, "triton") == 1024
    assert chunk_rows(100, 128256, 2, "triton") == 100
    assert chunk_rows(8192, 128256, 2, "torch") < 1024            # fp32 temporaries counted
    monkeypatch.setenv("FUSED_LM_LCE_BUDGET_MB", "64")
    assert chunk_rows(8192, 128256, 2, "triton") == 256
    monkeypatch.setenv("FUSED_LM_LCE_CHUNK", "100")
    assert chunk_rows(8192, 128256, 2, "triton") == 100
    assert chunk_rows(8192, 128256, 2, "triton", chunk_size=7) == 7


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_module_batched_and_no_grad(backend, device, monkeypatch):
    monkeypatch.setenv("FUSED_LM_BACKEND", backend)
    monkeypatch.setenv("FUSED_LM_LCE_CHUNK", "6")
    B, T, H, V = 2, 7, 12, 500
    torch.manual_seed(0)
    mod = fnn.LinearCrossEntropyLoss(H, V, bias=True, device=device, label_smoothing=0.1,
                                     reduction="none")
    torch.manual_seed(0)
    lin = torch.nn.Linear(H, V, device=device)                 # same initialisation, same draws
    torch.testing.assert_close(mod.weight, lin.weight)
    torch.testing.assert_close(mod.bias, lin.bias)
    x = randn(B, T, H, device=device)
    t = torch.randint(0, V, (B, T), device=device)
    loss = mod(x, t)
    expected = ref.linear_cross_entropy(x, mod.weight, t, linear_bias=mod.bias, reduction="none",
                                        label_smoothing=0.1)
    assert loss.shape == (B, T)
    assert_close(loss, expected, torch.float32)
    loss.sum().backward()
    assert mod.weight.grad is not None and mod.bias.grad is not None
    with torch.no_grad():
        assert_close(mod(x, t), expected, torch.float32)
    assert "num_classes=500" in repr(mod)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_all_ignored(backend, device):
    x, W, b, t = _problem(5, 8, 300, torch.float32, device, False)
    t[:] = -100
    loss, (dx, dW, _), _ = _run(lambda x, W, b: linear_cross_entropy(x, W, t, backend=backend),
                                (x, W, None), torch.ones(()))
    assert torch.isnan(loss)
    assert bool((dx == 0).all()) and bool((dW == 0).all())


def test_bad_arguments():
    x, W = randn(4, 8), randn(10, 8)
    t = torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="shapes do not match"):
        FF.linear_cross_entropy(x, randn(10, 9), t)
    with pytest.raises(TypeError, match="share dtype"):
        FF.linear_cross_entropy(x, W.double(), t)
    with pytest.raises(ValueError, match="linear_bias"):
        FF.linear_cross_entropy(x, W, t, linear_bias=randn(9))
    with pytest.raises(ValueError, match="target has shape"):
        FF.linear_cross_entropy(x, W, t[:3])
    with pytest.raises(IndexError, match="out of range"):
        FF.linear_cross_entropy(x, W, torch.tensor([0, 1, 10, 2]))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    x, W, b, t = _problem(12, 8, 200, torch.float32, device, True)

    def f(x, W, b):
        return linear_cross_entropy(x, W, t, linear_bias=b, z_loss=1e-3, chunk_size=5,
                                    backend=backend) * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss, grads, _ = _run(compiled, (x, W, b), torch.ones(()))
    eloss, egrads, _ = _run(f, (x, W, b), torch.ones(()))
    torch.testing.assert_close(loss, eloss)
    for a, e in zip(grads, egrads):
        torch.testing.assert_close(a, e)


# ----------------------------------------------------------------------------- GPU (realistic sizes)

@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_realistic(reduction):
    N, H, V = 4096, 1024, 32000
    x, W, b, t = _problem(N, H, V, torch.bfloat16, "cuda", False, n_ignored=50)
    loss, grads, g = _run(lambda x, W, b: linear_cross_entropy(
        x, W, t, reduction=reduction, label_smoothing=0.1, chunk_size=1000), (x, W, None))
    rloss, rgrads, _ = _run(lambda x, W, b: ref.linear_cross_entropy(
        x, W, t, reduction=reduction, label_smoothing=0.1, dtype=torch.float32),
        (x.float(), W.float(), None), g)
    assert_close(loss, rloss, torch.bfloat16)
    assert_close(grads[0], rgrads[0], torch.bfloat16)
    assert_close(grads[1], rgrads[1], torch.bfloat16)


@pytest.mark.gpu
@requires_cuda
def test_gpu_peak_memory():
    """N=8192, H=4096, V=128256, bf16 (the full logits alone: 2.1 GB). Peak memory of forward +
    backward beyond the inputs and the returned gradients: the chunk logits (default 256 MiB
    budget) plus the float32 dW accumulator (4*V*H = 2.1 GB, the price of a float32-accurate weight
    gradient); everything else must stay under 1 GB."""
    N, H, V = 8192, 4096, 128256
    dev = "cuda"
    x = (torch.randn(N, H, device=dev) * 0.5).to(torch.bfloat16).requires_grad_()
    W = (torch.randn(V, H, device=dev) * 0.02).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, V, (N,), device=dev)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = linear_cross_entropy(x, W, t)
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    grads = x.numel() * 2 + W.numel() * 2
    fp32_acc = 4 * V * H
    extra = peak - grads - fp32_acc
    assert extra < 1 << 30, f"extra peak {extra / 2**30:.2f} GiB (total peak {peak / 2**30:.2f} GiB)"
    assert torch.isfinite(loss)
