"""Linear cross-entropy (issues 6, 12): chunked x @ W.T + b -> CE against the float64 reference
that materialises the logits, with chunking forced to several chunks; the proof that the full
(N, V) logits are never allocated; the CPU default path; and conformance with torch 2.13's
nn.LinearCrossEntropyLoss / F.linear_cross_entropy (signatures, state_dict both ways,
initialisation, K-dimensional weights, probability targets; skipped where torch lacks them)."""

import inspect
import math
import types

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fused_lm.nn as fnn
from fused_lm import _backend
from fused_lm.nn import functional as FF
from fused_lm.ops import linear_cross_entropy as _lce
from fused_lm.ops.linear_cross_entropy import chunk_rows, linear_cross_entropy
from fused_lm.reference import linear_cross_entropy as ref
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
    torch.testing.assert_close(mod.linear.weight, lin.weight)
    torch.testing.assert_close(mod.linear.bias, lin.bias)
    x = randn(B, T, H, device=device)
    t = torch.randint(0, V, (B, T), device=device)
    loss = mod(x, t)
    expected = ref.linear_cross_entropy(x, mod.linear.weight, t, linear_bias=mod.linear.bias,
                                        reduction="none", label_smoothing=0.1)
    assert loss.shape == (B, T)
    assert_close(loss, expected, torch.float32)
    loss.sum().backward()
    assert mod.linear.weight.grad is not None and mod.linear.bias.grad is not None
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


def test_chunk_rows_on_cpu():
    """CPU tensors (torch path): chunks of at most _CPU_CHUNK_ROWS rows, split evenly, and never
    above the memory budget."""
    assert chunk_rows(512, 32000, 4, "torch", device_type="cpu") == 256
    assert chunk_rows(2048, 32000, 4, "torch", device_type="cpu") == 256
    assert chunk_rows(300, 32000, 4, "torch", device_type="cpu") == 150
    assert chunk_rows(257, 32000, 4, "torch", device_type="cpu") == 129
    assert chunk_rows(100, 32000, 4, "torch", device_type="cpu") == 100
    assert chunk_rows(4096, 1 << 20, 4, "torch", device_type="cpu") == 32      # 256 MiB budget


def test_cpu_default_is_the_chunked_torch_path(monkeypatch):
    """Without the interpreter CPU tensors take the torch backend, still chunked (the memory is
    the point of this op), with the same results as the reference."""
    monkeypatch.setattr(_backend, "interpreter_on", lambda: False)
    monkeypatch.delenv("FUSED_LM_BACKEND", raising=False)
    assert _backend.select("linear_cross_entropy", "cpu", torch.float32) == "torch"
    seen = []
    real = _lce.chunk_rows
    monkeypatch.setattr(_lce, "chunk_rows", lambda *a, **k: seen.append(a) or real(*a, **k))
    x, W, b, t = _problem(300, 16, 700, torch.float32, "cpu", True)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=8.0, weight=torch.rand(700) + 0.5)
    loss, grads, g = _run(lambda x, W, b: FF.linear_cross_entropy(x, W, t, linear_bias=b, **kw),
                          (x, W, b))
    rloss, rgrads, _ = _run(lambda x, W, b: ref.linear_cross_entropy(x, W, t, linear_bias=b, **kw),
                            (x.double(), W.double(), b.double()), g)
    assert seen and seen[0][3] == "torch"
    assert_close(loss, rloss, torch.float32)
    for got, exp in zip(grads, rgrads):
        assert_close(got, exp, torch.float32)


# ----------------------------------------------------------------------------- torch 2.13 conformance

TorchLCE = getattr(torch.nn, "LinearCrossEntropyLoss", None)
requires_torch_lce = pytest.mark.skipif(
    TorchLCE is None, reason=f"torch {torch.__version__} has no torch.nn.LinearCrossEntropyLoss "
                             "(torch 2.13 has it)")
requires_torch_lce_functional = pytest.mark.skipif(
    not hasattr(torch.nn.functional, "linear_cross_entropy"),
    reason=f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy")


def _params(fn):
    return [(p.name, p.default, p.kind) for p in inspect.signature(fn).parameters.values()]


def _ours_then_extras(ours, theirs, extras):
    mine, torch_params = _params(ours), _params(theirs)
    assert mine[:len(torch_params)] == torch_params
    assert [(n, k) for n, _, k in mine[len(torch_params):]] == [
        (name, inspect.Parameter.KEYWORD_ONLY) for name in extras]


@requires_torch_lce
def test_module_constructor_matches_torch():
    """torch's keyword names, order, kinds and defaults (ignore_index=None included), then ours."""
    _ours_then_extras(fnn.LinearCrossEntropyLoss.__init__, TorchLCE.__init__, ["z_loss", "softcap"])
    ours, theirs = fnn.LinearCrossEntropyLoss(8, 10), TorchLCE(8, 10)
    assert ours.extra_repr() == theirs.extra_repr() + ", z_loss=0.0, softcap=None"
    for name in ("num_classes", "out_features", "reduction", "ignore_index", "label_smoothing",
                 "options", "weight"):
        assert getattr(ours, name) == getattr(theirs, name), name


@requires_torch_lce_functional
def test_functional_signature_matches_torch():
    _ours_then_extras(FF.linear_cross_entropy, torch.nn.functional.linear_cross_entropy,
                      ["z_loss", "softcap"])


@requires_torch_lce
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("out_features", [(), (3, 2)], ids=["1d", "kdim"])
def test_same_initialisation_as_torch(bias, out_features):
    torch.manual_seed(3)
    theirs = TorchLCE(20, 30, bias=bias, out_features=out_features)
    torch.manual_seed(3)
    ours = fnn.LinearCrossEntropyLoss(20, 30, bias=bias, out_features=out_features)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k


@requires_torch_lce
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("out_features", [(), (3,)], ids=["1d", "kdim"])
def test_state_dict_both_ways(bias, weighted, out_features):
    """A checkpoint of torch's module loads into ours (strict) and gives the same loss, and the
    reverse; the keys are linear.weight, linear.bias and weight (class weights) in both."""
    H, V = 12, 40
    w = torch.rand(V) + 0.5 if weighted else None
    theirs = TorchLCE(H, V, bias=bias, weight=w, out_features=out_features)
    ours = fnn.LinearCrossEntropyLoss(H, V, bias=bias, weight=None if w is None else torch.ones(V),
                                      out_features=out_features)
    expected = ["weight"] * weighted + ["linear.weight"] + ["linear.bias"] * bias
    assert list(theirs.state_dict()) == list(ours.state_dict()) == expected
    ours.load_state_dict(theirs.state_dict())
    x = randn(9, H)
    t = torch.randint(0, V, (9, *out_features))
    torch.testing.assert_close(ours(x, t), theirs(x, t).float())
    back = TorchLCE(H, V, bias=bias, weight=None if w is None else torch.ones(V),
                    out_features=out_features)
    back.load_state_dict(ours.state_dict())
    for k, v in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


@requires_torch_lce
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", ["indices", "kdim", "probabilities"])
def test_module_matches_torch_module(backend, device, reduction, case, monkeypatch):
    """Our module against torch's (float64) with the same parameters: ignore_index left at its
    default (None: -100 for class indices), class weights, label smoothing, bias; K-dimensional
    weights (out_features) and probability targets as torch defines them."""
    monkeypatch.setenv("FUSED_LM_BACKEND", backend)
    N, H, V = 11, 10, 300
    out_features = (3,) if case == "kdim" else ()
    w = torch.rand(V, device=device) + 0.5
    kw = dict(bias=True, weight=w, label_smoothing=0.1, reduction=reduction, out_features=out_features)
    ours = fnn.LinearCrossEntropyLoss(H, V, device=device, **kw)
    theirs = TorchLCE(H, V, device=device, dtype=torch.float64, **{**kw, "weight": w.double()})
    theirs.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    x = randn(N, H, device=device)
    if case == "probabilities":
        t = torch.softmax(randn(N, V, device=device), -1)
    else:
        t = torch.randint(0, V, (N, *out_features), device=device)
        t.view(-1)[::4] = -100
    loss, (dx,), g = _run(lambda x: ours(x, t), (x,))
    tloss, (tdx,), _ = _run(lambda x: theirs(x, t.double() if case == "probabilities" else t),
                            (x.double(),), g)
    assert loss.dtype == torch.float32 and loss.shape == tloss.shape
    assert_close(loss, tloss, torch.float32, what="loss")
    assert_close(dx, tdx, torch.float32, what="dx")
    assert_close(ours.linear.weight.grad, theirs.linear.weight.grad, torch.float32, what="dW")
    assert_close(ours.linear.bias.grad, theirs.linear.bias.grad, torch.float32, what="db")


def test_probability_targets_and_ignore_index():
    x, W = randn(4, 8), randn(10, 8)
    p = torch.softmax(randn(4, 10), -1)
    loss = FF.linear_cross_entropy(x, W, p, label_smoothing=0.1, reduction="none")
    expected = F.cross_entropy(x.double() @ W.double().T, p.double(), label_smoothing=0.1,
                               reduction="none")
    assert loss.dtype == torch.float32
    assert_close(loss, expected, torch.float32)
    with pytest.raises(ValueError, match="ignore_index must be None"):
        FF.linear_cross_entropy(x, W, p, ignore_index=-100)
    with pytest.raises(ValueError, match="batched input"):
        FF.linear_cross_entropy(x[0], randn(10, 3, 8), torch.zeros(3, dtype=torch.long))


def test_options_lend_their_batch_chunk_size(monkeypatch):
    """torch's LinearCrossEntropyOptions (duck-typed: torch 2.11 has none) only sets the chunk."""
    seen = []
    real = _lce.chunk_rows
    monkeypatch.setattr(_lce, "chunk_rows", lambda *a, **k: seen.append(a) or real(*a, **k))
    x, W, b, t = _problem(20, 8, 100, torch.float32, "cpu", False)
    expected = ref.linear_cross_entropy(x, W, t)
    for options, chunk in ((types.SimpleNamespace(batch_chunk_size=6), 6),
                           (types.SimpleNamespace(batch_chunk_size=None), 0), (None, 0)):
        seen.clear()
        assert_close(FF.linear_cross_entropy(x, W, t, options=options), expected, torch.float32)
        assert seen[0][4] == chunk


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
