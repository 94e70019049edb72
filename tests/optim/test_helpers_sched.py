"""fused_lm.optim.param_groups and fused_lm.optim.lr_scheduler.warmup_cosine."""

from __future__ import annotations

import math

import pytest
import torch

import fused_lm.optim as fo


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 4)
        self.lin = torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.head = torch.nn.Linear(4, 11, bias=False)
        self.head.weight = self.emb.weight           # tied: must appear once
        self.frozen = torch.nn.Parameter(torch.ones(3, 3), requires_grad=False)


def test_param_groups_split():
    m = _Tiny()
    decay, no_decay = fo.param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda g: {id(p) for p in g["params"]}
    assert ids(decay) == {id(m.emb.weight), id(m.lin.weight)}
    assert ids(no_decay) == {id(m.lin.bias), id(m.norm.weight), id(m.norm.bias)}
    decay, no_decay = fo.param_groups(m, 0.1, exclude_embeddings=True)
    assert ids(decay) == {id(m.lin.weight)}
    assert id(m.emb.weight) in ids(no_decay)
    opt = fo.AdamW(fo.param_groups(m, 0.1), backend="torch")
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_param_groups_bad_input():
    with pytest.raises(TypeError, match="nn.Module"):
        fo.param_groups([torch.zeros(2)], 0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        fo.param_groups(_Tiny(), -1.0)


def test_warmup_cosine_shape():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = fo.AdamW([p], lr=1.0, backend="torch")
    sched = fo.lr_scheduler.warmup_cosine(opt, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)
    lrs = []
    for _ in range(16):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[14] == pytest.approx(0.1) and lrs[15] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))


def test_warmup_cosine_tensor_lr_and_state_dict():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = fo.Lion([p], lr=torch.tensor(0.5), backend="torch")
    sched = fo.lr_scheduler.warmup_cosine(opt, 2, 10)
    for _ in range(3):
        p.grad = torch.ones(2)
        opt.step()
        sched.step()
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    sd = sched.state_dict()
    opt2 = fo.Lion([torch.nn.Parameter(torch.zeros(2))], lr=0.5, backend="torch")
    sched2 = fo.lr_scheduler.warmup_cosine(opt2, 2, 10)
    sched2.load_state_dict(sd)
    assert sched2.last_epoch == sched.last_epoch


@pytest.mark.parametrize("args,match", [
    ((-1, 10), "warmup_steps"),
    ((5, 3), "total_steps"),
    ((0, 0), "total_steps"),
])
def test_warmup_cosine_bad_input(args, match):
    opt = fo.AdamW([torch.nn.Parameter(torch.zeros(1))], backend="torch")
    with pytest.raises(ValueError, match=match):
        fo.lr_scheduler.warmup_cosine(opt, *args)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        fo.lr_scheduler.warmup_cosine(opt, 1, 2, min_lr_ratio=1.5)
