"""fused_lm.optim.AdamW against torch.optim.AdamW(foreach=False) and the reference, on every
backend available here (Triton under the interpreter, CPU C++, torch; CUDA on a GPU)."""

from __future__ import annotations

import io

import pytest
import torch

import fused_lm.optim as fo
from fused_lm.reference import adamw as ref
from tests._helpers import assert_close, backend_devices, requires_cuda
from tests.optim._common import (clone_params, make_params, random_grads, set_grads,
                                 shapes_for, steps_for, three_groups)

BACKENDS = backend_devices()


def _run_pair(backend, device, dtype, steps, shapes, **kw):
    """Runs ours and torch.optim.AdamW(foreach=False) on identical params and gradients."""
    ours_p = make_params(shapes, dtype, device)
    torch_p = clone_params(ours_p)
    ours = fo.AdamW(three_groups(ours_p), backend=backend, **kw)
    theirs = torch.optim.AdamW(three_groups(torch_p), foreach=False, **kw)
    for s in range(steps):
        grads = random_grads(ours_p, s)
        set_grads(ours_p, grads)
        set_grads(torch_p, grads)
        ours.step()
        theirs.step()
    return ours_p, torch_p, ours, theirs


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("variant", ["default", "amsgrad", "maximize"])
def test_matches_torch_fp32(backend, device, variant):
    kw = {"amsgrad": variant == "amsgrad", "maximize": variant == "maximize"}
    full = variant == "default" and backend in ("cpu", "cuda")
    steps = steps_for(backend) if variant == "default" else min(30, steps_for(backend))
    ours_p, torch_p, ours, theirs = _run_pair(backend, device, torch.float32, steps,
                                              shapes_for(backend, full), **kw)
    for i, (a, b) in enumerate(zip(ours_p, torch_p)):
        assert_close(a, b, torch.float32, scale=5, what=f"param {i}")
        sa, sb = ours.state[a], theirs.state[b]
        assert sa["step"].dtype == torch.float32 and sa["step"].dim() == 0
        assert float(sa["step"]) == float(sb["step"]) == steps
        for k in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if kw["amsgrad"] else ()):
            assert_close(sa[k], sb[k], torch.float32, scale=5, what=f"{k} {i}")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_matches_reference_bf16(backend, device, amsgrad):
    """bf16 params and (torch's default) bf16 state: float32 math, rounded at every store, vs the
    float64 reference that rounds at the same places."""
    shapes = shapes_for(backend)
    steps = 6 if backend == "triton" else 50
    ours_p = make_params(shapes, torch.bfloat16, device)
    ref_p = [p.detach().clone() for p in ours_p]
    groups = three_groups(ours_p)
    ours = fo.AdamW(groups, backend=backend, amsgrad=amsgrad)
    ref_state = [dict(m=torch.zeros_like(p), v=torch.zeros_like(p), vmax=torch.zeros_like(p))
                 for p in ref_p]
    hp = []
    for g in ours.param_groups:
        hp += [g] * len(g["params"])
    for s in range(steps):
        grads = random_grads(ours_p, s)
        set_grads(ours_p, grads)
        ours.step()
        for p, g, st, h in zip(ref_p, grads, ref_state, hp):
            ref.adamw_step(p, g, st["m"], st["v"], s + 1, lr=h["lr"], beta1=h["betas"][0],
                           beta2=h["betas"][1], eps=h["eps"], weight_decay=h["weight_decay"],
                           amsgrad=amsgrad, max_exp_avg_sq=st["vmax"])
    # Norm-wise over the whole model: a lone 0-d bf16 value near zero is ill-conditioned.
    flat = lambda ts: torch.cat([t.detach().float().reshape(-1) for t in ts])
    assert all(a.dtype == torch.bfloat16 and ours.state[a]["exp_avg"].dtype == torch.bfloat16
               for a in ours_p)
    assert_close(flat(ours_p), flat(ref_p), torch.bfloat16, what="params")
    assert_close(flat(ours.state[a]["exp_avg"] for a in ours_p), flat(s["m"] for s in ref_state),
                 torch.bfloat16, what="exp_avg")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_one_launch_per_bucket(backend, device, monkeypatch):
    """Three groups and many tensors of one dtype: one update call (= one step-increment launch +
    one update launch) per step; a second dtype adds one bucket."""
    calls = []
    key = "torch" if backend == "torch" else ("triton" if backend == "triton" else "compiled")
    inner = fo.AdamW._KERNELS[key]
    monkeypatch.setitem(fo.AdamW._KERNELS, key, lambda *a, **k: (calls.append(1), inner(*a, **k)))
    params = make_params([(3,), (5, 2), (7,), (11,), (2, 2), (9,)], device=device)
    params += make_params([(4,), (6,)], torch.bfloat16, device)
    opt = fo.AdamW(three_groups(params), backend=backend)
    set_grads(params, random_grads(params, 0))
    opt.step()
    assert len(calls) == 2


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_per_tensor_steps_and_none_grads(backend, device):
    """A parameter without a gradient on some steps is skipped, and its own step count (hence its
    bias correction) lags, as in torch; empty groups are fine."""
    ours_p = make_params([(33,), (8, 3), (5,)], device=device)
    torch_p = clone_params(ours_p)
    ours = fo.AdamW([{"params": ours_p}, {"params": []}], backend=backend, lr=1e-2)
    theirs = torch.optim.AdamW([{"params": torch_p}, {"params": []}], foreach=False, lr=1e-2)
    for s in range(6):
        grads = random_grads(ours_p, s)
        for ps in (ours_p, torch_p):
            set_grads(ps, grads)
            if s % 2:
                ps[1].grad = None
            if s < 3:
                ps[2].grad = None
        ours.step()
        theirs.step()
    assert float(ours.state[ours_p[1]]["step"]) == 3
    assert float(ours.state[ours_p[2]]["step"]) == 3
    for a, b in zip(ours_p, torch_p):
        assert_close(a, b, torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_grad_scaler_with_injected_inf(backend, device):
    """GradScaler hands grad_scale/found_inf to step(): the kernel unscales, and an inf leaves
    params, state and step counts untouched; then both runs keep matching torch's."""
    torch.manual_seed(0)
    ours_p = make_params([(17,), (4, 5)], device=device)
    torch_p = clone_params(ours_p)
    ours = fo.AdamW(ours_p, backend=backend, lr=1e-2)
    theirs = torch.optim.AdamW(torch_p, lr=1e-2, foreach=False)
    scalers = [torch.amp.GradScaler(device, init_scale=1024.0) for _ in range(2)]
    for s in range(4):
        grads = random_grads(ours_p, s)
        for ps, opt, sc in ((ours_p, ours, scalers[0]), (torch_p, theirs, scalers[1])):
            loss = sum((p * g).sum() for p, g in zip(ps, grads))
            sc.scale(loss).backward()
            if s == 1:
                ps[1].grad[2, 3] = float("inf")
                before = [p.detach().clone() for p in ps]
                state_before = {k: v.clone() for k, v in opt.state[ps[0]].items()}
            sc.step(opt)
            sc.update()
            if s == 1:
                assert all(torch.equal(a, b) for a, b in zip(before, ps))
                for k, v in state_before.items():
                    assert torch.equal(opt.state[ps[0]][k], v), k
            opt.zero_grad()
    assert float(ours.state[ours_p[0]]["step"]) == 3
    assert not hasattr(ours, "found_inf")
    for a, b in zip(ours_p, torch_p):
        assert_close(a, b, torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_sequential_lr_scheduler(backend, device, tensor_lr):
    """LinearLR warm-up + CosineAnnealingLR through SequentialLR; lr as a float or a 0-d tensor."""
    ours_p = make_params([(31,), (3, 5, 7)], device=device)
    torch_p = clone_params(ours_p)
    lr = torch.tensor(1e-2) if tensor_lr else 1e-2
    ours = fo.AdamW(ours_p, lr=lr.clone() if tensor_lr else lr, backend=backend)
    theirs = torch.optim.AdamW(torch_p, lr=lr, foreach=False)
    scheds = []
    for opt in (ours, theirs):
        warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3)
        cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5, eta_min=1e-4)
        scheds.append(torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[3]))
    for s in range(8):
        grads = random_grads(ours_p, s)
        set_grads(ours_p, grads)
        set_grads(torch_p, grads)
        ours.step()
        theirs.step()
        for sc in scheds:
            sc.step()
    assert float(ours.param_groups[0]["lr"]) == pytest.approx(float(theirs.param_groups[0]["lr"]))
    for a, b in zip(ours_p, torch_p):
        assert_close(a, b, torch.float32)


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_state_dict_both_ways(backend, device, direction):
    """A checkpoint of one optimizer loads into the other, which continues as the original."""
    p0 = make_params([(13,), (6, 7)], device=device)
    kw = dict(lr=1e-2, amsgrad=True)
    make_ours = lambda ps: fo.AdamW(three_groups(ps), backend=backend, **kw)
    make_torch = lambda ps: torch.optim.AdamW(three_groups(ps), foreach=False, **kw)
    first, second = (make_torch, make_ours) if direction == "torch_to_ours" else (make_ours, make_torch)
    a_p = clone_params(p0)
    a = first(a_p)
    for s in range(3):
        set_grads(a_p, random_grads(a_p, s))
        a.step()
    b_p = clone_params(a_p)
    b = second(b_p)
    b.load_state_dict(_roundtrip(a.state_dict()))
    assert b.state[b_p[0]]["step"].dtype == torch.float32
    for s in range(3, 6):
        grads = random_grads(a_p, s)
        set_grads(a_p, grads)
        set_grads(b_p, grads)
        a.step()
        b.step()
    for x, y in zip(a_p, b_p):
        assert_close(x, y, torch.float32)
    assert set(a.state[a_p[1]]) == set(b.state[b_p[1]])


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("menu", ["plain", "master_sr", "bf16_state"])
def test_save_reload_continue_bit_identical(backend, device, menu):
    """Save after M steps, load into a NEW optimizer, continue N steps == M + N uninterrupted
    steps, bit for bit on the same backend (stochastic rounding included: the seed is saved)."""
    dtype = torch.bfloat16 if menu == "master_sr" else torch.float32
    kw = dict(master_weights=True, stochastic_rounding=True) if menu == "master_sr" else {}
    if menu == "bf16_state":
        kw = dict(state_dtype=torch.bfloat16)
    p0 = make_params([(7,), (3, 5, 7), (1000,)], dtype, device)
    runs = []
    for interrupt in (False, True):
        ps = clone_params(p0)
        opt = fo.AdamW(three_groups(ps), backend=backend, **kw)
        for s in range(6):
            if interrupt and s == 3:
                sd = _roundtrip(opt.state_dict())
                opt = fo.AdamW(three_groups(ps), backend=backend, **kw)
                opt._seed = 12345  # must be overwritten by the checkpoint
                opt.load_state_dict(sd)
            set_grads(ps, random_grads(ps, s))
            opt.step()
        runs.append((ps, opt))
    (pa, oa), (pb, ob) = runs
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
        for k, v in oa.state[x].items():
            assert torch.equal(v, ob.state[y][k]), k


def test_load_never_downcasts_fp32_state():
    """torch casts loaded state to the param dtype; we keep float32 moments and master weights."""
    p = make_params([(10,)], torch.bfloat16)
    opt = fo.AdamW(p, master_weights=True, state_dtype=torch.float32, backend="torch")
    set_grads(p, random_grads(p, 0))
    opt.step()
    sd = opt.state_dict()
    q = clone_params(p)
    opt2 = fo.AdamW(q, backend="torch")
    opt2.load_state_dict(sd)
    st = opt2.state[q[0]]
    assert st["exp_avg"].dtype == torch.float32 and st["master_param"].dtype == torch.float32
    assert torch.equal(st["master_param"], opt.state[p[0]]["master_param"])
    st["exp_avg"].add_(1.0)     # a copy: continuing never mutates the checkpoint
    assert not torch.equal(st["exp_avg"], sd["state"][0]["exp_avg"])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_master_weights_track_fp32_run(backend, device):
    """bf16 params + float32 master (and float32 state) follow the float32 torch run closely; the
    bf16 param is the master rounded to nearest."""
    shapes = [(129,), (3, 5, 7), (2000,)]
    p32 = make_params(shapes, torch.float32, device)
    p16 = clone_params(p32, torch.bfloat16)
    ours = fo.AdamW(three_groups(p16), backend=backend, master_weights=True,
                    state_dtype=torch.float32)
    theirs = torch.optim.AdamW(three_groups(clone_params(p16, torch.float32)), foreach=False)
    t_p = [p for g in theirs.param_groups for p in g["params"]]
    for s in range(8):
        grads = random_grads(p16, s, torch.bfloat16)
        set_grads(p16, grads)
        set_grads(t_p, [g.float() for g in grads])
        ours.step()
        theirs.step()
    for a, b in zip(p16, t_p):
        master = ours.state[a]["master_param"]
        assert master.dtype == torch.float32
        assert_close(master, b, torch.float32, scale=5)
        assert torch.equal(a, master.to(torch.bfloat16))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bf16_state(backend, device):
    shapes = [(129,), (3, 5, 7)]
    ours_p = make_params(shapes, device=device)
    torch_p = clone_params(ours_p)
    ours = fo.AdamW(ours_p, backend=backend, state_dtype=torch.bfloat16, lr=1e-2)
    theirs = torch.optim.AdamW(torch_p, foreach=False, lr=1e-2)
    for s in range(8):
        grads = random_grads(ours_p, s)
        set_grads(ours_p, grads)
        set_grads(torch_p, grads)
        ours.step()
        theirs.step()
    for a, b in zip(ours_p, torch_p):
        assert ours.state[a]["exp_avg_sq"].dtype == torch.bfloat16
        assert_close(a, b, torch.bfloat16)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_stochastic_rounding_is_unbiased(backend, device):
    """Updates far below the bf16 spacing: round-to-nearest never moves the params, stochastic
    rounding moves them by the right amount on average; the same seed gives the same bits."""
    n, steps, lr = 4096, 8, 2e-4
    results = []
    for sr in (False, True, True):
        p = [torch.ones(n, dtype=torch.bfloat16, device=device, requires_grad=True)]
        opt = fo.AdamW(p, lr=lr, weight_decay=0.0, backend=backend, stochastic_rounding=sr)
        for _ in range(steps):
            p[0].grad = torch.ones_like(p[0])
            opt.step()
        results.append(p[0].detach().float())
    assert torch.equal(results[0], torch.ones(n, device=device))
    drift = 1 - results[1].mean().item()
    assert drift == pytest.approx(steps * lr, rel=0.15)
    assert torch.equal(results[1], results[2])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_params(backend, device):
    base = [torch.randn(7, 5, device=device), torch.randn(6, 4, device=device)]
    ours_p = [base[0].t().requires_grad_(True), base[1][:, ::2].requires_grad_(True)]
    torch_p = clone_params(ours_p)
    ours = fo.AdamW(ours_p, backend=backend, lr=1e-2)
    theirs = torch.optim.AdamW(torch_p, foreach=False, lr=1e-2)
    for s in range(3):
        grads = random_grads(ours_p, s)
        set_grads(ours_p, grads)
        set_grads(torch_p, grads)
        ours.step()
        theirs.step()
    for a, b in zip(ours_p, torch_p):
        assert_close(a, b, torch.float32)


def test_closure_returns_loss():
    p = make_params([(3,)])
    opt = fo.AdamW(p, backend="torch")

    def closure():
        opt.zero_grad()
        loss = (p[0] ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and float(opt.state[p[0]]["step"]) == 1
    assert opt.step() is None


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(lr=-1.0), ValueError, "Invalid learning rate"),
    (dict(lr=torch.tensor([1e-3, 1e-3])), ValueError, "Tensor lr must be 1-element"),
    (dict(eps=-1e-8), ValueError, "Invalid epsilon value"),
    (dict(betas=(1.0, 0.999)), ValueError, "Invalid beta parameter at index 0"),
    (dict(betas=(0.9, -0.1)), ValueError, "Invalid beta parameter at index 1"),
    (dict(weight_decay=-0.1), ValueError, "Invalid weight_decay value"),
    (dict(state_dtype=torch.float16), ValueError, "state_dtype"),
    (dict(backend="tpu"), ValueError, "backend"),
])
def test_bad_hyperparameters(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fo.AdamW(make_params([(3,)]), **kwargs)


def test_bad_group_hyperparameters_rejected():
    opt = fo.AdamW(make_params([(3,)]))
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.add_param_group({"params": make_params([(2,)]), "lr": -1.0})
    assert len(opt.param_groups) == 1


def test_bad_params_and_grads_raise_before_any_change():
    with pytest.raises(TypeError, match="complex"):     # AdamW takes them (test_conformance)
        fo.Lion([torch.randn(3, dtype=torch.complex64, requires_grad=True)])
    with pytest.raises(TypeError, match="floating-point"):
        fo.AdamW([torch.ones(3, dtype=torch.int64)])
    good, bad = make_params([(4,), (5,)])
    opt = fo.AdamW([good, bad], backend="torch")
    good.grad = torch.randn(4)
    bad.grad = torch.randn(5).to_sparse()
    before = good.detach().clone()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(good, before) and len(opt.state) == 0


def test_float64_params_use_torch_path():
    p = make_params([(9,)], torch.float64)
    q = clone_params(p)
    ours = fo.AdamW(p)
    theirs = torch.optim.AdamW(q, foreach=False)
    for s in range(3):
        grads = random_grads(p, s)
        set_grads(p, grads)
        set_grads(q, grads)
        ours.step()
        theirs.step()
    assert_close(p[0], q[0], torch.float64, scale=1e5)
    with pytest.raises(TypeError, match="supports"):
        opt = fo.AdamW(p, backend="triton")
        set_grads(p, random_grads(p, 0))
        opt.step()


# -- GPU (realistic sizes; run by `pytest -m gpu` on a CUDA machine) ---------------------------

@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_no_host_sync_and_graph_capture(backend):
    shapes = [(4096, 1024), (1024,), (50257, 64), (3,), ()]
    ps = make_params(shapes, device="cuda")
    lr = torch.tensor(1e-3, device="cuda")
    ours = fo.AdamW(three_groups(ps), lr=lr, backend=backend)
    set_grads(ps, random_grads(ps, 0))
    ours.step()                                   # warm-up: state, tables, hp built
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ours.step()
        ours.grad_scale = torch.full((1,), 1024.0, device="cuda")
        ours.found_inf = torch.zeros(1, device="cuda")
        ours.step()
        del ours.grad_scale, ours.found_inf
    finally:
        torch.cuda.set_sync_debug_mode(0)
    # CUDA graph: capture one step, replay it.
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        ours.step()
    torch.cuda.current_stream().wait_stream(s)
    before = ps[0].detach().clone()
    g.replay()
    torch.cuda.synchronize()
    assert not torch.equal(before, ps[0])
    assert float(ours.state[ps[0]]["step"]) == 4     # 3 eager steps + 1 replay (capture runs nothing)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_matches_torch_realistic(backend, dtype):
    shapes = [(4096, 1024), (1 << 20,), (1023,), (), (3, 5, 7), (50257, 128)]
    ps = make_params(shapes, dtype, "cuda")
    qs = clone_params(ps)
    ours = fo.AdamW(three_groups(ps), backend=backend)
    theirs = torch.optim.AdamW(three_groups(qs), foreach=False)
    for s in range(20):
        grads = [torch.randn_like(p) for p in ps]
        set_grads(ps, grads)
        set_grads(qs, grads)
        ours.step()
        theirs.step()
    for a, b in zip(ps, qs):
        assert_close(a, b, dtype, scale=5)
    ps2 = make_params([(10,), (20,)], device="cuda") + make_params([(30,)])  # two devices
    opt = fo.AdamW(ps2, backend=None)
    set_grads(ps2, random_grads(ps2, 0))
    opt.step()
    assert all(float(opt.state[p]["step"]) == 1 for p in ps2)
