"""The cached step plan of the optimizer engine (fused_lm/optim/_plan.py): whatever changes between
steps is picked up (gradients written in place or reallocated, ``p.data`` replaced, a gradient
missing, non-contiguous or of the wrong dtype), with the C++ address check and its Python twin;
and the compiled ops' own checks (they take tables, not tensor lists)."""

from __future__ import annotations

import pytest
import torch

import fused_lm.optim as fo
from fused_lm import _ext
from fused_lm.ops import _multi_tensor as mt
from fused_lm.optim import _plan
from tests._helpers import assert_close, backend_devices
from tests.optim._common import clone_params, make_params, random_grads, set_grads

BACKENDS = backend_devices()
SHAPES = [(5,), (3, 4), (17,), ()]


@pytest.fixture(params=["native", "python"])
def addresses(request, monkeypatch):
    """The address check: fused_lm._C.optim_addresses, or its Python twin (no extension)."""
    if request.param == "python":
        monkeypatch.setattr(_plan, "_native_addresses", False)
    elif not _ext.has_cpu():
        pytest.skip("the CPU extension is not built")
    return request.param


def _edit(ps, grads, s):
    """Step s's change to one copy of the parameters (the same for ours and torch's)."""
    if s in (1, 2):                        # written in place: the addresses do not move
        for p, g in zip(ps, grads):
            p.grad.copy_(g)
        return None
    set_grads(ps, grads)                   # reallocated: every gradient address moves
    if s == 3:                             # a non-contiguous gradient: the torch path
        ps[1].grad = ps[1].grad.t().contiguous().t()
    if s == 4:                             # a parameter without a gradient is skipped
        ps[0].grad = None
    if s == 5:                             # p.data replaced: the new storage is updated
        old = ps[2].data
        ps[2].data = ps[2].data.clone()
        return old
    return None


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("opt", ["adamw", "lion"])
def test_changes_between_steps_are_picked_up(backend, device, opt, addresses):
    ours_p = make_params(SHAPES, device=device)
    ref_p = clone_params(ours_p)
    if opt == "adamw":
        ours = fo.AdamW(ours_p, lr=1e-2, backend=backend)
        theirs = torch.optim.AdamW(ref_p, lr=1e-2, foreach=False)
    else:   # Lion on the torch backend is the reference here (the engine's own torch path)
        ours = fo.Lion(ours_p, lr=1e-2, weight_decay=0.1, backend=backend)
        theirs = fo.Lion(ref_p, lr=1e-2, weight_decay=0.1, backend="torch")
    for s in range(8):
        grads = random_grads(ours_p, s)
        old = _edit(ours_p, grads, s)
        _edit(ref_p, grads, s)
        before = None if old is None else old.clone()
        ours.step()
        theirs.step()
        if old is not None:
            assert torch.equal(old, before), "the replaced p.data was written"
        for a, b in zip(ours_p, ref_p):
            assert_close(a, b, torch.float32, what=f"step {s}")
    assert float(ours.state[ours_p[0]]["step"]) == 7
    assert float(ours.state[ours_p[1]]["step"]) == 8


@pytest.mark.parametrize("backend,device", [b for b in BACKENDS if b.values[0] != "torch"])
def test_moved_addresses_patch_the_table(backend, device, addresses, monkeypatch):
    """Reallocated gradients and a replaced p.data rewrite the table's address columns; the table
    is built (and its lists validated) once per plan."""
    builds = []
    real = mt.build_table
    monkeypatch.setattr(mt, "build_table", lambda *a, **k: (builds.append(1), real(*a, **k))[1])
    ours_p = make_params(SHAPES, device=device)
    ref_p = clone_params(ours_p)
    ours = fo.AdamW(ours_p, lr=1e-2, backend=backend)
    theirs = torch.optim.AdamW(ref_p, lr=1e-2, foreach=False)
    for s in range(4):
        grads = random_grads(ours_p, s)
        for ps in (ours_p, ref_p):
            set_grads(ps, grads)
            if s == 2:
                ps[1].data = ps[1].data.clone()
        ours.step()
        theirs.step()
    for a, b in zip(ours_p, ref_p):
        assert_close(a, b, torch.float32)
    assert len(builds) == 1


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bad_gradient_after_cached_steps_raises_before_any_change(backend, device, addresses):
    p = make_params([(4,), (6,)], device=device)
    opt = fo.AdamW(p, backend=backend)
    for s in range(2):
        set_grads(p, random_grads(p, s))
        opt.step()
    state = [{k: v.clone() for k, v in opt.state[q].items()} for q in p]
    before = [q.detach().clone() for q in p]
    p[1].data = p[1].data.double()         # torch refuses a grad of another dtype; .data not
    with pytest.raises(TypeError, match="gradient dtype"):
        opt.step()
    p[1].data = before[1].clone()
    p[1].grad = torch.randn(6, device=device).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    for q, b, st in zip(p, before, state):
        assert torch.equal(q, b)
        assert all(torch.equal(opt.state[q][k], v) for k, v in st.items())


def test_addresses_native_matches_python():
    if not _ext.has_cpu():
        pytest.skip("the CPU extension is not built")
    native = _ext.cpu_ext().optim_addresses
    p = make_params([(3,), (2, 5), ()])
    set_grads(p, random_grads(p, 0))
    want = _plan.addresses_py(p, [q.grad for q in p], True)
    assert want.shape == (3, 3) and torch.equal(native(p, True), want)
    assert want[2].tolist() == [3, 10, 1] and want[0, 1] == p[1].data_ptr()
    assert native([], True).shape == (3, 0)
    p[1].grad = p[1].grad.t().contiguous().t()        # non-contiguous: fine for the torch path
    assert native(p, True) is None and _plan.addresses_py(p, [q.grad for q in p], True) is None
    assert torch.equal(native(p, False), _plan.addresses_py(p, [q.grad for q in p], False))
    for bad in (None, torch.randn(2, 5).to_sparse()):
        p[1].grad = bad
        assert native(p, False) is None
        assert _plan.addresses_py(p, [q.grad for q in p], False) is None
    p[1].grad = torch.randn(2, 5)
    p[1].data = p[1].data.double()                     # the grad's dtype now differs
    assert native(p, False) is None
    assert _plan.addresses_py(p, [q.grad for q in p], False) is None
    p[1].data = p[1].data.float()
    assert native(p, False) is not None
    q = make_params([(3,)], torch.bfloat16)
    q[0].grad = torch.randn(3).bfloat16()
    assert native(p + q, False) is None                # one dtype per bucket


def test_compiled_ops_check_their_tables():
    if not _ext.has_cpu():
        pytest.skip("the CPU extension is not built")
    _ext.cpu_ext()
    p = make_params([(5,)])
    set_grads(p, random_grads(p, 0))
    m, v = torch.zeros(5), torch.zeros(5)
    step = torch.zeros(())
    table = mt.build_table([p, [p[0].grad], [m], [v]])
    steps = torch.tensor([step.data_ptr()])
    hp = torch.tensor([[1e-2, 0.9, 0.999, 1e-8, 0.0, 1.0, 0.0, 0.0]])
    one, zero = torch.ones(()), torch.zeros(())
    op = torch.ops.fused_lm.multi_tensor_adamw_

    def call(n_lists=4, pdt=torch.float32, sdt=torch.float32, amsgrad=False, steps=steps, hp=hp):
        op(table.table, table.chunks, table.chunk_size, steps, hp, one, zero, n_lists, pdt, sdt,
           amsgrad, False, False, 0, 0)

    with pytest.raises(RuntimeError, match="n_lists"):
        call(n_lists=5)
    with pytest.raises(RuntimeError, match="n_lists"):
        call(amsgrad=True)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        call(pdt=torch.float64)
    with pytest.raises(RuntimeError, match="step_table"):
        call(steps=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="hp"):
        call(hp=hp[:, :6].contiguous())
    with pytest.raises(RuntimeError, match="no kernel"):
        call(pdt=torch.float32, sdt=torch.float16)
    assert float(step) == 0 and torch.equal(m, torch.zeros(5))
    call()
    assert float(step) == 1 and not torch.equal(m, torch.zeros(5))
    with pytest.raises(RuntimeError, match="n_lists"):
        torch.ops.fused_lm.multi_tensor_lion_(table.table, table.chunks, table.chunk_size, steps,
                                              hp, one, zero, 4, torch.float32, torch.float32,
                                              False, False, 0, 0)
