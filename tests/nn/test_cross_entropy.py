"""Fused cross-entropy (issue 6): forward and backward against the float64 reference and against
torch.nn.functional.cross_entropy (the drop-in semantics), every option and reduction, on the
Triton kernel (interpreter on CPU) and the torch path."""

import inspect

import pytest
import torch
import torch.nn.functional as F

import fused_lm.nn as fnn
from fused_lm import _backend
from fused_lm.nn import functional as FF
from fused_lm.ops import cross_entropy as _ce
from fused_lm.ops.cross_entropy import cross_entropy
from fused_lm.reference import cross_entropy as ref
from tests._helpers import (assert_close, backend_devices, poison_allocations, randn, requires_cuda,
                           triton_devices)

BACKENDS = backend_devices(("triton", "torch"))

# Vocabularies that are not powers of two and span several interpreter blocks (512).
V_BY_DTYPE = {torch.float32: 1000, torch.bfloat16: 1537, torch.float16: 777}

OPTIONS = {
    "plain": {},
    "smooth+ignore": {"label_smoothing": 0.1},
    "zloss+weight": {"z_loss": 1e-2, "weight": True},
    "softcap+smooth": {"softcap": 4.0, "label_smoothing": 0.2},
    "all": {"softcap": 3.0, "label_smoothing": 0.15, "z_loss": 1e-3, "weight": True},
}


def _options(opts, V, device):
    opts = dict(opts)
    if opts.pop("weight", False):
        opts["weight"] = torch.rand(V, device=device) + 0.25
    return opts


def _targets(N, V, device, ignore_index=-100, n_ignored=3):
    t = torch.randint(0, V, (N,), device=device)
    t[torch.randperm(N, device=device)[:n_ignored]] = ignore_index
    return t


def _run(fn, x, grad_output=None):
    """loss and d(loss . grad_output)/dx of fn(x)."""
    x = x.detach().clone().requires_grad_()
    loss = fn(x)
    g = torch.randn_like(loss, dtype=torch.float64) if grad_output is None else grad_output
    loss.backward(g.to(loss.dtype))
    return loss, x.grad, g


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", list(OPTIONS), ids=list(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_reference(backend, device, dtype, opts, reduction):
    N, V = 19, V_BY_DTYPE[dtype]
    kw = _options(OPTIONS[opts], V, device)
    x = randn(N, V, dtype=dtype, device=device, scale=3.0)
    t = _targets(N, V, device)
    loss, dx, g = _run(lambda x: cross_entropy(x, t, reduction=reduction, backend=backend, **kw), x)
    rloss, rdx, _ = _run(lambda x: ref.cross_entropy(x, t, reduction=reduction, **kw),
                         x.to(torch.float64), g)
    assert loss.dtype == torch.float32 and dx.dtype == dtype
    assert loss.shape == ((N,) if reduction == "none" else ())
    assert_close(loss, rloss, torch.float32, what="loss")        # float32-accurate for every dtype
    assert_close(dx, rdx, dtype, what="dlogits")
    assert bool((dx[t == -100] == 0).all()), "ignored rows must get a zero gradient"


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_matches_torch(backend, device, weighted, smoothing, reduction):
    """Drop-in semantics: torch's F.cross_entropy in float64 (class weights per target class,
    smoothing weighted per class, mean over the weighted non-ignored count, ignore_index)."""
    N, V = 23, 1031
    w = torch.rand(V, device=device, dtype=torch.float64) + 0.1 if weighted else None
    x = randn(N, V, device=device, scale=2.0)
    t = _targets(N, V, device, ignore_index=7, n_ignored=4)
    kw = dict(ignore_index=7, reduction=reduction, label_smoothing=smoothing)
    loss, dx, g = _run(lambda x: cross_entropy(x, t, None if w is None else w.float(),
                                               backend=backend, **kw), x)
    tloss, tdx, _ = _run(lambda x: F.cross_entropy(x, t, w, **kw), x.double(), g)
    assert_close(loss, tloss, torch.float32, what="loss vs torch")
    assert_close(dx, tdx, torch.float32, what="dlogits vs torch")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_batched_inputs_and_module(backend, device, reduction, monkeypatch):
    """(B, T, V) logits with (B, T) targets (class dimension last), through the public module;
    torch's layout for the same problem is (B, V, T)."""
    monkeypatch.setenv("FUSED_LM_BACKEND", backend)
    B, T, V = 3, 5, 600
    w = torch.rand(V, device=device) + 0.5
    x = randn(B, T, V, device=device)
    t = _targets(B * T, V, device).reshape(B, T)
    mod = fnn.CrossEntropyLoss(w, reduction=reduction, label_smoothing=0.05)
    assert torch.equal(mod.state_dict()["weight"], w)
    loss, dx, g = _run(lambda x: mod(x, t), x)
    tloss, tdx, _ = _run(lambda x: F.cross_entropy(x.transpose(1, 2), t, w.double(),
                                                   reduction=reduction, label_smoothing=0.05),
                         x.double(), g)
    assert loss.shape == ((B, T) if reduction == "none" else ())
    assert_close(loss, tloss, torch.float32)
    assert_close(dx, tdx, torch.float32)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_torchs_result(backend, device, reduction, weighted):
    N, V = 6, 300
    w = torch.rand(V, device=device) + 0.5 if weighted else None
    x = randn(N, V, device=device)
    t = torch.full((N,), -100, device=device)
    loss, dx, _ = _run(lambda x: cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1,
                                               backend=backend), x, torch.ones(()) if reduction != "none" else torch.ones(N))
    expected = F.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(loss, expected, equal_nan=True)
    if reduction == "mean":
        assert torch.isnan(loss)
    assert bool((dx == 0).all())


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_and_single(backend, device, reduction):
    x = randn(0, 50, device=device)
    t = torch.zeros(0, dtype=torch.long, device=device)
    loss, dx, _ = _run(lambda x: cross_entropy(x, t, reduction=reduction, backend=backend), x,
                       torch.ones(()) if reduction != "none" else torch.ones(0))
    torch.testing.assert_close(loss, F.cross_entropy(x, t, reduction=reduction), equal_nan=True)
    assert dx.shape == (0, 50)
    # one row; and unbatched (V,) logits with a 0-d target, as torch accepts
    for x, t in ((randn(1, 77, device=device), torch.tensor([5], device=device)),
                 (randn(77, device=device), torch.tensor(5, device=device))):
        loss, dx, g = _run(lambda x: cross_entropy(x, t, reduction=reduction, backend=backend), x)
        tloss, tdx, _ = _run(lambda x: F.cross_entropy(x, t, reduction=reduction), x.double(), g)
        assert loss.shape == tloss.shape
        assert_close(loss, tloss, torch.float32)
        assert_close(dx, tdx, torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_extreme_logits(backend, device):
    """Large logits stay finite (online max); -inf logits (a masked vocabulary) are allowed when
    the target is not masked; a whole -inf first block does not poison the running sum."""
    N, V = 5, 1300
    x = randn(N, V, device=device, scale=80.0)
    x[1, :600] = float("-inf")
    x[2, 100:200] = float("-inf")
    t = torch.tensor([3, 700, 50, 1299, 0], device=device)
    loss, dx, g = _run(lambda x: cross_entropy(x, t, reduction="none", backend=backend), x)
    rloss, rdx, _ = _run(lambda x: ref.cross_entropy(x, t, reduction="none"), x.double(), g)
    assert torch.isfinite(loss).all() and torch.isfinite(dx).all()
    assert_close(loss, rloss, torch.float32)
    assert_close(dx, rdx, torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_every_gradient_element_written(backend, device):
    N, V = 7, 1100
    x = randn(N, V, device=device).requires_grad_()
    t = _targets(N, V, device, n_ignored=2)
    with poison_allocations():
        loss = cross_entropy(x, t, softcap=5.0, label_smoothing=0.1, backend=backend)
        loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_targets_int32_noncontiguous_and_no_grad(backend, device):
    N, V = 9, 640
    base = randn(N, 2 * V, device=device)
    x = base[:, ::2]                                          # column stride 2: copied
    t = torch.randint(0, V, (N,), device=device, dtype=torch.int32)
    expected = ref.cross_entropy(x, t, label_smoothing=0.1)
    assert_close(cross_entropy(x, t, label_smoothing=0.1, backend=backend), expected, torch.float32)
    with torch.no_grad():
        xg = x.clone().requires_grad_()
        assert_close(cross_entropy(xg, t, label_smoothing=0.1, backend=backend), expected, torch.float32)
    logits = randn(N, V, device=device)
    before = logits.clone()
    cross_entropy(logits.requires_grad_(), t.long(), backend=backend).backward()
    assert torch.equal(logits.detach(), before), "the caller's logits must not be overwritten"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_out_of_range_targets_raise_on_cpu(backend, device):
    if device != "cpu":
        pytest.skip("CPU tensors always check; CUDA checks under FUSED_LM_CHECK=1 (gpu tests)")
    x = randn(4, 100, device=device)
    for bad in (100, -1, 1000):
        t = torch.tensor([1, bad, 2, -100])
        with pytest.raises(IndexError, match=r"out of range.*\[0, 100\)"):
            cross_entropy(x, t, backend=backend)


@pytest.mark.parametrize("programs", ["1", "3", "1000"])
def test_persistent_grid_sizes(programs, monkeypatch):
    """One program for every row, a few rows per program, one program per row: same result."""
    if not _backend.interpreter_on() and not torch.cuda.is_available():
        pytest.skip("needs the Triton kernel")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    N, V = 11, 700
    x = randn(N, V, device=device)
    t = _targets(N, V, device, n_ignored=2)
    expected = _run(lambda x: ref.cross_entropy(x, t, reduction="none"), x.double(), torch.ones(N))
    monkeypatch.setenv("FUSED_LM_CE_PROGRAMS", programs)
    loss, dx, _ = _run(lambda x: cross_entropy(x, t, reduction="none", backend="triton"), x,
                       torch.ones(N))
    assert_close(loss, expected[0], torch.float32)
    assert_close(dx, expected[1], torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_second_backward(backend, device):
    """Custom op (the kernel; z-loss/softcap on the torch path): the stored gradient is consumed
    in place, so a retained graph cannot silently reuse it (torch's "inplace" error). Torch
    path without them (F.cross_entropy): autograd as in torch, a second backward accumulates the
    same gradient again."""
    t = torch.randint(0, 50, (4,), device=device)
    for extra in ({}, {"z_loss": 1e-3}, {"softcap": 5.0}):
        x = randn(4, 50, device=device).requires_grad_()
        loss = cross_entropy(x, t, backend=backend, **extra)
        loss.backward(retain_graph=True)
        first = x.grad.clone()
        if backend == "triton" or extra:
            with pytest.raises(RuntimeError, match="inplace"):
                loss.backward()
        else:
            loss.backward()
            torch.testing.assert_close(x.grad, 2 * first)


def test_bad_arguments():
    x, t = randn(4, 10), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="reduction"):
        FF.cross_entropy(x, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        FF.cross_entropy(x, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="softcap"):
        FF.cross_entropy(x, t, softcap=0.0)
    with pytest.raises(ValueError, match="z_loss"):
        FF.cross_entropy(x, t, z_loss=-1.0)
    with pytest.raises(ValueError, match="10 class weights"):
        FF.cross_entropy(x, t, weight=torch.ones(9))
    with pytest.raises(ValueError, match=r"target has shape \(5,\)"):
        FF.cross_entropy(x, torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="integer class indices"):
        FF.cross_entropy(x, t.float())
    with pytest.raises(TypeError, match="floating tensor of logits"):
        FF.cross_entropy(t, t)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_probability_targets_fall_back_to_torch(reduction):
    x = randn(6, 40).requires_grad_()
    p = torch.softmax(randn(6, 40), -1)
    loss = FF.cross_entropy(x, p, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(loss, F.cross_entropy(x, p, reduction=reduction, label_smoothing=0.1))


def test_backend_selection():
    dev = torch.device("cpu")
    expected = "triton" if _backend.interpreter_on() else "torch"
    assert _backend.select("cross_entropy", dev, torch.bfloat16) == expected
    assert _backend.select("cross_entropy", dev, torch.float64) == "torch"
    assert _backend.OPS["cross_entropy"].gpu_default == "triton"


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph(backend, device, reduction):
    """The custom op (fake impl + autograd) traces under torch.compile(fullgraph=True)."""
    N, V = 8, 300
    x = randn(N, V, device=device)
    t = _targets(N, V, device, n_ignored=1)
    w = torch.rand(V, device=device) + 0.5

    def f(x, t):
        return cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1, z_loss=1e-3,
                             softcap=10.0, backend=backend).sum() * 1.5

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss, dx, _ = _run(lambda x: compiled(x, t), x, torch.ones(()))
    eloss, edx, _ = _run(lambda x: f(x, t), x, torch.ones(()))
    torch.testing.assert_close(loss, eloss)
    torch.testing.assert_close(dx, edx)


# ----------------------------------------------------------------------------- the torch path (CPU default)

def _kernel_device():
    devices = triton_devices()
    if not devices:
        pytest.skip("needs the Triton kernel (CUDA, or the interpreter on CPU)")
    return devices[0]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", list(OPTIONS), ids=list(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_and_torch_paths_agree(dtype, opts, reduction):
    """The torch path (torch's F.cross_entropy with softcap/z-loss composed around it: the CPU
    default) and the kernel give the same loss and gradient for every option, and the same
    contract: float32 loss, gradient in the input dtype, zero rows for ignored tokens."""
    device = _kernel_device()
    N, V = 21, V_BY_DTYPE[dtype]
    kw = _options(OPTIONS[opts], V, device)
    x = randn(N, V, dtype=dtype, device=device, scale=3.0)
    t = _targets(N, V, device, n_ignored=4)
    kloss, kdx, g = _run(lambda x: cross_entropy(x, t, reduction=reduction, backend="triton", **kw), x)
    tloss, tdx, _ = _run(lambda x: cross_entropy(x, t, reduction=reduction, backend="torch", **kw), x, g)
    assert tloss.dtype == kloss.dtype == torch.float32 and tdx.dtype == kdx.dtype == dtype
    assert_close(tloss, kloss, torch.float32, what="loss")
    assert_close(tdx, kdx, dtype, what="dlogits")
    assert bool((tdx[t == -100] == 0).all())


def test_cpu_default_routes_to_torch_cross_entropy(monkeypatch):
    """Without the interpreter (a laptop, a CPU CI) CPU tensors take torch's own
    F.cross_entropy, with every option it has passed through; with z-loss or softcap (torch has
    neither) the custom op on its PyTorch twin of the kernel (_ce_rows_torch), which the CPU
    benchmark measured faster than autograd through a composition around F.cross_entropy."""
    monkeypatch.setattr(_backend, "interpreter_on", lambda: False)
    monkeypatch.delenv("FUSED_LM_BACKEND", raising=False)
    assert _backend.select("cross_entropy", "cpu", torch.float32) == "torch"
    calls, rows_calls = [], []
    real, real_rows = F.cross_entropy, _ce._ce_rows_torch

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", spy)
    monkeypatch.setattr(_ce, "_ce_rows_torch", lambda *a: rows_calls.append(a) or real_rows(*a))
    N, V = 17, 300
    x = randn(N, V, scale=2.0)
    t = _targets(N, V, "cpu", ignore_index=7, n_ignored=3)
    w = torch.rand(V) + 0.5
    for extra in ({}, {"z_loss": 1e-3}, {"softcap": 5.0}, {"softcap": 5.0, "z_loss": 1e-2}):
        calls.clear()
        rows_calls.clear()
        loss, dx, g = _run(lambda x: FF.cross_entropy(x, t, w, ignore_index=7, reduction="sum",
                                                      label_smoothing=0.1, **extra), x)
        if extra:
            assert not calls and len(rows_calls) == 1
        else:
            assert len(calls) == 1 and not rows_calls
            assert calls[0]["ignore_index"] == 7 and calls[0]["label_smoothing"] == 0.1
            assert calls[0]["reduction"] == "sum"
        rloss, rdx, _ = _run(lambda x: ref.cross_entropy(x, t, w, ignore_index=7, reduction="sum",
                                                         label_smoothing=0.1, **extra), x.double(), g)
        assert loss.dtype == torch.float32
        assert_close(loss, rloss, torch.float32)
        assert_close(dx, rdx, torch.float32)


def test_signatures_match_torch():
    """Positional and keyword calls bind as in torch: torch's parameters in torch's order with
    torch's defaults, then our keyword-only options."""
    def params(fn):
        return [(p.name, p.default, p.kind) for p in inspect.signature(fn).parameters.values()]

    for ours, theirs in ((FF.cross_entropy, F.cross_entropy),
                         (fnn.CrossEntropyLoss.__init__, torch.nn.CrossEntropyLoss.__init__)):
        mine, torch_params = params(ours), params(theirs)
        assert mine[:len(torch_params)] == torch_params
        assert [(n, k) for n, _, k in mine[len(torch_params):]] == [
            ("z_loss", inspect.Parameter.KEYWORD_ONLY), ("softcap", inspect.Parameter.KEYWORD_ONLY)]


@pytest.mark.filterwarnings("ignore:size_average and reduce args will be deprecated")
@pytest.mark.parametrize("size_average,reduce", [(False, None), (None, False), (True, True)])
def test_legacy_reduction_arguments(size_average, reduce):
    x, t = randn(6, 40), torch.randint(0, 40, (6,))
    expected = F.cross_entropy(x, t, None, size_average, -100, reduce)
    torch.testing.assert_close(FF.cross_entropy(x, t, None, size_average, -100, reduce), expected)
    mod = fnn.CrossEntropyLoss(None, size_average, -100, reduce)
    assert mod.reduction == torch.nn.CrossEntropyLoss(None, size_average, -100, reduce).reduction
    torch.testing.assert_close(mod(x, t), expected)


def test_module_state_dict_matches_torch():
    w = torch.rand(30) + 0.5
    ours, theirs = fnn.CrossEntropyLoss(w, label_smoothing=0.1), torch.nn.CrossEntropyLoss(w)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight"]
    fresh = fnn.CrossEntropyLoss(torch.ones(30))
    fresh.load_state_dict(theirs.state_dict())
    assert torch.equal(fresh.weight, w)
    assert list(fnn.CrossEntropyLoss().state_dict()) == []


# ----------------------------------------------------------------------------- softcap precision

SOFTCAP_SCALES = {"randn": 1.0, "small": 1e-3, "tiny": 1e-5, "mixed": None}


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind", list(SOFTCAP_SCALES))
@pytest.mark.parametrize("softcap", [30.0, 2.0])
def test_softcap_accuracy(backend, device, kind, softcap):
    """Softcap at Liger-Kernel's tolerance, element by element against the float64 reference,
    including logits near 0 (issue 12, item 10).

    Bounds, measured (N=64, V=1100, both caps, every kind): torch's own fp32
    ``F.cross_entropy(cap * tanh(x / cap))`` is within 1.2e-7 relative per token and 1.3e-6 per
    gradient element (the fp32 rounding of lse ~ 7 alone gives ~5e-7 on p = exp(z - lse)). The
    accurate tanh gives 1.0e-7 and 1.6e-6; tanh(u) = 2 sigmoid(2u) - 1 gave 5.6e-7 and 4.9e-6
    at softcap=30 (an absolute error of cap * 6e-8 in every capped logit), which fails here.
    Liger's rtol 1e-6 on the loss is implied by the 3e-7 bound. Gradient elements below 1e-6 of
    the largest one are compared absolutely (for |x| >> cap, 1 - tanh^2 underflows in fp32)."""
    N, V = 13, 1100
    if kind == "mixed":          # magnitudes from 1e-6 to 1e2 in every row
        x = randn(N, V, device=device) * 10.0 ** torch.empty(N, V, device=device).uniform_(-6, 2)
    else:
        x = randn(N, V, device=device, scale=SOFTCAP_SCALES[kind])
    t = torch.randint(0, V, (N,), device=device)
    loss, dx, _ = _run(lambda x: cross_entropy(x, t, reduction="none", softcap=softcap,
                                               backend=backend), x, torch.ones(N, dtype=torch.float64))
    rloss, rdx, _ = _run(lambda x: ref.cross_entropy(x, t, reduction="none", softcap=softcap),
                         x.double(), torch.ones(N, dtype=torch.float64))
    torch.testing.assert_close(loss.double(), rloss.detach(), rtol=3e-7, atol=0)
    # elements far below the largest (1 - tanh^2 underflows for |x| >> cap) compare absolutely
    torch.testing.assert_close(dx.double(), rdx, rtol=3e-6, atol=1e-6 * rdx.abs().max().item())


# ----------------------------------------------------------------------------- GPU (realistic sizes)

@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("V", [32000, 128256])
@pytest.mark.parametrize("opts", ["plain", "all"])
def test_gpu_realistic(V, opts):
    N = 4096
    kw = _options(OPTIONS[opts], V, "cuda")
    x = randn(N, V, dtype=torch.bfloat16, device="cuda", scale=3.0)
    t = _targets(N, V, "cuda", n_ignored=100)
    loss, dx, g = _run(lambda x: cross_entropy(x, t, **kw), x, torch.tensor(0.7, device="cuda"))
    rloss, rdx, _ = _run(lambda x: ref.cross_entropy(x, t, dtype=torch.float32, **kw),
                         x.float(), g)
    assert_close(loss, rloss, torch.float32, scale=10)
    assert_close(dx, rdx, torch.bfloat16)


@pytest.mark.gpu
@requires_cuda
def test_gpu_64bit_offsets():
    """N*V > 2**31 elements: row offsets must be 64-bit (the last rows are checked)."""
    N, V = 16800, 128256
    x = torch.randn(N, V, device="cuda", dtype=torch.bfloat16).requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda")
    loss = cross_entropy(x, t, reduction="none")
    loss.sum().backward()
    tail = slice(N - 8, N)
    xr = x.detach()[tail].double().requires_grad_()
    rl = ref.cross_entropy(xr, t[tail], reduction="none")
    rl.sum().backward()
    assert_close(loss[tail], rl, torch.float32)
    assert_close(x.grad[tail], xr.grad, torch.bfloat16)


@pytest.mark.gpu
@requires_cuda
def test_gpu_checked_mode(monkeypatch):
    x = torch.randn(8, 1000, device="cuda")
    t = torch.randint(0, 1000, (8,), device="cuda")
    t[3] = 1000
    loss = cross_entropy(x, t, reduction="none")              # unchecked: NaN, no illegal access
    assert torch.isnan(loss[3]) and torch.isfinite(loss[torch.arange(8, device="cuda") != 3]).all()
    monkeypatch.setenv("FUSED_LM_CHECK", "1")
    with pytest.raises(IndexError, match="out of range"):
        cross_entropy(x, t)
