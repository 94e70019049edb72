"""Gradient clipping (issue 5), the API of fused_lm/clip.py: clip_grad_norm_ and friends against
torch.nn.utils and the float64 reference, on every backend; DTensor (FSDP2), DDP and process-group
reductions with two gloo processes against one process; clipping fused into the optimizer step.
The kernels underneath are tested on their own in tests/ops/test_multi_tensor_{norm,clamp}.py.

Every backend runs on the same inputs (Triton under the interpreter and the C++ CPU kernels here,
CUDA where a GPU is present). Norms are compared with the float64 reference of the SAME stored
values, so the only error is float32 accumulation (and exp2/log2 for general p): TOL[float32].
"""

from __future__ import annotations

import datetime
import math
import os
import tempfile
import warnings

import pytest
import torch

import fused_lm
from fused_lm.ops import _multi_tensor as mt
from fused_lm.ops.multi_tensor_norm import multi_tensor_norm
from fused_lm.reference import multi_tensor_norm as ref
from tests._helpers import MIXED, assert_close, backend_devices, norm_tol, randn, requires_cuda

# Under the interpreter, numpy warns on log2(0) inside |x|^p = 2^(p log2|x|) (the result, 0 or
# inf, is the intended one).
# The finalise's non-finite flag computes norm - norm (inf - inf = NaN, the intended test).
pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")]

def _params(device, spec=MIXED, none_at=(2,)):
    """Parameters with random gradients; the ones at ``none_at`` have grad None."""
    ps = []
    for i, (s, d) in enumerate(spec):
        p = torch.nn.Parameter(randn(*s, dtype=d, device=device))
        p.grad = None if i in none_at else randn(*s, dtype=d, device=device)
        ps.append(p)
    return ps


def _clone_params(ps, dtype=None):
    out = []
    for p in ps:
        q = torch.nn.Parameter(p.detach().to(dtype or p.dtype, copy=True))
        q.grad = None if p.grad is None else p.grad.to(dtype or p.dtype, copy=True)
        out.append(q)
    return out


# --------------------------------------------------------------------------------------------
# clip_grad_norm_ and friends.

@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("p", [2.0, 1.0, math.inf, 3.0, 0.0])
def test_clip_grad_norm_matches_torch(backend, device, p):
    ps = _params(device)
    # torch runs on float32 copies of the same values (its norm of all-bf16 gradients is rounded
    # to bf16).
    ps_torch = _clone_params(ps, torch.float32)
    grads = [q.grad for q in ps if q.grad is not None]
    want_grads, want_norm = ref.clip_grad_norm(grads, 0.3 if p != 0 else 2.5, p)
    norm = fused_lm.clip_grad_norm_(ps, 0.3 if p != 0 else 2.5, p, backend=backend)
    assert norm.dtype == torch.float32 and norm.shape == ()
    assert_close(norm, want_norm, torch.float32, scale=norm_tol(p))
    assert [q.grad is None for q in ps] == [q.grad is None for q in ps_torch]
    for g, w in zip((q.grad for q in ps if q.grad is not None), want_grads):
        assert_close(g, w, g.dtype, scale=norm_tol(p))
    torch_norm = torch.nn.utils.clip_grad_norm_([q for q in ps_torch if q.numel() or p != math.inf],
                                                0.3 if p != 0 else 2.5, p)
    assert_close(norm, torch_norm, torch.float32, scale=norm_tol(p))
    for q, q_torch in zip(ps, ps_torch):
        if q.grad is not None:
            assert_close(q.grad, q_torch.grad.to(q.grad.dtype), q.grad.dtype, scale=norm_tol(p))


@pytest.mark.parametrize("backend,device", backend_devices())
def test_clip_no_op_below_max_and_helpers(backend, device):
    ps = _params(device, [((50,), torch.float32), ((30,), torch.bfloat16)], none_at=())
    before = [q.grad.clone() for q in ps]
    norm = fused_lm.get_total_norm([q.grad for q in ps], backend=backend)
    fused_lm.clip_grads_with_norm_(ps, 1e6, norm, backend=backend)   # coefficient clamped to 1
    for q, b in zip(ps, before):
        assert torch.equal(q.grad, b)
    fused_lm.clip_grads_with_norm_(ps, 1.0, norm, backend=backend)
    assert_close(fused_lm.get_total_norm([q.grad for q in ps], backend=backend),
                 torch.tensor(1.0, dtype=torch.float64), torch.bfloat16)
    # A single tensor is accepted, like torch.
    single = _params(device, [((9,), torch.float32)], none_at=())[0]
    g = single.grad.clone()
    norm = fused_lm.clip_grad_norm_(single, 0.1, backend=backend)
    assert_close(norm, ref.total_norm([g]), torch.float32)
    assert_close(single.grad, ref.clip_grad_norm([g], 0.1)[0][0], torch.float32)


def test_clip_none_and_empty():
    p = torch.nn.Parameter(torch.randn(3))
    assert fused_lm.clip_grad_norm_([p], 1.0).item() == 0.0          # grad None: skipped
    assert fused_lm.clip_grad_norm_([], 1.0).item() == 0.0
    fused_lm.clip_grads_with_norm_([p], 1.0, torch.tensor(3.0))
    fused_lm.clip_grad_value_([p], 1.0)
    with pytest.warns(UserWarning, match="empty generator"):
        fused_lm.clip_grad_norm_((q for q in []), 1.0)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_error_if_nonfinite(backend, device):
    ps = _params(device, [((20,), torch.float32), ((mt.CHUNK + 1,), torch.bfloat16)], none_at=())
    fused_lm.clip_grad_norm_(ps, 1.0, error_if_nonfinite=True, backend=backend)    # finite: fine
    for bad in (float("inf"), float("nan")):
        ps[1].grad[-1] = bad
        with pytest.raises(RuntimeError, match="non-finite"):
            fused_lm.clip_grad_norm_(ps, 1.0, error_if_nonfinite=True, backend=backend)
        with pytest.raises(RuntimeError, match="non-finite"):
            fused_lm.get_total_norm([q.grad for q in ps], error_if_nonfinite=True, backend=backend)
    # Without the flag a NaN norm propagates into the gradients, as in torch.
    norm = fused_lm.clip_grad_norm_(ps, 1.0, backend=backend)
    assert norm.isnan().item() and ps[0].grad.isnan().all().item()


@pytest.mark.parametrize("backend,device", backend_devices())
def test_clip_grad_value_matches_torch(backend, device):
    ps = _params(device)
    for q in ps:
        if q.grad is not None and q.grad.numel() > 3:
            q.grad.view(-1)[1] = float("nan")
            q.grad.view(-1)[2] = float("-inf")
    ps_torch = _clone_params(ps)
    fused_lm.clip_grad_value_(ps, 0.4, backend=backend)
    torch.nn.utils.clip_grad_value_(ps_torch, 0.4)
    for q, q_torch in zip(ps, ps_torch):
        if q.grad is not None:
            same = (q.grad == q_torch.grad) | (q.grad.isnan() & q_torch.grad.isnan())
            assert same.all().item(), f"clip_grad_value_ differs from torch ({q.grad.dtype})"
    # lo > hi (negative clip_value): clamp_min then clamp_max gives -|c| everywhere, as torch.
    ps2 = _params(device, [((33,), torch.float32)], none_at=())
    fused_lm.clip_grad_value_(ps2, -0.5, backend=backend)
    assert (ps2[0].grad == -0.5).all().item()


# --------------------------------------------------------------------------------------------
# Two gloo processes: FSDP2 (DTensor gradients), DDP, and a process group over disjoint slices.

WORLD = 2
IN, HIDDEN = 6, 9


def _model():
    torch.manual_seed(0)
    # Output width 1: FSDP2's Shard(0) leaves rank 1 an EMPTY local shard of that weight.
    return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 5),
                               torch.nn.Tanh(), torch.nn.Linear(5, 1))


def _batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(WORLD * 4, IN, generator=g), torch.randn(WORLD * 4, 1, generator=g)


DIST_NORMS = [2.0, 1.0, math.inf, 3.0]
STEP_HYPER = dict(lr=1e-2, max_grad_norm=0.05)
STEPS_DIST = 2


def _dist_worker(rank, store_dir, backends, out_dir):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    from fused_lm.optim import AdamW

    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=30))
    results = {}
    try:
        x, y = _batch()
        xs, ys = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        for backend in backends:
            # FSDP2: DTensor gradients, norms all-reduced over the mesh.
            model = _model()
            for layer in (model[0], model[2], model[4]):
                fully_shard(layer)
            fully_shard(model)
            torch.nn.functional.mse_loss(model(xs), ys).backward()
            params = list(model.parameters())
            for p in DIST_NORMS:
                results[("fsdp2", backend, p)] = fused_lm.get_total_norm(
                    [q.grad for q in params], p, backend=backend).item()
            norm = fused_lm.clip_grad_norm_(params, 0.05, backend=backend)
            results[("fsdp2-clip", backend)] = (norm.item(), [q.grad.full_tensor() for q in params])
            # DDP: gradients are already averaged, the local norm is global.
            ddp = DDP(_model())
            torch.nn.functional.mse_loss(ddp(xs), ys).backward()
            norm = fused_lm.clip_grad_norm_(ddp.parameters(), 0.05, backend=backend)
            results[("ddp-clip", backend)] = (norm.item(), [q.grad.clone() for q in ddp.parameters()])
            # process_group: each rank holds a disjoint slice of the tensors (ZeRO-style).
            gen = torch.Generator().manual_seed(5)
            full = [torch.randn(n, generator=gen) for n in (7, 300, 1, 20000)]
            mine = full[rank::WORLD]
            for p in DIST_NORMS:
                results[("pg", backend, p)] = fused_lm.get_total_norm(
                    mine, p, process_group=dist.group.WORLD, backend=backend).item()
            if rank == 1:
                mine[0][0] = float("nan")
            results[("pg-nan", backend)] = fused_lm.get_total_norm(
                mine, math.inf, process_group=dist.group.WORLD, backend=backend).item()
            # max_grad_norm in the step: FSDP2 (DTensor gradients) and ZeroRedundancyOptimizer
            # (each rank steps a disjoint slice; the norm is reduced over grad_norm_process_group).
            from torch.distributed.optim import ZeroRedundancyOptimizer

            model = _model()
            for layer in (model[0], model[2], model[4]):
                fully_shard(layer)
            fully_shard(model)
            opt = AdamW(model.parameters(), **STEP_HYPER, backend=backend)
            ddp = DDP(_model())
            zero = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=AdamW, **STEP_HYPER,
                                           backend=backend, grad_norm_process_group=dist.group.WORLD)
            for _ in range(STEPS_DIST):
                for m, o in ((model, opt), (ddp, zero)):
                    torch.nn.functional.mse_loss(m(xs), ys).backward()
                    o.step()
                    o.zero_grad()
            results[("fsdp2-step", backend)] = ([q.full_tensor() for q in model.parameters()],
                                                opt.grad_norm.item())
            results[("zero-step", backend)] = ([q.detach().clone() for q in ddp.parameters()],
                                               zero.optim.grad_norm.item())
    except Exception as exc:  # reported by the parent, with the rank
        import traceback

        results["error"] = f"rank {rank}: {exc}\n{traceback.format_exc()}"
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def dist_results():
    import torch.multiprocessing as mp

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    backends = [b.values[0] for b in backend_devices(("triton", "cpu", "torch"))
                if b.values[1] == "cpu" and not b.marks]
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_dist_worker, args=(tmp, backends, tmp), nprocs=WORLD, join=False,
                                 start_method="spawn")
        deadline = 120.0
        import time

        t0 = time.monotonic()
        while not ctx.join(timeout=5):
            if time.monotonic() - t0 > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail("distributed clip workers timed out")
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    for r in results:
        if "error" in r:
            pytest.fail(r["error"])
    return backends, results


def _single_process_grads():
    model = _model()
    x, y = _batch()
    # FSDP2 and DDP average the per-rank gradients of per-rank mean losses: equal to the gradient
    # of the full-batch mean (equal halves).
    torch.nn.functional.mse_loss(model(x), y).backward()
    return list(model.parameters())


def test_fsdp2_ddp_norms_equal_single_process(dist_results):
    backends, results = dist_results
    for backend in backends:
        for p in DIST_NORMS:
            want = ref.total_norm([q.grad for q in _single_process_grads()], p)
            for r in range(WORLD):
                got = torch.tensor(results[r][("fsdp2", backend, p)])
                assert_close(got, want, torch.float32, scale=norm_tol(p), what=f"fsdp2 {backend} p={p}")
        for mode in ("fsdp2-clip", "ddp-clip"):
            params = _single_process_grads()
            want_norm = torch.nn.utils.clip_grad_norm_(params, 0.05)
            for r in range(WORLD):
                norm, grads = results[r][(mode, backend)]
                assert_close(torch.tensor(norm), want_norm, torch.float32, what=f"{mode} {backend}")
                for g, q in zip(grads, params):
                    assert_close(g, q.grad, torch.float32, scale=10, what=f"{mode} {backend} grads")


def test_process_group_norm_equals_single_process(dist_results):
    backends, results = dist_results
    gen = torch.Generator().manual_seed(5)
    full = [torch.randn(n, generator=gen) for n in (7, 300, 1, 20000)]
    for backend in backends:
        for p in DIST_NORMS:
            want = ref.total_norm(full, p)
            for r in range(WORLD):
                assert_close(torch.tensor(results[r][("pg", backend, p)]), want, torch.float32,
                             scale=norm_tol(p), what=f"pg {backend} p={p}")
        for r in range(WORLD):  # NaN on rank 1 only reaches every rank
            assert math.isnan(results[r][("pg-nan", backend)])


# --------------------------------------------------------------------------------------------
# Phase 2: max_grad_norm folded into the optimizer step.

from fused_lm.optim import AdamW, Lion  # noqa: E402

OPTS = {"adamw": (AdamW, dict(lr=1e-2, weight_decay=0.1)), "lion": (Lion, dict(lr=1e-3, weight_decay=0.1))}
STEP_SPEC = [((3, 5), torch.float32), ((mt.CHUNK + 3,), torch.float32), ((), torch.float32),
             ((17,), torch.bfloat16), ((1,), torch.float32)]


def _step_params(device):
    return [torch.nn.Parameter(randn(*s, dtype=d, device=device)) for s, d in STEP_SPEC]


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("name", list(OPTS))
def test_fused_clip_step_equals_clip_then_step(backend, device, name):
    cls, hyper = OPTS[name]
    pa, pb = _step_params(device), None
    pb = [torch.nn.Parameter(p.detach().clone()) for p in pa]
    fused = cls(pa, **hyper, backend=backend, max_grad_norm=0.5)
    plain = cls(pb, **hyper, backend=backend)
    for it, scale in enumerate((1.0, 1e-4, 3.0)):       # clipped, not clipped (coef 1), clipped
        grads = [randn(*s, dtype=d, device=device, scale=scale) for s, d in STEP_SPEC]
        for p, q, g in zip(pa, pb, grads):
            p.grad, q.grad = g.clone(), g.clone()
        want = fused_lm.clip_grad_norm_(pb, 0.5, backend=backend)
        plain.step()
        fused.step()
        assert_close(fused.grad_norm, want, torch.float32, what=f"grad_norm step {it}")
        for p, g in zip(pa, grads):
            assert torch.equal(p.grad, g), "the fused step must not rewrite gradients"
        for p, q in zip(pa, pb):
            # bf16: clip-then-step rounds the scaled gradient to bf16, the fused step does not.
            assert_close(p, q, p.dtype, scale=2.0, what=f"{name} step {it}")


@pytest.mark.parametrize("backend,device", backend_devices())
def test_fused_clip_nonfinite_norm_skips(backend, device):
    ps = _step_params(device)
    opt = AdamW(ps, lr=1e-2, backend=backend, max_grad_norm=1.0)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    before = [p.detach().clone() for p in ps]
    steps = [opt.state[p]["step"].clone() for p in ps]
    ps[1].grad[5] = float("nan")
    opt.step()
    assert opt.grad_norm.isnan().item()
    for p, b, s in zip(ps, before, steps):
        assert torch.equal(p.detach(), b) and torch.equal(opt.state[p]["step"], s), "step not skipped"
    with pytest.raises(ValueError, match="max_grad_norm"):
        AdamW(ps, max_grad_norm=0.0)
    assert AdamW(ps).grad_norm is None


def _amp_model(device):
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(device)


@pytest.mark.parametrize("backend,device", backend_devices(("triton", "cpu", "cuda", "torch")))
def test_fused_clip_with_grad_scaler_and_accumulation(backend, device):
    """GradScaler (scaled gradients, an injected inf) and two accumulated micro-batches per step:
    max_grad_norm in the step == unscale_, clip_grad_norm_, step."""
    ma, mb = _amp_model(device), _amp_model(device)
    oa = AdamW(ma.parameters(), lr=1e-2, backend=backend, max_grad_norm=0.3)
    ob = AdamW(mb.parameters(), lr=1e-2, backend=backend)
    sa = torch.amp.GradScaler(device, init_scale=2.0 ** 12, growth_interval=2)
    sb = torch.amp.GradScaler(device, init_scale=2.0 ** 12, growth_interval=2)
    gen = torch.Generator().manual_seed(11)
    for step in range(4):
        xs = [torch.randn(5, 8, generator=gen).to(device) for _ in range(2)]
        for model, scaler in ((ma, sa), (mb, sb)):
            for x in xs:                                           # accumulate two micro-batches
                scaler.scale(model(x).pow(2).mean() * 10).backward()
            if step == 2:                                          # an overflow: both skip
                next(model.parameters()).grad[0, 0] = float("inf")
        sb.unscale_(ob)
        want = torch.nn.utils.clip_grad_norm_(mb.parameters(), 0.3)
        sa.step(oa)
        sb.step(ob)
        sa.update()
        sb.update()
        if step != 2:
            assert_close(oa.grad_norm, want, torch.float32, scale=2.0, what=f"grad_norm step {step}")
        assert sa.get_scale() == sb.get_scale()
        for p, q in zip(ma.parameters(), mb.parameters()):
            assert_close(p, q, torch.float32, scale=5.0, what=f"params after step {step}")
        oa.zero_grad()
        ob.zero_grad()


def test_fused_clip_step_fsdp2_and_zero_equal_single_process(dist_results):
    backends, results = dist_results
    x, y = _batch()
    for backend in backends:
        model = _model()
        opt = AdamW(model.parameters(), **STEP_HYPER, backend=backend)
        for _ in range(STEPS_DIST):
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        for mode in ("fsdp2-step", "zero-step"):
            for r in range(WORLD):
                params, norm = results[r][(mode, backend)]
                assert_close(torch.tensor(norm), opt.grad_norm, torch.float32, scale=10,
                             what=f"{mode} {backend} grad_norm")
                for got, want in zip(params, model.parameters()):
                    assert_close(got, want, torch.float32, scale=10, what=f"{mode} {backend} rank {r}")


# --------------------------------------------------------------------------------------------
# GPU: realistic sizes, no host synchronisation.

@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_gpt2_sized_clip(backend, dtype):
    from bench.lists import gpt2_shapes, tiny_shapes

    shapes = gpt2_shapes() + tiny_shapes(2000)
    ps = [torch.nn.Parameter(torch.empty(s, device="cuda", dtype=dtype)) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, device="cuda").to(dtype)
    grads = [p.grad.clone() for p in ps]
    want = torch.nn.utils.get_total_norm([g.float() for g in grads])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        norm = fused_lm.clip_grad_norm_(ps, 1.0, backend=backend)
        inf_norm = fused_lm.get_total_norm(grads, math.inf, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_close(norm, want, torch.float32, scale=10)
    assert inf_norm.item() == max(g.float().abs().max().item() for g in grads if g.numel())
    coef = min(1.0, 1.0 / (want.item() + 1e-6))
    for p, g in zip(ps[:20], grads[:20]):
        assert_close(p.grad, g.double() * coef, dtype)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_fused_clip_step_no_sync(backend):
    from bench.lists import gpt2_shapes

    shapes = gpt2_shapes()[:40]
    pa = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
    pb = [torch.nn.Parameter(p.detach().clone()) for p in pa]
    fused = AdamW(pa, lr=1e-3, backend=backend, max_grad_norm=1.0)
    plain = AdamW(pb, lr=1e-3, backend=backend)
    for step in range(3):
        for p, q in zip(pa, pb):
            p.grad = torch.randn(p.shape, device="cuda")
            q.grad = p.grad.clone()
        want = fused_lm.clip_grad_norm_(pb, 1.0, backend=backend)
        plain.step()
        torch.cuda.synchronize()
        if step > 0:   # after the first step (state creation, table upload)
            torch.cuda.set_sync_debug_mode("error")
        try:
            fused.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert_close(fused.grad_norm, want, torch.float32)
    for p, q in zip(pa, pb):
        assert_close(p, q, torch.float32, scale=2.0)
