"""Drop-in conformance of fused_lm.optim.AdamW (and Lion where it applies) with torch.optim.AdamW,
modelled on torch's own optimizer test matrix (``TestOptimRenewed`` over the ``OptimizerInfo`` of
AdamW in torch/testing/_internal/common_optimizers.py): constructor keywords and their errors,
param-group keys and defaults, state_dict round trips both ways and with older checkpoints,
hooks, deepcopy and pickling, tensor learning rates, complex parameters, mixed buckets, master
weights, zero_grad / closures / no-grad steps, repr. Issue 12, items 1-7."""

from __future__ import annotations

import copy
import io
import itertools
import pickle

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import fused_lm.optim as fo
from tests._helpers import assert_close, backend_devices
from tests.optim._common import clone_params, make_params, random_grads, set_grads, three_groups

BACKENDS = backend_devices()
# ... and the default choice (backend=None: per device and dtype, float64 on the PyTorch path).
WITH_DEFAULT = BACKENDS + [pytest.param(None, "cpu", id="default-cpu")]


def _sd_roundtrip(sd, weights_only=True):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=weights_only)


def _equal(a, b) -> bool:
    """Structural equality of state dicts / param groups: tensors by value, dtype and shape."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu()))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return (type(a) is type(b) and len(a) == len(b)
                and all(_equal(x, y) for x, y in zip(a, b)))
    return type(a) is type(b) and a == b


def _grads(params, step):
    """random_grads, with both parts of complex gradients random."""
    real = [torch.view_as_real(p.detach()) if p.is_complex() else p for p in params]
    return [torch.view_as_complex(g.contiguous()) if p.is_complex() else g
            for p, g in zip(params, random_grads(real, step))]


def _as_real(t):
    return torch.view_as_real(t.detach()) if t.is_complex() else t


def _step_both(pairs, s):
    """One step of several (params, optimizer) pairs on the same fresh gradients."""
    grads = _grads(pairs[0][0], s)
    for ps, opt in pairs:
        set_grads(ps, grads)
        opt.step()


# -- 1. torch's constructor keywords ----------------------------------------------------------

CONFIGS = [
    {},
    dict(lr=0.01),
    dict(weight_decay=0.1, maximize=True),
    dict(weight_decay=0.1, amsgrad=True),
    dict(fused=True),
    dict(foreach=False),
    dict(foreach=True),
    dict(capturable=True, amsgrad=True),
    dict(differentiable=False, fused=False, foreach=None),
]


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_defaults_and_param_groups_match_torch(kw):
    """The same defaults and param-group keys (in torch's order) and values as torch's AdamW,
    whatever torch keywords were passed; repr is torch's."""
    p = make_params([(3,), (4,)])
    ours = fo.AdamW([{"params": p[:1]}, {"params": p[1:], "lr": 0.5}], **kw)
    theirs = torch.optim.AdamW([{"params": p[:1]}, {"params": p[1:], "lr": 0.5}], **kw)
    assert list(ours.defaults.items()) == list(theirs.defaults.items())
    for a, b in zip(ours.param_groups, theirs.param_groups):
        assert list(a.keys()) == list(b.keys())
        assert _equal({k: v for k, v in a.items() if k != "params"},
                      {k: v for k, v in b.items() if k != "params"})
    assert repr(ours) == repr(theirs)


def _outcome(make):
    try:
        make()
    except Exception as exc:      # noqa: BLE001 - the outcome is compared with torch's
        return type(exc), str(exc)
    return None


FLAG_MATRIX = list(itertools.product((None, False, True), (None, False, True), (False, True),
                                     ("float", "tensor"), ("floats", "tensors", "mixed")))


@pytest.mark.parametrize("foreach,fused,capturable,lr,betas", FLAG_MATRIX)
def test_constructor_errors_match_torch(foreach, fused, capturable, lr, betas):
    """Every combination of torch's flags with float/tensor lr and betas: ours raises exactly
    when torch's constructor raises, with the same error type and message."""
    lr_v = torch.tensor(1e-3) if lr == "tensor" else 1e-3
    b_v = {"floats": (0.9, 0.999), "tensors": (torch.tensor([0.9]), torch.tensor([[0.999]])),
           "mixed": (0.9, torch.tensor(0.999))}[betas]
    kw = dict(lr=lr_v, betas=b_v, foreach=foreach, fused=fused, capturable=capturable)
    theirs = _outcome(lambda: torch.optim.AdamW(make_params([(3,)]), **kw))
    ours = _outcome(lambda: fo.AdamW(make_params([(3,)]), **kw))
    assert ours == theirs


@pytest.mark.parametrize("where", ["constructor", "group", "fused"])
@pytest.mark.parametrize("cls", [fo.AdamW, fo.Lion])
def test_differentiable_true_raises(cls, where):
    p = make_params([(3,)])
    with pytest.raises(RuntimeError, match="`fused` does not support `differentiable`.*"
                                           "differentiable=True is not supported"):
        if where == "constructor":
            cls(p, differentiable=True)
        elif where == "fused":
            cls(p, differentiable=True, fused=True)
        else:
            cls([{"params": p, "differentiable": True}])
    opt = cls(p)
    with pytest.raises(RuntimeError, match="differentiable"):
        opt.add_param_group({"params": make_params([(2,)]), "differentiable": True})
    assert len(opt.param_groups) == 1


def test_lion_accepts_torch_and_lion_pytorch_keywords():
    """lion-pytorch's positional signature (params, lr, betas, weight_decay, use_triton,
    decoupled_weight_decay) and torch's keywords; the keywords are kept in the param groups."""
    p = make_params([(5,)])
    opt = fo.Lion(p, 1e-4, (0.9, 0.99), 0.1, True, False, fused=True, foreach=None,
                  capturable=True)
    g = opt.param_groups[0]
    assert (g["fused"], g["foreach"], g["capturable"], g["differentiable"]) == (True, None, True, False)
    assert g["decoupled_weight_decay"] is False and "use_triton" not in g
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together"):
        fo.Lion(p, fused=True, foreach=True)
    with pytest.raises(ValueError, match="lr as a Tensor is not supported"):
        fo.Lion(p, lr=torch.tensor(1e-4), foreach=True)
    with pytest.raises(ValueError, match="divides the weight decay by lr, which must then be positive"):
        fo.Lion(p, lr=0.0, decoupled_weight_decay=True)
    with pytest.raises(ValueError, match="decoupled_weight_decay=True in a param group"):
        fo.Lion([{"params": p, "decoupled_weight_decay": True}])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_lion_decoupled_weight_decay(backend, device):
    """lion-pytorch's decoupled_weight_decay=True: the decay is weight_decay / lr_0 (the
    constructor's lr), i.e. the same run as weight_decay / lr_0 without the flag, also after the
    lr changes."""
    p0 = make_params([(33,), (4, 5)], device=device)
    runs = []
    for decoupled in (True, False):
        ps = clone_params(p0)
        wd = 0.5 if decoupled else 0.5 / 2e-3
        opt = fo.Lion(ps, lr=2e-3, weight_decay=wd, decoupled_weight_decay=decoupled,
                      backend=backend)
        for s in range(4):
            if s == 2:
                opt.param_groups[0]["lr"] = 1e-3
            set_grads(ps, random_grads(ps, s))
            opt.step()
        runs.append(ps)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# -- 2. state_dict round trips ----------------------------------------------------------------

@pytest.mark.parametrize("cls,kw", [
    (fo.AdamW, {}), (fo.AdamW, dict(fused=True, amsgrad=True)),
    (fo.AdamW, dict(stochastic_rounding=True, master_weights=True)),
    (fo.AdamW, dict(lr=torch.tensor(0.01), betas=(torch.tensor(0.8), torch.tensor(0.9)))),
    (fo.Lion, {}), (fo.Lion, dict(foreach=False, decoupled_weight_decay=True, weight_decay=0.1)),
])
def test_round_trip_is_exact(cls, kw):
    """b.load_state_dict(a.state_dict()): b's state_dict equals a's (no key added or lost), also
    through torch.save / torch.load(weights_only=True), and a reload of b's own equals it too."""
    p = make_params([(7,), (3, 4)], torch.bfloat16 if kw.get("master_weights") else torch.float32)
    a = cls(three_groups(p), **copy.deepcopy(kw))
    set_grads(p, random_grads(p, 0))
    a.step()
    q = clone_params(p)
    b = cls(three_groups(q), **copy.deepcopy(kw))
    sd = a.state_dict()
    b.load_state_dict(_sd_roundtrip(sd))
    assert _equal(b.state_dict(), sd)
    b.load_state_dict(b.state_dict())
    assert _equal(b.state_dict(), sd)
    assert [set(g) for g in b.param_groups] == [set(g) for g in a.param_groups]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_checkpoints_both_ways_exact(backend, device):
    """torch AdamW -> ours -> torch AdamW: every state_dict along the way equals the first, and
    all three continue identically (to float32 rounding) on the same gradients."""
    p0 = make_params([(13,), (6, 7), ()], device=device)
    kw = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
    pa = clone_params(p0)
    a = torch.optim.AdamW(three_groups(pa), foreach=False, **kw)
    for s in range(3):
        set_grads(pa, random_grads(pa, s))
        a.step()
    sd = copy.deepcopy(a.state_dict())
    pb = clone_params(pa)
    b = fo.AdamW(three_groups(pb), backend=backend, **kw)
    b.load_state_dict(_sd_roundtrip(sd))
    assert _equal(b.state_dict()["param_groups"], sd["param_groups"])
    for i, st in sd["state"].items():
        assert _equal(b.state_dict()["state"][i], st)
    pc = clone_params(pa)
    c = torch.optim.AdamW(three_groups(pc), foreach=False, **kw)
    c.load_state_dict(_sd_roundtrip(b.state_dict()))
    assert _equal(c.state_dict(), sd)
    for s in range(3, 6):
        _step_both([(pa, a), (pb, b), (pc, c)], s)
    for x, y, z in zip(pa, pb, pc):
        assert_close(y, x, torch.float32)
        assert torch.equal(x, z)


@pytest.mark.parametrize("cls", [fo.AdamW, fo.Lion])
def test_older_checkpoints_load_and_step(cls):
    """torch's BC checks: a checkpoint without the newer flags (foreach, fused, differentiable,
    maximize, capturable, decoupled_weight_decay) loads, the flags come back as the defaults,
    and the optimizer steps; a plain-number ``step`` loads as a float32 0-d tensor."""
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2))
    opt = cls(model.parameters())
    x = torch.rand(1, 4, 16, 16)
    for _ in range(3):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    for g in sd["param_groups"]:
        for flag in ("foreach", "fused", "differentiable", "maximize", "capturable",
                     "decoupled_weight_decay"):
            g.pop(flag, None)
    for st in sd["state"].values():
        st["step"] = st["step"].item()
    opt.load_state_dict(sd)
    for g in opt.param_groups:
        assert _equal({k: g[k] for k in opt.defaults}, opt.defaults)
    step = opt.state[next(model.parameters())]["step"]
    assert step.dtype == torch.float32 and step.dim() == 0 and float(step) == 3
    model(x).sum().backward()
    opt.step()
    assert float(opt.state[next(model.parameters())]["step"]) == 4


def test_adam_checkpoint_becomes_adamw():
    """As torch's AdamW: a torch.optim.Adam checkpoint (decoupled_weight_decay=False) loads
    with decoupled_weight_decay=True."""
    p = make_params([(5,)])
    adam = torch.optim.Adam(p, weight_decay=0.1)
    set_grads(p, random_grads(p, 0))
    adam.step()
    ours = fo.AdamW(clone_params(p))
    ours.load_state_dict(adam.state_dict())
    assert ours.param_groups[0]["decoupled_weight_decay"] is True
    theirs = torch.optim.AdamW(clone_params(p))
    theirs.load_state_dict(adam.state_dict())
    assert _equal(ours.state_dict(), theirs.state_dict())


@pytest.mark.parametrize("named0,named1", list(itertools.product((False, True), repeat=2)))
def test_state_dict_deterministic_and_named(named0, named1):
    """torch's test_state_dict_deterministic and test_can_load_from_to_named_state_dict: a copy
    loaded from the original runs identically and saves an equal state dict; param_names are
    kept when either side has them; repeated parameters pack to the same ids."""
    w = torch.nn.Parameter(torch.randn(2, 3))
    b = torch.nn.Parameter(torch.randn(2))
    x = torch.randn(3)

    def params(ps, named):
        return [(f"name{i}", p) for i, p in enumerate(ps)] if named else ps

    def closure(opt, w, b):
        opt.zero_grad()
        loss = (w.mv(x) + b).pow(2).sum()
        loss.backward()
        return loss

    opt = fo.AdamW(params([w, b], named0), amsgrad=True)
    for _ in range(5):
        opt.step(lambda: closure(opt, w, b))
    wc, bc = (torch.nn.Parameter(t.detach().clone()) for t in (w, b))
    opt_c = fo.AdamW(params([wc, bc], named1), amsgrad=True)
    opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(5):
        opt.step(lambda: closure(opt, w, b))
        opt_c.step(lambda: closure(opt_c, wc, bc))
        assert torch.equal(w, wc) and torch.equal(b, bc)
    strip = lambda sd: {"state": sd["state"], "param_groups": [
        {k: v for k, v in g.items() if k != "param_names"} for g in sd["param_groups"]]}
    assert _equal(strip(opt.state_dict()), strip(opt_c.state_dict()))
    if named0 or named1:
        assert opt_c.state_dict()["param_groups"][0]["param_names"] == ["name0", "name1"]
    opt_c.param_groups.extend(opt_c.param_groups)
    assert _equal(strip(opt.state_dict())["param_groups"][-1],
                  strip(opt_c.state_dict())["param_groups"][-1])


def test_state_dict_ids_match_torch_with_repeated_params():
    a, b, c = make_params([(2,), (3,), (4,)])
    groups = lambda: [{"params": [a, b]}, {"params": [c]}]
    ours, theirs = fo.AdamW(groups()), torch.optim.AdamW(groups())
    for opt in (ours, theirs):
        opt.param_groups.append(dict(opt.param_groups[0]))
        opt.param_groups[-1]["params"] = [b, a, b]
    assert ([g["params"] for g in ours.state_dict()["param_groups"]]
            == [g["params"] for g in theirs.state_dict()["param_groups"]])


def test_malformed_checkpoint_raises_before_any_change():
    p = make_params([(4,), (6,)])
    opt = fo.AdamW(p, lr=1e-2)
    set_grads(p, random_grads(p, 0))
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(before)
    bad["state"][1]["exp_avg"] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"state\[1\]\['exp_avg'\].*expected the parameter's shape \(6,\)"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(before)
    bad["param_groups"][0]["lr"] = -1.0
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(before)
    bad["param_groups"][0]["params"].append(7)
    with pytest.raises(ValueError, match="doesn't match the size"):
        opt.load_state_dict(bad)
    assert _equal(opt.state_dict(), before)


# -- 3. deepcopy and pickle ---------------------------------------------------------------------

class _Handle:
    """Stands for a process group: deepcopy must share it, not copy it."""


def _menu_opt(cls, params, backend, pg=None):
    return cls(three_groups(params), backend=backend, max_grad_norm=0.5, master_weights=True,
               state_dtype=torch.bfloat16 if cls is fo.Lion else None, stochastic_rounding=True,
               grad_norm_process_group=pg)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("cls", [fo.AdamW, fo.Lion])
def test_copies_keep_every_option(cls, how):
    p = make_params([(5,), (3, 2)], torch.bfloat16)
    pg = _Handle()
    opt = _menu_opt(cls, p, "torch", pg)
    opt._seed = 987654321
    new = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    for name in type(opt)._OPTIONS:
        if name == "grad_norm_process_group":     # deepcopy shares the handle, pickle copies it
            assert (new.grad_norm_process_group is pg if how == "deepcopy"
                    else type(new.grad_norm_process_group) is _Handle)
        else:
            assert getattr(new, name) == getattr(opt, name), name
    assert new.max_grad_norm == 0.5 and new._seed == 987654321 and new.master_weights
    if cls is fo.Lion:
        lion = fo.Lion(p, lr=1e-3, decoupled_weight_decay=True)
        assert copy.deepcopy(lion)._init_lr == pickle.loads(pickle.dumps(lion))._init_lr == 1e-3
    public = lambda o: {k for k in o.__dict__ if not k.startswith("_")}
    assert public(new) == public(opt)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("cls", [fo.AdamW, fo.Lion])
def test_copy_continues_bit_identically(backend, device, how, cls):
    """(params, optimizer) copied after 2 steps continue exactly like the original for 3 more
    steps, with clipping, master weights, stochastic rounding (its seed) and state dtype."""
    p = make_params([(7,), (3, 5, 7), (300,)], torch.bfloat16, device)
    opt = _menu_opt(cls, p, backend)
    for s in range(2):
        set_grads(p, random_grads(p, s, scale=3.0))
        opt.step()
    q, opt_c = copy.deepcopy((p, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((p, opt)))
    assert opt_c.param_groups[0]["params"][0] is q[0]
    for s in range(2, 5):
        grads = random_grads(p, s, scale=3.0)
        for ps, o in ((p, opt), (q, opt_c)):
            set_grads(ps, grads)
            o.step()
        assert torch.equal(opt.grad_norm, opt_c.grad_norm)
    for a, b in zip(p, q):
        assert torch.equal(a, b)
        assert opt.state[a].keys() == opt_c.state[b].keys()
        for k, v in opt.state[a].items():
            assert torch.equal(v, opt_c.state[b][k]) and v.dtype == opt_c.state[b][k].dtype, k


# -- 4. hooks -------------------------------------------------------------------------------

def _record_load_hooks(opt, log):
    def pre(o, sd):
        log.append(("pre", len(sd["state"]), sd["param_groups"][0]["lr"]))
        sd["param_groups"][0]["lr"] = 0.002       # an edit in place is loaded

    def pre_returning(o, sd):
        log.append(("pre2", sd["param_groups"][0]["lr"]))
        new = copy.deepcopy(sd)
        new["param_groups"][0]["lr"] = 0.003      # a returned dict replaces the incoming one
        return new

    def post(o):
        log.append(("post", len(o.state), o.param_groups[0]["lr"],
                    sorted(k for st in o.state.values() for k in st)))

    opt.register_load_state_dict_pre_hook(pre)
    opt.register_load_state_dict_pre_hook(pre_returning)
    opt.register_load_state_dict_post_hook(post)
    opt.register_load_state_dict_pre_hook(lambda o, sd: log.append(("first",)), prepend=True)


def test_load_state_dict_hooks_like_torch():
    """Pre-hooks see the incoming state, their edits and returned dicts are used, prepend
    orders them; post-hooks see the restored state: the same log as torch's AdamW."""
    logs = []
    for cls in (torch.optim.AdamW, fo.AdamW):
        p = make_params([(3,), (2,)])
        src = cls(p, lr=0.01)
        set_grads(p, random_grads(p, 0))
        src.step()
        dst = cls(clone_params(p), lr=0.01)
        log = []
        _record_load_hooks(dst, log)
        dst.load_state_dict(src.state_dict())
        assert dst.param_groups[0]["lr"] == 0.003
        assert float(dst.state[dst.param_groups[0]["params"][0]]["step"]) == 1
        logs.append(log)
    assert logs[0] == logs[1]
    assert logs[1][1] == ("pre", 2, 0.01)


def test_state_dict_hooks_like_torch():
    """torch's test_state_dict_pre_hook / post_hook / pre_post_hook."""
    def pre(o):
        o.state["test"] = 1

    def post(o, sd):
        sd["ran_pre"] = "test" in sd["state"]
        sd["state"].pop("test", None)
        return sd

    for cls in (torch.optim.AdamW, fo.AdamW, fo.Lion):
        opt = cls([torch.rand(2, 3, requires_grad=True)])
        h = opt.register_state_dict_pre_hook(pre)
        assert opt.state_dict()["state"]["test"] == 1
        opt.register_state_dict_post_hook(post)
        sd = opt.state_dict()
        assert sd["ran_pre"] and "test" not in sd["state"]
        h.remove()
        del opt.state["test"]
        assert opt.state_dict()["ran_pre"] is False
        opt.register_state_dict_pre_hook(lambda o: o.state.__setitem__("x", 2), prepend=True)
        assert opt.state_dict()["state"]["x"] == 2


@pytest.mark.parametrize("cls", [fo.AdamW, fo.Lion])
def test_step_hooks_run_in_torch_order(cls):
    data = []
    params = [torch.tensor([1.0, 1.0])]
    opt = cls(params)
    handles = [register_optimizer_step_pre_hook(lambda *a: data.append(0)),
               register_optimizer_step_post_hook(lambda *a: data.append(5)),
               opt.register_step_pre_hook(lambda *a: data.append(1)),
               opt.register_step_post_hook(lambda *a: data.append(2))]
    try:
        opt.step()
        opt.step()
    finally:
        for h in handles:
            h.remove()
    opt.step()
    assert data == [0, 1, 2, 5, 0, 1, 2, 5]


def test_step_pre_hook_may_replace_arguments():
    p = make_params([(3,)])
    opt = fo.AdamW(p)
    opt.register_step_pre_hook(lambda o, args, kwargs: (args, {"closure": lambda: 42.0}))
    set_grads(p, random_grads(p, 0))
    assert opt.step() == 42.0


# -- 5. tensor learning rates ---------------------------------------------------------------------

LRS = {"float": lambda: 1e-2, "0-d": lambda: torch.tensor(1e-2), "[1]": lambda: torch.tensor([1e-2]),
       "[[1]]": lambda: torch.tensor([[1e-2]]), "float64": lambda: torch.tensor([1e-2], dtype=torch.float64)}


def _mixed_params(device, kinds):
    """Parameters of each kind: the kernel path (float32, bf16) and the PyTorch path (float64,
    non-contiguous, complex: AdamW only)."""
    out = []
    for i, kind in enumerate(kinds):
        gen = torch.Generator().manual_seed(50 + i)
        if kind == "f32":
            t = torch.randn(9, generator=gen)
        elif kind == "bf16":
            t = torch.randn(5, 3, generator=gen).bfloat16()
        elif kind == "f64":
            t = torch.randn(7, generator=gen, dtype=torch.float64)
        elif kind == "strided":
            t = torch.randn(4, 6, generator=gen).t()          # nn.Parameter(w.t())
        else:
            t = torch.randn(3, 2, generator=gen, dtype=torch.complex64)
        out.append(torch.nn.Parameter(t.to(device)))
    return out


def _kinds(backend, kinds):
    """float64 runs on the PyTorch path only when the backend is chosen per dtype (None); an
    explicit kernel backend refuses it, so bf16 takes its place there."""
    return [("bf16" if backend not in (None, "torch") and k == "f64" else k) for k in kinds]


def _check_against_torch(ours_p, opt_ours, torch_p, opt_torch, steps, shared_lr=None):
    for s in range(steps):
        grads = _grads(ours_p, s)
        set_grads(ours_p, grads)
        set_grads(torch_p, grads)
        opt_ours.step()
        opt_torch.step()
        if shared_lr is not None:      # a scheduler-like in-place change of a tensor lr
            shared_lr.mul_(0.9)
    for a, b in zip(ours_p, torch_p):
        if a.dtype == torch.bfloat16:
            assert_close(a, b, torch.bfloat16)
        else:
            assert_close(_as_real(a), _as_real(b), a.dtype.to_real(),
                         scale=5 if a.dtype != torch.float64 else 1e5)


@pytest.mark.parametrize("backend,device", WITH_DEFAULT)
@pytest.mark.parametrize("lr", list(LRS))
def test_tensor_lr_any_shape_every_path(backend, device, lr):
    """lr as a float, or a one-element tensor of any shape (and float64), on the kernel path and
    the PyTorch path (float64 and non-contiguous parameters) alike, matches torch's AdamW with
    the same lr; an in-place change of the tensor between steps is seen."""
    ours_p = _mixed_params(device, _kinds(backend, ["f32", "f64", "strided", "complex"]))
    torch_p = clone_params(ours_p)
    lr_ours, lr_torch = LRS[lr](), LRS[lr]()
    ours = fo.AdamW(ours_p, lr=lr_ours, backend=backend)
    theirs = torch.optim.AdamW(torch_p, lr=lr_torch, foreach=False)
    assert ours.param_groups[0]["lr"] is lr_ours     # kept as given, like torch
    for s in range(3):
        _check_against_torch(ours_p, ours, torch_p, theirs, 1)
        if isinstance(lr_ours, torch.Tensor):
            lr_ours.mul_(0.5)
            lr_torch.mul_(0.5)


@pytest.mark.parametrize("backend,device", WITH_DEFAULT)
def test_tensor_lr_lion_every_path(backend, device):
    ours_p = _mixed_params(device, _kinds(backend, ["f32", "f64", "strided"]))
    ref_p = clone_params(ours_p)
    ours = fo.Lion(ours_p, lr=torch.tensor([[1e-2]]), backend=backend)
    ref = fo.Lion(ref_p, lr=1e-2, backend="torch")
    for s in range(3):
        _step_both([(ours_p, ours), (ref_p, ref)], s)
    for a, b in zip(ours_p, ref_p):
        assert_close(a, b, a.dtype, scale=5 if a.dtype != torch.float64 else 1e5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_tensor_lr_and_betas_with_capturable_and_fused(backend, device):
    """torch's capturable configs: tensor lr and tensor betas of any one-element shape (with
    capturable=True, and with fused=True as torch allows) match torch's for-loop AdamW."""
    for kw in (dict(capturable=True, amsgrad=True), dict(fused=True)):
        ours_p = make_params([(9,), (3, 4)], device=device)
        torch_p = clone_params(ours_p)
        mk = lambda: dict(lr=torch.tensor(1e-2), betas=(torch.tensor([[[0.9]]]), torch.tensor([[0.99]])))
        ours = fo.AdamW(ours_p, backend=backend, **mk(), **kw)
        theirs = torch.optim.AdamW(torch_p, foreach=False, **mk(), amsgrad=kw.get("amsgrad", False))
        assert ours.param_groups[0]["betas"][0].dim() == 0       # squeezed, as torch does
        _check_against_torch(ours_p, ours, torch_p, theirs, 3)


# -- 6. mixed buckets --------------------------------------------------------------------------

MIX = ["f32", "f64", "strided", "complex"]


@pytest.mark.parametrize("backend,device", WITH_DEFAULT)
@pytest.mark.parametrize("order", list(itertools.permutations(MIX)), ids="-".join)
def test_mixed_buckets_any_order(backend, device, order):
    """Every order of kernel-path and PyTorch-path parameters in one group: matches torch."""
    ours_p = _mixed_params(device, _kinds(backend, order))
    torch_p = clone_params(ours_p)
    ours = fo.AdamW(ours_p, lr=1e-2, weight_decay=0.1, backend=backend)
    theirs = torch.optim.AdamW(torch_p, lr=1e-2, weight_decay=0.1, foreach=False)
    _check_against_torch(ours_p, ours, torch_p, theirs, 2)


@pytest.mark.parametrize("backend,device", WITH_DEFAULT)
@pytest.mark.parametrize("cls", [fo.AdamW, fo.Lion])
def test_mixed_buckets_across_groups_and_dtypes(backend, device, cls):
    """A PyTorch-path group before and after kernel-path groups, bf16 beside float32, with
    tensor lrs: every parameter gets its own group's update (vs the engine's PyTorch path)."""
    ours_p = _mixed_params(device, _kinds(backend, ["strided", "f32", "bf16", "f64", "f32",
                                                    "strided"]))
    ref_p = clone_params(ours_p)
    groups = lambda ps: [dict(params=ps[:2], lr=torch.tensor([3e-2]), weight_decay=0.2),
                         dict(params=ps[2:4], lr=1e-2), dict(params=ps[4:], lr=2e-3)]
    ours = cls(groups(ours_p), backend=backend)
    ref = cls(groups(ref_p), backend="torch")
    for s in range(3):
        _step_both([(ours_p, ours), (ref_p, ref)], s)
    for a, b in zip(ours_p, ref_p):
        assert_close(a, b, a.dtype, scale=5 if a.dtype != torch.float64 else 1e5)


# -- 7. master weights: float32 moments ---------------------------------------------------------

@pytest.mark.parametrize("backend,device", BACKENDS)
def test_master_weights_moments_float32_and_tracks_fp32_run(backend, device):
    """master_weights=True with state_dtype=None keeps float32 moments, so bf16 training follows
    the float32 run: after 40 steps > 99.9% of the bf16 parameters equal the float32 run's
    parameters rounded to bf16 (bf16 moments: about 98%)."""
    steps = 12 if backend == "triton" else 40
    shapes = [(129,), (3, 5, 7), (600,)]
    p32 = make_params(shapes, device=device)
    p16 = clone_params(p32, torch.bfloat16)
    q32 = [p.detach().float().requires_grad_(True) for p in p16]
    ours = fo.AdamW(p16, backend=backend, master_weights=True)
    theirs = torch.optim.AdamW(q32, foreach=False)
    for s in range(steps):
        grads = random_grads(p16, s, torch.bfloat16)
        set_grads(p16, grads)
        set_grads(q32, [g.float() for g in grads])
        ours.step()
        theirs.step()
    equal = sum(int((a == b.to(torch.bfloat16)).sum()) for a, b in zip(p16, q32))
    assert equal / sum(p.numel() for p in p16) > 0.999
    for a in p16:
        assert {k: v.dtype for k, v in ours.state[a].items()} == {
            "step": torch.float32, "exp_avg": torch.float32, "exp_avg_sq": torch.float32,
            "master_param": torch.float32}


@pytest.mark.parametrize("cls", [fo.AdamW, fo.Lion])
def test_master_weights_state_dtypes_and_reload(cls):
    """state_dtype=None with master weights: float32 moments; state_dtype=torch.bfloat16: bf16;
    float32 params are unaffected; a checkpoint reloads with the same dtypes, into an optimizer
    with or without master weights."""
    moments = cls._MOMENTS
    for sd_arg, want in ((None, torch.float32), (torch.bfloat16, torch.bfloat16),
                         (torch.float32, torch.float32)):
        p = make_params([(6,), (2, 3)], torch.bfloat16) + make_params([(4,)])
        opt = cls(p, master_weights=True, state_dtype=sd_arg)
        set_grads(p, random_grads(p, 0))
        opt.step()
        for k in moments:
            assert opt.state[p[0]][k].dtype == want
            assert opt.state[p[2]][k].dtype == (sd_arg or torch.float32)
        assert "master_param" not in opt.state[p[2]]
        sd = _sd_roundtrip(opt.state_dict())
        for master in (True, False):
            q = clone_params(p)
            opt2 = cls(q, master_weights=master, state_dtype=sd_arg)
            opt2.load_state_dict(sd)
            for k in moments:
                assert opt2.state[q[0]][k].dtype == want, (sd_arg, master, k)
            assert opt2.state[q[0]]["master_param"].dtype == torch.float32


# -- torch's matrix: complex, zero_grad, closures, no-op steps, errors ----------------------------

@pytest.mark.parametrize("backend,device", BACKENDS)
def test_complex_params_match_view_as_real_and_torch(backend, device):
    """torch's test_complex: complex parameters (beside a real one) step exactly like their
    view_as_real twins, and like torch's AdamW on the same complex parameters; complex moments."""
    for kw in (dict(), dict(amsgrad=True, weight_decay=0.1, maximize=True)):
        cplx = [torch.randn(10, 5, dtype=torch.complex64, device=device, requires_grad=True),
                torch.randn(10, dtype=torch.complex64, device=device, requires_grad=True),
                torch.randn(10, 5, device=device, requires_grad=True)]
        real = [torch.view_as_real(p).detach().clone().requires_grad_() if p.is_complex()
                else p.detach().clone().requires_grad_() for p in cplx]
        tcplx = clone_params(cplx)
        ours_c = fo.AdamW(cplx, backend=backend, **kw)
        ours_r = fo.AdamW(real, backend=backend, **kw)
        theirs = torch.optim.AdamW(tcplx, foreach=False, **kw)
        for s in range(3):
            grads = [torch.randn_like(p) for p in cplx]
            for p, q, t, g in zip(cplx, real, tcplx, grads):
                p.grad, t.grad = g.clone(), g.clone()
                q.grad = torch.view_as_real(g).clone() if g.is_complex() else g.clone()
            ours_c.step()
            ours_r.step()
            theirs.step()
        for p, q, t in zip(cplx, real, tcplx):
            as_real = torch.view_as_real(p) if p.is_complex() else p
            assert torch.equal(as_real, q)
            assert_close(as_real, torch.view_as_real(t) if t.is_complex() else t, torch.float32,
                         scale=5)
        assert ours_c.state[cplx[0]]["exp_avg"].dtype == torch.complex64


def test_complex_state_dtype_rules():
    p = [torch.randn(3, dtype=torch.complex64, requires_grad=True)]
    with pytest.raises(TypeError, match="state_dtype=torch.bfloat16 does not apply to complex"):
        fo.AdamW(p, state_dtype=torch.bfloat16)
    opt = fo.AdamW([torch.randn(3, dtype=torch.complex128, requires_grad=True)],
                   state_dtype=torch.float32)
    opt.param_groups[0]["params"][0].grad = torch.randn(3, dtype=torch.complex128)
    opt.step()
    assert opt.state[opt.param_groups[0]["params"][0]]["exp_avg"].dtype == torch.complex64


@pytest.mark.parametrize("cls", [fo.AdamW, fo.Lion])
def test_closure_zero_grad_and_no_grad_steps(cls):
    """step(closure) returns the closure's loss; zero_grad(set_to_none) as torch; a step with no
    gradients is a no-op that still returns the loss; with zero gradients and no weight decay
    AdamW leaves the parameter unchanged (torch's test_step_is_noop_for_zero_grads)."""
    p = make_params([(5, 1)])
    opt = cls(p, lr=1e-5, weight_decay=0.0)
    assert opt.step(lambda: torch.tensor([1.0])).item() == 1.0
    assert len(opt.state) == 0
    before = p[0].detach().clone()
    p[0].grad = torch.zeros_like(p[0])
    opt.step()
    if cls is fo.AdamW:
        assert torch.equal(p[0], before)
    opt.zero_grad(set_to_none=False)
    assert torch.equal(p[0].grad, torch.zeros_like(p[0]))
    opt.zero_grad()
    assert p[0].grad is None
    assert all(len(st) > 0 for st in opt.state.values())


@pytest.mark.parametrize("cls", [fo.AdamW, fo.Lion])
def test_param_group_errors_like_torch(cls):
    """torch's get_error_inputs_for_all_optims, with torch's messages."""
    w, w2 = make_params([(1, 1), (1, 1)])
    with pytest.raises(TypeError, match="params argument given to the optimizer should be an iterable"):
        cls(w)
    with pytest.raises(ValueError, match="optimizer got an empty parameter list"):
        cls([])
    with pytest.warns(UserWarning, match="a parameter group with duplicate parameters"):
        cls([w, w])
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        cls([{"params": w}, {"params": w}])
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        cls([w], lr=torch.tensor([0.001, 0.001]))
    with pytest.raises(ValueError, match="all optimizer params should be with/without names"):
        cls([("weight", w), w2])
    with pytest.raises(ValueError, match="cannot add param group with names"):
        cls([{"params": [w], "lr": 1e-2}, {"params": [("weight", w2)]}])
    with pytest.raises(ValueError, match="Invalid beta parameter at index 0: 1.0"):
        cls([w], betas=(1.0, 0.0))
    with pytest.raises(ValueError, match="betas must be either both floats or both Tensors"):
        cls([w], betas=(torch.tensor(0.9), 0.99))
    opt = cls([w])
    with pytest.raises(ValueError, match="some parameters appear in more than one"):
        opt.add_param_group({"params": [w]})
    opt.add_param_group({"params": [w2], "lr": 0.5})
    assert opt.param_groups[1]["lr"] == 0.5
    assert opt.param_groups[1].keys() == opt.param_groups[0].keys()


def test_meta_params_raise_then_materialised_step():
    """torch's test_fused_error_on_params_on_meta: stepping parameters without data raises
    before any state is made; once materialised they step."""
    with torch.device("meta"):
        model = torch.nn.Linear(2, 3)
    opt = fo.AdamW(model.parameters(), fused=True)
    for p in model.parameters():
        p.grad = torch.rand_like(p)
    with pytest.raises(RuntimeError, match="meta device"):
        opt.step()
    assert len(opt.state) == 0
    for p in model.parameters():     # materialised in place (as to_empty with swapping)
        torch.utils.swap_tensors(p, torch.nn.Parameter(torch.randn(p.shape)))
        p.grad = torch.rand_like(p)
    opt.step()
    assert all(float(opt.state[p]["step"]) == 1 for p in model.parameters())


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_found_inf_skips_everything(backend, device):
    """torch's test_fused_does_not_step_if_foundinf: with found_inf set (and grad_scale set or
    not), neither parameters nor step counts move."""
    for grad_scale in (None, 1.0):
        p = [torch.ones(1, device=device, requires_grad=True) for _ in range(5)]
        before = [q.detach().clone() for q in p]
        for q in p:
            q.grad = torch.ones_like(q)
        opt = fo.AdamW(p, fused=True, backend=backend)
        opt.grad_scale = None if grad_scale is None else torch.ones(1, device=device)
        opt.found_inf = torch.ones((), device=device)
        opt.step()
        assert all(torch.equal(q, b) for q, b in zip(p, before))
        assert all(float(opt.state[q]["step"]) == 0 for q in p)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_and_zero_dim_params(backend, device):
    """torch's foreach/fused tests end with a 0-d parameter; an empty one is also fine."""
    ours_p = [torch.randn((), device=device, requires_grad=True),
              torch.randn(0, device=device, requires_grad=True),
              torch.randn(4, device=device, requires_grad=True)]
    torch_p = clone_params(ours_p)
    ours = fo.AdamW(ours_p, backend=backend)
    theirs = torch.optim.AdamW(torch_p, foreach=False)
    _check_against_torch(ours_p, ours, torch_p, theirs, 3)


@pytest.mark.parametrize("kw", [dict(), dict(weight_decay=0.1, maximize=True), dict(amsgrad=True)])
@pytest.mark.parametrize("sched", [None, "step", "lambda"])
def test_goes_right_direction(kw, sched):
    """torch's test_forloop_goes_right_direction (contiguous and not, with a scheduler)."""
    for contiguous in (True, False):
        w = torch.nn.Parameter(torch.randn(10, 5) if contiguous else torch.randn(10, 5, 2)[..., 0])
        b = torch.nn.Parameter(torch.randn(10) if contiguous else torch.randn(10, 2)[..., 0])
        x = torch.randn(5)
        opt = fo.AdamW([w, b], **kw)
        scheds = {None: [], "step": [torch.optim.lr_scheduler.StepLR(opt, 5, gamma=0.9)],
                  "lambda": [fo.lr_scheduler.warmup_decay(opt, 3, 20, "sqrt")]}[sched]

        def closure():
            opt.zero_grad()
            loss = (w.mv(x) + b).pow(2).sum()
            loss.backward()
            return loss

        first = closure().item()
        for _ in range(20):
            opt.step(closure)
            for s in scheds:
                s.step()
        last = closure().item()
        assert (last > first) if kw.get("maximize") else (last < first)


@pytest.mark.parametrize("decoupled", [False, True])
def test_lion_matches_lion_pytorch(decoupled):
    """The peer itself when installed (pyproject's [peers]): the same parameters, with param
    groups of their own lr, and its checkpoint loads into ours."""
    lp = pytest.importorskip("lion_pytorch", reason="lion-pytorch (a peer) is not installed")
    p = make_params([(100,), (7, 3)])
    q = clone_params(p)
    groups = lambda ps: [{"params": ps[:1]}, {"params": ps[1:], "lr": 3e-4}]
    theirs = lp.Lion(groups(p), lr=1e-3, weight_decay=0.1, decoupled_weight_decay=decoupled)
    ours = fo.Lion(groups(q), lr=1e-3, weight_decay=0.1, decoupled_weight_decay=decoupled)
    for s in range(5):
        _step_both([(p, theirs), (q, ours)], s)
    for a, b in zip(p, q):
        assert_close(b, a, torch.float32)
    again = fo.Lion(groups(clone_params(p)), lr=1e-3, weight_decay=0.1,
                    decoupled_weight_decay=decoupled)
    again.load_state_dict(theirs.state_dict())
    assert again.param_groups[0]["decoupled_weight_decay"] is decoupled
