"""The Triton kernels inside transformers models: flash attention (dense, varlen from padding
and packing, window, softcap, GQA, decoding against a cache) and the cross-entropy / linear
cross-entropy kernels, forced with FUSED_LM_BACKEND=triton. On a machine without a GPU they run
under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), hence the small subset
and tiny shapes; on a GPU the same tests run on CUDA."""

from __future__ import annotations

import pytest
import torch

from tests._helpers import assert_close, triton_devices
from tests.transformers._models import VOCAB, padded_batch, pair

DEVICES = triton_devices()
pytestmark = pytest.mark.skipif(not DEVICES, reason="needs CUDA or the Triton interpreter")


@pytest.fixture(params=DEVICES)
def triton_device(request, monkeypatch):
    monkeypatch.setenv("FUSED_LM_BACKEND", "triton")
    return request.param


def _to(device, *tensors):
    return [t.to(device) for t in tensors]


def test_llama_padded_forward_backward_linear_ce(triton_device):
    """Right padding -> unpadded varlen kernel forward and backward; loss by the linear-CE kernel."""
    stock, fused = pair("llama", linear_cross_entropy=True)
    stock.to(triton_device).train(), fused.to(triton_device).train()
    ids, mask, labels = _to(triton_device, *padded_batch(2, 10, "right"))
    a = stock(ids, attention_mask=mask, labels=labels, use_cache=False)
    b = fused(ids, attention_mask=mask, labels=labels, use_cache=False)
    assert b.logits is None
    assert_close(b.loss, a.loss, torch.float32, scale=10)
    a.loss.backward(), b.loss.backward()
    for (name, p), q in zip(stock.named_parameters(), fused.parameters()):
        assert_close(q.grad, p.grad, torch.float32, scale=100, what=name)


def test_gemma2_window_softcap_and_packing(triton_device):
    """Gemma 2 (window 5 on alternate layers, score softcap 2, final softcap in the CE kernel):
    left-padded logits, packed position_ids, and the eval loss through causal_lm_loss."""
    stock, fused = pair("gemma2")
    stock.to(triton_device).eval(), fused.to(triton_device).eval()
    ids, mask, labels = _to(triton_device, *padded_batch(2, 10, "left"))
    real = mask.bool()
    with torch.no_grad():
        a = stock(ids, attention_mask=mask, use_cache=False).logits
        b = fused(ids, attention_mask=mask, use_cache=False).logits
        assert_close(b[real], a[real], torch.float32, scale=10)
        pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]], device=triton_device)
        a = stock(ids[:1], position_ids=pos, labels=ids[:1], use_cache=False)
        b = fused(ids[:1], position_ids=pos, labels=ids[:1], use_cache=False)
    assert_close(b.logits, a.logits, torch.float32, scale=10)
    assert_close(b.loss, a.loss, torch.float32, scale=10)


def test_decoding_against_cache(triton_device):
    """Two greedy tokens from a left-padded batch with GQA (prefill varlen, then one query per row
    against the cached keys)."""
    stock, fused = pair("qwen3")
    stock.to(triton_device).eval(), fused.to(triton_device).eval()
    ids, mask, _ = _to(triton_device, *padded_batch(2, 8, "left"))
    kw = dict(attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0,
              output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        a, b = stock.generate(ids, **kw), fused.generate(ids, **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert_close(torch.stack(b.scores), torch.stack(a.scores), torch.float32, scale=10)
    assert a.sequences.shape[1] == 10 and VOCAB == a.scores[0].shape[-1]
