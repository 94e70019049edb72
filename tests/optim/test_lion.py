"""fused_lm.optim.Lion against the float64 reference (fused_lm/reference/lion.py) on every
backend available here."""

from __future__ import annotations

import io

import pytest
import torch

import fused_lm.optim as fo
from fused_lm.reference import lion as ref
from tests._helpers import assert_close, backend_devices, requires_cuda
from tests.optim._common import (clone_params, make_params, random_grads, set_grads,
                                 shapes_for, three_groups)

BACKENDS = backend_devices()


def _flat(ts):
    return torch.cat([t.detach().double().reshape(-1) for t in ts])


def _reference_run(params, steps, maximize=False, **_):
    """Reference Lion over three_groups(params) with float32 storage, float64 math."""
    groups = three_groups(params)
    defaults = dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0)
    state = [torch.zeros_like(p) for p in params]
    hp = []
    for g in groups:
        hp += [{**defaults, **g}] * len(g["params"])
    for s in range(steps):
        grads = random_grads(params, s)
        for p, g, m, h in zip(params, grads, state, hp):
            ref.lion_step(p, g, m, lr=h["lr"], beta1=h["betas"][0], beta2=h["betas"][1],
                          weight_decay=h["weight_decay"], maximize=maximize)
    return state


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("maximize", [False, True])
def test_matches_reference(backend, device, dtype, maximize):
    steps = 10 if backend == "triton" else (60 if dtype == torch.float32 and not maximize else 20)
    shapes = shapes_for(backend)
    ours_p = make_params(shapes, dtype, device)
    ref_p = [p.detach().clone() for p in ours_p]
    ours = fo.Lion(three_groups(ours_p), backend=backend, maximize=maximize)
    for s in range(steps):
        set_grads(ours_p, random_grads(ours_p, s))
        ours.step()
    ref_m = _reference_run(ref_p, steps, maximize)
    # sign() makes Lion discontinuous: a moment within rounding of 0 may flip an update by 2*lr,
    # so compare norm-wise over the whole model.
    assert_close(_flat(ours_p), _flat(ref_p), dtype, what="params")
    assert_close(_flat(ours.state[p]["exp_avg"] for p in ours_p), _flat(ref_m), dtype,
                 what="exp_avg")
    assert all(float(ours.state[p]["step"]) == steps for p in ours_p)
    assert set(ours.state[ours_p[0]]) == {"step", "exp_avg"}


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_grad_scaler_and_master_weights(backend, device):
    """Unscaling inside the kernel (grad_scale), skipping on found_inf, bf16 params with float32
    masters that follow the float32 reference."""
    p16 = make_params([(33,), (4, 5)], torch.bfloat16, device)
    p32 = clone_params(p16, torch.float32)
    ours = fo.Lion(p16, lr=1e-3, weight_decay=0.1, backend=backend, master_weights=True)
    m32 = [torch.zeros_like(p) for p in p32]
    for s in range(5):
        grads = random_grads(p16, s, torch.bfloat16)
        set_grads(p16, [g * 256 for g in grads])
        ours.grad_scale = torch.full((1,), 256.0, device=device)
        ours.found_inf = torch.full((1,), float(s == 2), device=device)
        before = [ours.state[p]["master_param"].clone() for p in p16] if s == 2 else None
        ours.step()
        if s == 2:
            assert all(torch.equal(b, ours.state[p]["master_param"]) for b, p in zip(before, p16))
            continue
        for p, g, m in zip(p32, grads, m32):
            ref.lion_step(p, g.float(), m, lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1)
    del ours.grad_scale, ours.found_inf
    for p, q in zip(p16, p32):
        assert float(ours.state[p]["step"]) == 4
        assert_close(ours.state[p]["master_param"], q, torch.float32)
        assert torch.equal(p, ours.state[p]["master_param"].to(torch.bfloat16))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_save_reload_bit_identical_with_sr(backend, device):
    p0 = make_params([(7,), (1000,)], torch.bfloat16, device)
    runs = []
    for interrupt in (False, True):
        ps = clone_params(p0)
        opt = fo.Lion(ps, lr=1e-3, backend=backend, stochastic_rounding=True,
                      state_dtype=torch.float32)
        for s in range(4):
            if interrupt and s == 2:
                buf = io.BytesIO()
                torch.save(opt.state_dict(), buf)
                buf.seek(0)
                opt = fo.Lion(ps, lr=1e-3, backend=backend, stochastic_rounding=True,
                              state_dtype=torch.float32)
                opt.load_state_dict(torch.load(buf, weights_only=True))
            set_grads(ps, random_grads(ps, s))
            opt.step()
        runs.append(ps)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "Invalid learning rate"),
    (dict(betas=(0.9, 1.5)), "Invalid beta parameter at index 1"),
    (dict(weight_decay=-1.0), "Invalid weight_decay value"),
])
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fo.Lion(make_params([(3,)]), **kwargs)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_realistic(backend):
    shapes = [(4096, 1024), (1 << 20,), (1023,), (), (50257, 64)]
    ps = make_params(shapes, torch.float32, "cuda")
    rp = [p.detach().clone() for p in ps]
    opt = fo.Lion(three_groups(ps), backend=backend)
    for s in range(10):
        set_grads(ps, random_grads(ps, s))
        opt.step()
    ref_m = _reference_run(rp, 10)
    assert_close(_flat(ps), _flat(rp), torch.float32)
    assert_close(_flat(opt.state[p]["exp_avg"] for p in ps), _flat(ref_m), torch.float32)
