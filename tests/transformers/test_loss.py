"""causal_lm_loss (transformers' ForCausalLMLoss contract) and the logit-free linear
cross-entropy forward: values equal to stock, gradient accumulation with num_items_in_batch equal
to the full batch, and no (N, V) logits in training."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fused_lm.reference.cross_entropy import cross_entropy as ref_cross_entropy
from tests._helpers import assert_close
from tests.transformers._models import VOCAB, cpu_paths, flt, padded_batch, pair  # noqa: F401

pytestmark = pytest.mark.usefixtures("cpu_paths")


def _stock_loss():
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_lm_loss_equals_transformers(dtype):
    logits = (torch.randn(3, 11, VOCAB) * 2).to(dtype)
    _, _, labels = padded_batch(3, 11, "right")
    stock = _stock_loss()
    got = flt.causal_lm_loss(logits, labels, VOCAB)
    assert got.dtype == torch.float32
    assert_close(got, stock(logits, labels, VOCAB), torch.float32, scale=10)
    n = torch.tensor(17)
    assert_close(flt.causal_lm_loss(logits, labels, VOCAB, num_items_in_batch=n),
                 stock(logits, labels, VOCAB, num_items_in_batch=n), torch.float32, scale=10)
    shifted = torch.randint(0, VOCAB, (3, 11))
    shifted[0, :4] = 7
    assert_close(flt.causal_lm_loss(logits, None, VOCAB, shift_labels=shifted, ignore_index=7),
                 stock(logits, None, VOCAB, shift_labels=shifted, ignore_index=7), torch.float32, scale=10)


def test_causal_lm_loss_options_and_ignored_kwargs():
    """z_loss and label_smoothing by keyword (against fused_lm's float64 reference); the model's
    other keywords (attention kwargs, output flags) are ignored as transformers' loss does."""
    logits = torch.randn(2, 9, VOCAB, requires_grad=True)
    labels = torch.randint(0, VOCAB, (2, 9))
    labels[1, 3:] = -100
    got = flt.causal_lm_loss(logits, labels, VOCAB, z_loss=1e-3, label_smoothing=0.1,
                             position_ids=None, output_attentions=False, cu_seq_lens_q=None)
    target = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    ref = ref_cross_entropy(logits, target, z_loss=1e-3, label_smoothing=0.1)
    assert_close(got, ref, torch.float32, scale=10)
    got.backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("linear", [False, True], ids=["cross_entropy", "linear_cross_entropy"])
def test_grad_accumulation_with_num_items_equals_full_batch(linear):
    """Two micro-batches with different numbers of real tokens, each loss divided by the total
    count (num_items_in_batch, as Trainer passes it), sum to the full batch's mean loss and give
    its gradient."""
    family = "gemma2" if linear else "llama"         # gemma2: final softcap inside linear CE
    _, model = pair(family, linear_cross_entropy=linear)
    model.train()
    ids, mask, labels = padded_batch(4, 12, "right")
    full = model(ids, attention_mask=mask, labels=labels)
    if linear:
        assert full.logits is None
    full.loss.backward()
    full_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    n_items = (labels[:, 1:] != -100).sum()
    total = 0.0
    for rows in (slice(0, 1), slice(1, 4)):
        out = model(ids[rows], attention_mask=mask[rows], labels=labels[rows], num_items_in_batch=n_items)
        out.loss.backward()
        total = total + out.loss.detach()
    assert_close(total, full.loss.detach(), torch.float32, scale=10)
    for p, g in zip(model.parameters(), full_grads):
        assert_close(p.grad, g, torch.float32, scale=20)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_linear_cross_entropy_forward_equals_stock(family):
    """Training with labels: the same loss and gradients as stock (Gemma 2's final logit softcap
    moved into the loss), logits=None; eval and generation keep their logits."""
    stock, fused = pair(family, linear_cross_entropy=True)
    # Right padding: with left padding the last pad position predicts the first real token, and
    # padded query rows are undefined in stock attention (0 in fused_lm's, as in flash-attention).
    ids, mask, labels = padded_batch(3, 12, "right")
    stock.train(), fused.train()
    a = stock(ids, attention_mask=mask, labels=labels)
    b = fused(ids, attention_mask=mask, labels=labels)
    assert b.logits is None and a.logits is not None
    assert_close(b.loss, a.loss, torch.float32, scale=10)
    a.loss.backward(), b.loss.backward()
    for (name, p), q in zip(stock.named_parameters(), fused.parameters()):
        assert_close(q.grad, p.grad, torch.float32, scale=20, what=name)
    fused.eval()
    with torch.no_grad():
        out = fused(ids, attention_mask=mask, labels=labels)
    assert out.logits is not None and out.logits.shape == (3, 12, VOCAB)


def test_linear_cross_entropy_forward_options():
    """logits_to_keep, shift_labels, ignore_index, num_items_in_batch and return_dict=False."""
    stock, fused = pair("llama", linear_cross_entropy=True)
    stock.train(), fused.train()
    ids, mask, labels = padded_batch(2, 12, "right")
    keep = 5
    shift = labels[:, -keep:].clone()
    kw = dict(attention_mask=mask, labels=labels[:, -keep:], logits_to_keep=keep, shift_labels=shift,
              num_items_in_batch=torch.tensor(4))
    assert_close(fused(ids, **kw).loss, stock(ids, **kw).loss, torch.float32, scale=10)
    shift = torch.randint(4, VOCAB, shift.shape).masked_fill(mask[:, -keep:] == 0, 3)
    shift[0, :2] = 3
    kw.update(shift_labels=shift, ignore_index=3)
    assert_close(fused(ids, **kw).loss, stock(ids, **kw).loss, torch.float32, scale=10)
    as_tuple = fused(ids, attention_mask=mask, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[0].dim() == 0
    with pytest.raises(ValueError, match="labels"):
        fused(ids, labels=labels, logits_to_keep=3)       # 3 hidden rows per sequence, 12 labels


def test_apply_again_replaces_options():
    stock, fused = pair("llama", linear_cross_entropy=True, z_loss=1e-4)
    assert isinstance(fused.loss_function, functools.partial)
    flt.apply_fused_lm(fused, cross_entropy=False, linear_cross_entropy=False)
    assert "forward" not in vars(fused) and "_loss_function" not in vars(fused)
    assert type(fused.loss_function) is type(stock.loss_function)
    ids, _, labels = padded_batch(2, 12, "right")
    assert fused.train()(ids, labels=labels).logits is not None


class _LargestAllocation(TorchDispatchMode):
    """The largest tensor (in elements) any torch op produces inside the block."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_linear_cross_entropy_never_allocates_the_logits(monkeypatch):
    """A training step (forward and backward) of the patched model allocates no tensor of N x V
    elements: with chunks of 8 tokens the largest are the chunk logits (8 x V), the embedding
    and head gradients (V x H). The stock model does allocate N x V (the probe sees it)."""
    monkeypatch.setenv("FUSED_LM_LCE_CHUNK", "8")
    stock, fused = pair("llama", linear_cross_entropy=True)
    ids, mask, labels = padded_batch(4, 12, "right")
    ids, labels, mask = (torch.cat([t] * 4, dim=1) for t in (ids, labels, mask))   # N = 192
    n_tokens = ids.numel()
    for model, expect_logits in ((stock, True), (fused, False)):
        model.train()
        with _LargestAllocation() as probe:
            model(ids, attention_mask=mask, labels=labels).loss.backward()
        if expect_logits:
            assert probe.largest >= n_tokens * VOCAB
        else:
            assert probe.largest < n_tokens * VOCAB // 2, probe.largest
