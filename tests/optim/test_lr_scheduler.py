"""fused_lm.optim.lr_scheduler.warmup_decay and wsd (issue 12, item 8): the factors at the
points the module docstring defines, edge cases, argument errors, and the LambdaLR contract
(state_dict resume, pickling, SequentialLR / ChainedScheduler, tensor learning rates)."""

from __future__ import annotations

import copy
import io
import math
import os
import pickle
import runpy
import sys

import pytest
import torch

import fused_lm.optim as fo
from fused_lm.optim import lr_scheduler as ls


def _opt(lr=1.0, groups=1):
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(groups)]
    return torch.optim.SGD([{"params": [p], "lr": lr * (i + 1)} for i, p in enumerate(params)],
                           lr=lr)


def _trace(sched, n):
    """The lr of each of n optimizer steps (group 0)."""
    out = []
    for _ in range(n):
        out.append(float(sched.optimizer.param_groups[0]["lr"]))
        sched.optimizer.step()
        sched.step()
    return out


# -- the factors -------------------------------------------------------------------------------

@pytest.mark.parametrize("decay,quarter,half", [
    ("cosine", (1 + math.cos(math.pi / 4)) / 2, 0.5),
    ("linear", 0.75, 0.5),
    ("sqrt", 0.5, 1 - math.sqrt(0.5)),
])
def test_warmup_decay_points(decay, quarter, half):
    """w=4, T=12, r=0.2: (s+1)/w during warm-up, then r + (1-r) g(x) with x = (s-4)/8, and r from
    s = T on."""
    r = 0.2
    lrs = _trace(ls.warmup_decay(_opt(), 4, 12, decay, min_lr_ratio=r), 16)
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)                             # x = 0
    assert lrs[6] == pytest.approx(r + (1 - r) * quarter)           # x = 1/4
    assert lrs[8] == pytest.approx(r + (1 - r) * half)              # x = 1/2
    assert lrs[12:] == pytest.approx([r] * 4)                       # s >= T stays at r
    assert all(a >= b - 1e-12 for a, b in zip(lrs[3:], lrs[4:]))    # non-increasing after peak


@pytest.mark.parametrize("decay", ls.DECAYS)
def test_wsd_points(decay):
    """w=2, S=3, D=4, r=0.1: warm-up, plateau at 1 on [2, 5), the decay window [5, 9), r after."""
    r = 0.1
    lrs = _trace(ls.wsd(_opt(), 2, 3, 4, decay, min_lr_ratio=r), 12)
    assert lrs[:2] == pytest.approx([0.5, 1.0])
    assert lrs[2:6] == pytest.approx([1.0] * 4)                     # plateau, then x = 0
    g_half = {"cosine": 0.5, "linear": 0.5, "sqrt": 1 - math.sqrt(0.5)}[decay]
    assert lrs[7] == pytest.approx(r + (1 - r) * g_half)            # x = 2/4
    assert 1.0 > lrs[6] > lrs[7] > lrs[8] > r
    assert lrs[9:] == pytest.approx([r] * 3)


def test_sqrt_is_one_minus_sqrt_of_progress():
    """The "1-sqrt" cooldown: g(x) = 1 - sqrt(x) at every step of a 100-step window."""
    lrs = _trace(ls.wsd(_opt(), 0, 0, 100, "sqrt"), 101)
    assert lrs == pytest.approx([1 - math.sqrt(s / 100) for s in range(100)] + [0.0])


def test_edge_cases():
    # No warm-up: the first step runs at the peak.
    assert _trace(ls.warmup_decay(_opt(), 0, 4, "linear"), 5) == pytest.approx([1, 0.75, 0.5, 0.25, 0])
    # warmup_steps == total_steps: warm up, then the floor.
    assert _trace(ls.warmup_decay(_opt(), 3, 3, min_lr_ratio=0.5), 5) == pytest.approx(
        [1 / 3, 2 / 3, 1.0, 0.5, 0.5])
    # Every wsd phase may be empty, alone.
    assert _trace(ls.wsd(_opt(), 0, 2, 2, "linear"), 5) == pytest.approx([1, 1, 1, 0.5, 0])
    assert _trace(ls.wsd(_opt(), 2, 0, 2, "linear"), 5) == pytest.approx([0.5, 1, 1, 0.5, 0])
    assert _trace(ls.wsd(_opt(), 2, 2, 0, min_lr_ratio=0.3), 5) == pytest.approx([0.5, 1, 1, 1, 0.3])
    # min_lr_ratio = 1: constant after warm-up.
    assert _trace(ls.warmup_decay(_opt(), 2, 5, "sqrt", 1.0), 7) == pytest.approx([0.5] + [1] * 6)
    # numpy integers are step counts too.
    np = pytest.importorskip("numpy")
    assert _trace(ls.wsd(_opt(), np.int64(1), np.int32(1), np.int64(1)), 3) == pytest.approx([1, 1, 1])


def test_every_group_scaled_from_its_own_lr():
    opt = _opt(lr=0.1, groups=3)
    sched = ls.wsd(opt, 2, 1, 2, "linear")
    for _ in range(4):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 0.1, 0.15])


def test_warmup_cosine_is_warmup_decay_cosine():
    a = _trace(ls.warmup_cosine(_opt(), 5, 20), 25)
    b = _trace(ls.warmup_decay(_opt(), 5, 20, "cosine", min_lr_ratio=0.1), 25)
    assert a == b and a[-1] == pytest.approx(0.1)


@pytest.mark.parametrize("call,exc,match", [
    (lambda o: ls.warmup_decay(o, -1, 10), ValueError, "warmup_steps must be >= 0"),
    (lambda o: ls.warmup_decay(o, 2.5, 10), TypeError, "warmup_steps must be an integer"),
    (lambda o: ls.warmup_decay(o, True, 10), TypeError, "warmup_steps must be an integer"),
    (lambda o: ls.warmup_decay(o, 5, 3), ValueError, r"total_steps must be >= 1 and >= warmup_steps \(5\)"),
    (lambda o: ls.warmup_decay(o, 0, 0), ValueError, "total_steps must be >= 1"),
    (lambda o: ls.warmup_decay(o, 1, 10, "exp"), ValueError, "decay='exp': expected one of 'cosine', 'linear', 'sqrt'"),
    (lambda o: ls.warmup_decay(o, 1, 10, min_lr_ratio=1.5), ValueError, r"min_lr_ratio must be a number in \[0, 1\]"),
    (lambda o: ls.warmup_decay(o, 1, 10, min_lr_ratio="0.1"), ValueError, "min_lr_ratio"),
    (lambda o: ls.wsd(o, 1, -2, 3), ValueError, "stable_steps must be >= 0"),
    (lambda o: ls.wsd(o, 1, 2, 3.0), TypeError, "decay_steps must be an integer"),
    (lambda o: ls.wsd(o, 0, 0, 0), ValueError, "must be >= 1, got 0"),
    (lambda o: ls.wsd(o, 1, 1, 1, "cos"), ValueError, "decay='cos'"),
    (lambda o: ls.wsd(o, 1, 1, 1, min_lr_ratio=-0.1), ValueError, "min_lr_ratio"),
    (lambda o: ls.wsd([torch.zeros(1)], 1, 1, 1), TypeError, "expected a torch.optim.Optimizer"),
])
def test_bad_arguments(call, exc, match):
    opt = _opt(lr=0.5)
    with pytest.raises(exc, match=match):
        call(opt)
    assert opt.param_groups[0]["lr"] == 0.5 and "initial_lr" not in opt.param_groups[0]


# -- the LambdaLR contract ---------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda o: ls.warmup_decay(o, 3, 12, "sqrt", 0.1),
    lambda o: ls.wsd(o, 2, 4, 5, "cosine", 0.05),
], ids=["warmup_decay", "wsd"])
def test_state_dict_resume_and_pickle(make):
    """Saved after 5 steps (torch.save, weights_only load), loaded into a fresh scheduler built
    with other arguments: the schedule's parameters come back with the step count, and the
    lrs continue exactly as an uninterrupted run; the scheduler pickles and deep-copies."""
    full = _trace(make(_opt()), 14)
    opt = _opt()
    sched = make(opt)
    first = _trace(sched, 5)
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    opt2 = _opt()
    resumed = ls.wsd(opt2, 1, 1, 1, "linear")            # deliberately different arguments
    opt2.load_state_dict(opt.state_dict())               # after the scheduler, as torch says
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert first + _trace(resumed, 9) == full
    for clone in (copy.deepcopy(sched), pickle.loads(pickle.dumps(sched))):
        assert _trace(clone, 9) == full[5:]
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)
    assert "decay=" in repr(sched.lr_lambdas[0])


def test_sequential_and_chained():
    """SequentialLR hands over at the milestone; ChainedScheduler multiplies a chainable
    scheduler's factor into ours (torch's semantics: LambdaLR sets base * f(s), ExponentialLR
    then multiplies the current lr by gamma)."""
    opt = _opt()
    seq = torch.optim.lr_scheduler.SequentialLR(
        opt, [ls.warmup_decay(opt, 2, 6, "linear", 0.5), torch.optim.lr_scheduler.ConstantLR(
            opt, factor=0.25, total_iters=100)], milestones=[8])
    lrs = _trace(seq, 10)
    assert lrs[:8] == pytest.approx([0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.5])
    assert lrs[8:] == pytest.approx([0.25, 0.25])
    opt = _opt()
    chained = torch.optim.lr_scheduler.ChainedScheduler(
        [ls.wsd(opt, 0, 2, 2, "linear"), torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)])
    lrs = _trace(chained, 5)
    assert lrs == pytest.approx([1.0, 0.5, 0.5, 0.25, 0.0])


@pytest.mark.parametrize("cls", [fo.AdamW, fo.Lion])
def test_tensor_lr_of_fused_optimizers(cls):
    """The schedule writes into a tensor lr in place (LambdaLR's fill_), which the fused step
    reads: the same parameters as with a float lr."""
    runs = []
    for lr in (torch.tensor([[1e-2]]), 1e-2):
        p = [torch.nn.Parameter(torch.linspace(-1, 1, 7))]
        opt = cls(p, lr=lr)
        sched = ls.wsd(opt, 2, 1, 3, "sqrt", 0.1)
        for s in range(7):
            p[0].grad = torch.cos(torch.arange(7.0) * (s + 1))
            opt.step()
            sched.step()
        runs.append(p[0].detach())
        if isinstance(lr, torch.Tensor):
            assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(1e-3)
    assert torch.allclose(runs[0], runs[1], rtol=1e-6, atol=1e-7)


def test_plot_script_writes_png(tmp_path, monkeypatch):
    """docs/plot_lr_schedules.py (README's figure) runs and writes a PNG."""
    pytest.importorskip("matplotlib")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "lr.png"
    script = os.path.join(root, "docs", "plot_lr_schedules.py")
    monkeypatch.setattr(sys, "argv", [script, "--out", str(out)])
    runpy.run_path(script, run_name="__main__")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
