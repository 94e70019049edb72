"""Training with fused_lm in transformers: 30 steps equal to stock within float32 drift, and
FusedLMTrainer (fused AdamW clipping inside its step): it trains, saves and resumes bit-exactly,
makes no separate norm pass, logs the grad_norm clip_grad_norm_ would return, leaves a
user-provided optimizer alone, and gradient accumulation equals the full batch."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests._helpers import assert_close, rel_error
from tests.transformers._models import cpu_paths, flt, padded_batch, pair, stock_model  # noqa: F401

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install -e '.[test]')")
pytestmark = pytest.mark.usefixtures("cpu_paths")

STEPS = 30


@pytest.mark.parametrize("family,linear", [("llama", False), ("gemma2", True)],
                         ids=["llama-attention+ce", "gemma2-linear_ce"])
def test_thirty_steps_equal_stock(family, linear):
    """Stock: SDPA/eager attention, transformers' loss, torch AdamW after clip_grad_norm_.
    fused_lm: apply_fused_lm, fused_lm AdamW clipping in its step. Four right-padded batches
    cycled, so the loss falls; losses, grad norms and final weights agree within float32 drift."""
    from fused_lm.optim import AdamW

    stock, fused = pair(family, linear_cross_entropy=linear)
    stock.train(), fused.train()
    opt_s = torch.optim.AdamW(stock.parameters(), lr=3e-3, weight_decay=0.1)
    opt_f = AdamW(fused.parameters(), lr=3e-3, weight_decay=0.1, max_grad_norm=1.0)
    batches = [padded_batch(4, 12, "right", seed=s) for s in range(4)]
    losses_s, losses_f, norms_s, norms_f = [], [], [], []
    for step in range(STEPS):
        ids, mask, labels = batches[step % 4]
        loss = stock(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        norms_s.append(torch.nn.utils.clip_grad_norm_(stock.parameters(), 1.0))
        opt_s.step(), opt_s.zero_grad()
        losses_s.append(loss.detach())
        loss = fused(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt_f.step()
        norms_f.append(opt_f.grad_norm.clone())
        opt_f.zero_grad()
        losses_f.append(loss.detach())
    losses_s, losses_f = torch.stack(losses_s), torch.stack(losses_f)
    assert losses_s[-4:].mean() < losses_s[:4].mean() - 0.3, losses_s
    assert_close(losses_f, losses_s, torch.float32, scale=10, what="loss curve")
    assert_close(torch.stack(norms_f), torch.stack(norms_s), torch.float32, scale=100, what="grad norms")
    for (name, p), q in zip(stock.named_parameters(), fused.parameters()):
        assert rel_error(q, p) < 1e-3, name


# -- FusedLMTrainer ------------------------------------------------------------------------------

def _dataset(n=16, seqlen=12):
    rows = []
    for i in range(0, n, 4):
        ids, mask, labels = padded_batch(4, seqlen, "right", seed=50 + i)
        rows += [{"input_ids": ids[j], "attention_mask": mask[j], "labels": labels[j]} for j in range(4)]
    return rows


def _args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=8,
                learning_rate=3e-3, weight_decay=0.1, logging_steps=1, report_to=[], use_cpu=True,
                save_strategy="no", seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


class _Counter:
    def __init__(self):
        self.by_name: dict[str, int] = {}

    @property
    def calls(self) -> int:
        return sum(self.by_name.values())

    def wrap(self, name, fn):
        def counted(*args, **kwargs):
            self.by_name[name] = self.by_name.get(name, 0) + 1
            return fn(*args, **kwargs)
        return counted


@pytest.fixture
def norm_passes(monkeypatch):
    """Counts every gradient-norm pass Trainer could make: accelerate's clip_grad_norm_, torch's
    clip_grad_norm_ / get_total_norm, fused_lm's clip_grad_norm_."""
    import accelerate

    import fused_lm.optim.clip as fclip

    counter = _Counter()
    monkeypatch.setattr(accelerate.Accelerator, "clip_grad_norm_",
                        counter.wrap("accelerate", accelerate.Accelerator.clip_grad_norm_))
    for mod, name in ((torch.nn.utils, "clip_grad_norm_"), (torch.nn.utils, "get_total_norm"),
                      (fclip, "clip_grad_norm_")):
        monkeypatch.setattr(mod, name, counter.wrap(f"{mod.__name__}.{name}", getattr(mod, name)))
    return counter


def _norm_recorder():
    """A callback that records, before each optimizer step, the norm clip_grad_norm_ would return
    (computed here with plain torch ops, so it is not counted as a pass of the trainer)."""
    from transformers import TrainerCallback

    class Record(TrainerCallback):
        norms: list = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads = [p.grad.detach().double() for p in model.parameters() if p.grad is not None]
            self.norms.append(torch.sqrt(sum((g * g).sum() for g in grads)).item())

    return Record()


def _logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h and "train_runtime" not in h]


def test_trainer_trains_without_norm_pass_and_logs_clip_norm(tmp_path, norm_passes):
    from transformers import Trainer

    record = _norm_recorder()
    model = flt.apply_fused_lm(stock_model("llama"), linear_cross_entropy=True)
    trainer = flt.FusedLMTrainer(model=model, args=_args(tmp_path / "fused"), train_dataset=_dataset(),
                                 callbacks=[record])
    trainer.train()
    from fused_lm.optim import AdamW

    inner = trainer.optimizer.optimizer
    assert isinstance(inner, AdamW) and inner.max_grad_norm == 1.0
    assert [g["weight_decay"] for g in inner.param_groups] == [0.1, 0.0]
    assert all(p.dim() == 1 for p in inner.param_groups[1]["params"])      # norms: no decay
    assert norm_passes.calls == 0
    logged = _logged(trainer, "grad_norm")
    assert len(logged) == 8 and len(record.norms) == 8
    assert rel_error(torch.tensor(logged), torch.tensor(record.norms)) < 1e-5
    losses = _logged(trainer, "loss")
    assert sum(losses[-2:]) < sum(losses[:2]) - 0.2, losses

    # Stock Trainer on the same data: the same curve within float32 drift, one clip per step.
    stock = Trainer(model=stock_model("llama"), args=_args(tmp_path / "stock"), train_dataset=_dataset())
    stock.train()
    assert norm_passes.by_name["accelerate"] == 8
    assert rel_error(torch.tensor(_logged(stock, "grad_norm")), torch.tensor(logged)) < 1e-4
    assert rel_error(torch.tensor(_logged(stock, "loss")), torch.tensor(losses)) < 1e-4


def test_trainer_resumes_bit_exactly(tmp_path):
    def trainer(out):
        model = flt.apply_fused_lm(stock_model("llama", seed=7))
        return flt.FusedLMTrainer(model=model, args=_args(out, max_steps=6, save_strategy="steps",
                                                            save_steps=3), train_dataset=_dataset())

    straight = trainer(tmp_path / "a")
    straight.train()
    resumed = trainer(tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    state_a, state_b = (t.optimizer.state_dict()["state"] for t in (straight, resumed))
    for i in state_a:
        for key in state_a[i]:
            assert torch.equal(state_a[i][key], state_b[i][key]), (i, key)


def test_trainer_user_optimizers_and_options(tmp_path, norm_passes):
    from fused_lm.optim import AdamW

    data = _dataset(8)
    # A fused optimizer that clips in its step: left alone, Trainer does not clip again (warning).
    model = flt.apply_fused_lm(stock_model("llama"))
    opt = AdamW(model.parameters(), lr=1e-3, max_grad_norm=0.5)
    t = flt.FusedLMTrainer(model=model, args=_args(tmp_path / "1", max_steps=2), train_dataset=data,
                           optimizers=(opt, None))
    with pytest.warns(UserWarning, match="not applied as a second clip"):
        t.train()
    assert t.optimizer.optimizer is opt and norm_passes.calls == 0
    assert len(_logged(t, "grad_norm")) == 2
    # A torch optimizer: Trainer clips as usual.
    model = flt.apply_fused_lm(stock_model("llama"))
    t = flt.FusedLMTrainer(model=model, args=_args(tmp_path / "2", max_steps=2), train_dataset=data,
                           optimizers=(torch.optim.AdamW(model.parameters(), lr=1e-3), None))
    t.train()
    assert norm_passes.by_name["accelerate"] == 2
    calls = norm_passes.calls
    # max_grad_norm=0: no clipping and no pass just to log a norm.
    model = flt.apply_fused_lm(stock_model("llama"))
    t = flt.FusedLMTrainer(model=model, args=_args(tmp_path / "3", max_steps=2, max_grad_norm=0.0),
                           train_dataset=data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        t.train()
    assert t.optimizer.optimizer.max_grad_norm is None and norm_passes.calls == calls
    assert _logged(t, "grad_norm") == []
    with pytest.raises(ValueError, match="optim='sgd'"):
        flt.FusedLMTrainer(model=model, args=_args(tmp_path / "4", optim="sgd"),
                           train_dataset=data).create_optimizer()


def test_trainer_gradient_accumulation_equals_full_batch(tmp_path):
    """2 micro-batches of 2 with gradient_accumulation_steps=2 give the weights of batches of 4:
    Trainer passes num_items_in_batch, causal_lm_loss / the linear-CE forward divide by it."""
    def run(out, **kw):
        model = flt.apply_fused_lm(stock_model("qwen2", seed=3), linear_cross_entropy=True)
        t = flt.FusedLMTrainer(model=model, args=_args(out, max_steps=3, **kw), train_dataset=_dataset())
        t.train()
        return t

    full = run(tmp_path / "full", per_device_train_batch_size=4)
    accumulated = run(tmp_path / "acc", per_device_train_batch_size=2, gradient_accumulation_steps=2)
    for (name, p), q in zip(full.model.named_parameters(), accumulated.model.parameters()):
        if name.endswith("k_proj.bias"):
            # Its gradient is 0 in exact arithmetic (q.b_k is the same for every key of a query,
            # and softmax is shift-invariant): what it holds is rounding noise, which AdamW
            # normalises into lr-sized steps whose sign depends on the summation order. Bounded by
            # what 3 steps of at most lr = 3e-3 each can move two runs apart instead.
            assert (q - p).abs().max() <= 2 * 3 * 3e-3, name
            continue
        assert rel_error(q, p) < 1e-4, name
    assert rel_error(torch.tensor(_logged(accumulated, "grad_norm")),
                     torch.tensor(_logged(full, "grad_norm"))) < 1e-5
