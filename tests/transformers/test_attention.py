"""fused_lm attention inside transformers models: logits equal to the stock implementation (SDPA,
or eager for Gemma 2) for padded, packed and windowed batches, generation with a KV cache, the
fallbacks, the layout check and registration.

Comparisons are at the real (non-padding) positions: padded query rows are undefined in stock
attention (they attend to whatever the mask leaves) and 0 in fused_lm's, as in flash-attention.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tests._helpers import assert_close
from tests.transformers._models import (FAMILIES, VOCAB, WINDOW, config, cpu_paths, flt,  # noqa: F401
                                        padded_batch, pair, stock_model, transformers)

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("cpu_paths")


def _logits(model, **inputs):
    model.eval()
    with torch.no_grad():
        return model(use_cache=False, **inputs).logits


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_padded_logits_equal_stock(family, side):
    stock, fused = pair(family)
    assert fused.config._attn_implementation == "fused_lm"
    ids, mask, _ = padded_batch(4, 12, side)
    real = mask.bool()
    assert_close(_logits(fused, input_ids=ids, attention_mask=mask)[real],
                 _logits(stock, input_ids=ids, attention_mask=mask)[real], torch.float32, scale=10,
                 what=f"{family} {side}-padded")


def test_unpadded_batch_equals_stock_and_padding_changes_it():
    """No padding takes the dense kernel path; the same ids with padding give other logits (so the
    padding test above would notice a mask that is ignored)."""
    stock, fused = pair("llama")
    ids, mask, _ = padded_batch(2, 12, "left")
    full = _logits(fused, input_ids=ids)
    assert_close(full, _logits(stock, input_ids=ids), torch.float32, scale=10)
    padded = _logits(fused, input_ids=ids, attention_mask=mask)
    assert (padded[1, -1] - full[1, -1]).abs().max() > 1e-3


# Three sequences of 4, 3 and 5 tokens in one row.
LENGTHS = (4, 3, 5)


def _segments_alone(stock, ids):
    out, start = [], 0
    for n in LENGTHS:
        out.append(_logits(stock, input_ids=ids[:, start:start + n]))
        start += n
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_position_ids_equal_stock(family):
    """position_ids that restart mark packed sequences (transformers' rule): equal to stock, which
    builds a block-diagonal mask from them, and to each sequence run alone."""
    stock, fused = pair(family)
    ids = torch.randint(0, VOCAB, (1, sum(LENGTHS)))
    pos = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    got = _logits(fused, input_ids=ids, position_ids=pos)
    assert_close(got, _logits(stock, input_ids=ids, position_ids=pos), torch.float32, scale=10)
    assert_close(got, _segments_alone(stock, ids), torch.float32, scale=10)
    # Two rows packed differently (transformers packs per row; so does the kernel's varlen).
    ids2 = torch.randint(0, VOCAB, (2, sum(LENGTHS)))
    pos2 = torch.stack([pos[0], torch.cat([torch.arange(6), torch.arange(6)])])
    assert_close(_logits(fused, input_ids=ids2, position_ids=pos2),
                 _logits(stock, input_ids=ids2, position_ids=pos2), torch.float32, scale=10)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_packed_flash_kwargs_equal_sequences_alone(family, monkeypatch):
    """DataCollatorWithFlattening(return_flash_attn_kwargs=True): cu_seq_lens_q/k and
    max_length_q/k reach the varlen kernel directly (position_ids are not even looked at)."""
    from fused_lm.transformers import _attention

    stock, fused = pair(family)
    ids = torch.randint(0, VOCAB, (1, sum(LENGTHS)))
    features, start = [], 0
    for n in LENGTHS:
        features.append({"input_ids": ids[0, start:start + n].tolist()})
        start += n
    batch = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)(features)
    assert batch["cu_seq_lens_q"].tolist() == [0, 4, 7, 12]

    def no_position_ids(*args):
        raise AssertionError("packing was taken from position_ids, not from cu_seq_lens")

    monkeypatch.setattr(_attention, "_packing_from_position_ids", no_position_ids)
    batch.pop("labels")
    got = _logits(fused, **batch)
    assert_close(got, _segments_alone(stock, ids), torch.float32, scale=10)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_with_kv_cache_same_tokens(family):
    """Greedy generation from a left-padded batch: prefill unpads, then each decoding step sends
    one query against the cache (bottom-right causal; Gemma 2's sliding layers keep W - 1 keys)."""
    stock, fused = pair(family)
    ids, mask, _ = padded_batch(3, 12, "left")
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, output_scores=True,
              return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        a = stock.eval().generate(ids, **kw)
        b = fused.eval().generate(ids, **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert_close(torch.stack(b.scores), torch.stack(a.scores), torch.float32, scale=10)


def test_window_and_softcap_matter():
    """The Gemma 2 comparison would notice a dropped window or softcap: both change the logits."""
    ids, mask, _ = padded_batch(2, 12, "right")
    real = mask.bool()
    _, fused = pair("gemma2")
    ref = _logits(fused, input_ids=ids, attention_mask=mask)[real]
    for change in ({"sliding_window": 64}, {"attn_logit_softcapping": None}):
        _, other = pair("gemma2")
        for k, v in change.items():
            setattr(other.config, k, v)
            for layer in other.model.layers:
                attn = layer.self_attn
                if k == "sliding_window" and attn.sliding_window is not None:
                    attn.sliding_window = v
                if k == "attn_logit_softcapping":
                    attn.attn_logit_softcapping = v
        changed = _logits(other, input_ids=ids, attention_mask=mask)[real]
        assert (changed - ref).abs().max() > 1e-3, change


# -- attention_forward called directly ---------------------------------------------------------

class _Module(torch.nn.Module):
    def __init__(self, groups, head_dim, causal=True):
        super().__init__()
        self.num_key_value_groups, self.head_dim, self.is_causal = groups, head_dim, causal


def test_attention_forward_layout_and_check():
    """(B, H, T, D) in, (B, T, H, D) out, equal to torch SDPA with GQA; tensors that look like
    (B, T, H, D) raise instead of giving a wrong result."""
    q = torch.randn(2, 4, 9, 16)
    k, v = torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    out, weights = flt.attention_forward(_Module(2, 16), q, k, v, None, scaling=0.3)
    assert weights is None and out.shape == (2, 9, 4, 16)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3,
                                                           enable_gqa=True).transpose(1, 2)
    assert_close(out, ref, torch.float32, scale=10)
    with pytest.raises(ValueError, match=r"look like \(B, T, H, D\)"):
        flt.attention_forward(_Module(2, 16), q.transpose(1, 2), k.transpose(1, 2),
                              v.transpose(1, 2), None)
    with pytest.raises(ValueError, match="4-D"):
        flt.attention_forward(_Module(2, 16), q[0], k[0], v[0], None)


def test_attention_forward_kv_cache_is_bottom_right():
    """3 new queries after 6 cached keys, with a padding mask: query i sees keys <= 6 + i."""
    q = torch.randn(2, 2, 3, 16)
    k, v = torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[1, :2] = False                                     # row 1: two left pads
    out, _ = flt.attention_forward(_Module(1, 16), q, k, v, key_mask)
    allowed = torch.ones(3, 9, dtype=torch.bool).tril(6)[None, None] & key_mask[:, None, None, :]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    assert_close(out, ref.transpose(1, 2), torch.float32, scale=10)


def test_fallbacks_warn_once_and_match_stock():
    """A 4-D mask and dropout are not fused: transformers' SDPA path runs, with one warning each."""
    from fused_lm.transformers import _attention

    _attention._warned.clear()
    stock, fused = pair("llama")
    ids, mask, _ = padded_batch(2, 12, "right")
    allowed = torch.ones(12, 12, dtype=torch.bool).tril()[None, None] & mask.bool()[:, None, None, :]
    with pytest.warns(UserWarning, match="4-D attention mask"):
        got = _logits(fused, input_ids=ids, attention_mask=allowed)
    real = mask.bool()
    assert_close(got[real], _logits(stock, input_ids=ids, attention_mask=mask)[real], torch.float32,
                 scale=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                          # second time: no warning
        _logits(fused, input_ids=ids, attention_mask=allowed)
    fused.config.attention_dropout = 0.1
    for layer in fused.model.layers:
        layer.self_attn.attention_dropout = 0.1
    fused.train()
    with pytest.warns(UserWarning, match="dropout"):
        out = fused(ids, attention_mask=mask, use_cache=False).logits
    assert torch.isfinite(out).all()


def test_dropout_falls_back_to_the_stock_eager_path():
    """Gemma 2 with attention dropout in training: transformers' eager path (softcap) with the
    same mask, so with the same seed even the dropout draws, hence the logits, are equal."""
    from fused_lm.transformers import _attention

    _attention._warned.clear()
    stock, fused = pair("gemma2")
    for model in (stock, fused):
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.2
        model.train()
    ids, mask, _ = padded_batch(2, 12, "right")
    real = mask.bool()
    torch.manual_seed(5)
    a = stock(ids, attention_mask=mask, use_cache=False).logits
    torch.manual_seed(5)
    with pytest.warns(UserWarning, match="dropout 0.2 > 0 is not fused.*eager"):
        b = fused(ids, attention_mask=mask, use_cache=False).logits
    assert_close(b[real], a[real], torch.float32, scale=10)


def test_inference_mode():
    """Inference tensors have no version counter: the per-forward caches cope."""
    stock, fused = pair("qwen2")
    ids, mask, _ = padded_batch(3, 12, "left")
    with torch.inference_mode():
        a = stock.eval()(ids, attention_mask=mask, use_cache=False).logits
        b = fused.eval()(ids, attention_mask=mask, use_cache=False).logits
        pos = torch.cat([torch.arange(n) for n in LENGTHS])[None]
        c = stock(ids[:1], position_ids=pos, use_cache=False).logits
        d = fused(ids[:1], position_ids=pos, use_cache=False).logits
    assert_close(b[mask.bool()], a[mask.bool()], torch.float32, scale=10)
    assert_close(d, c, torch.float32, scale=10)


@pytest.mark.parametrize("padded", [True, False])
def test_static_cache_generation_falls_back_correctly(padded):
    """A static cache has unfilled key slots: the mask function hands over the dense mask, so the
    result stays right (SDPA fallback) rather than attending to empty slots."""
    stock, fused = pair("llama")
    ids, mask, _ = padded_batch(2, 8, "left")
    if not padded:
        mask = torch.ones_like(mask)                  # generate() then drops the mask entirely
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
              cache_implementation="static", output_scores=True, return_dict_in_generate=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = stock.eval().generate(ids, **kw)
        b = fused.eval().generate(ids, **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert_close(torch.stack(b.scores), torch.stack(a.scores), torch.float32, scale=10)


def test_mask_function_keeps_what_the_kernel_can_do():
    """Causal, sliding-window and packed patterns give None or the 2-D padding mask; a custom
    overlay (as multimodal models add) gets transformers' dense 4-D mask, hence the fallback."""
    from transformers import masking_utils as mu

    from fused_lm.transformers._attention import padding_mask

    pad = torch.ones(2, 6, dtype=torch.bool)
    pad[1, :2] = False
    kw = dict(batch_size=2, q_length=6, kv_length=6, attention_mask=pad)
    assert torch.equal(padding_mask(mask_function=mu.causal_mask_function, **kw), pad)
    assert torch.equal(padding_mask(mask_function=mu.sliding_window_causal_mask_function(3), **kw), pad)
    assert padding_mask(mask_function=mu.causal_mask_function, **{**kw, "attention_mask": None}) is None

    def image_block(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx < 2

    dense = padding_mask(mask_function=mu.or_masks(mu.causal_mask_function, image_block), **kw)
    assert dense.shape == (2, 1, 6, 6) and bool(dense[0, 0, 0, 1]) and not bool(dense[1, 0, 3, 1])
    # Keys that are not the contiguous past of the queries (a static cache's empty slots).
    dense = padding_mask(mask_function=mu.causal_mask_function, batch_size=2, q_length=2,
                         kv_length=8, q_offset=torch.tensor(3), attention_mask=None)
    assert dense.shape == (2, 1, 2, 8) and not bool(dense[0, 0, 1, 5])


# -- model types, registration, other models -----------------------------------------------------

def test_unsupported_model_type_names_the_supported_ones():
    with pytest.raises(ValueError, match="llama, mistral, qwen2, qwen3, gemma2"):
        flt.apply_fused_lm(model_type="gpt2")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2,
                                                                vocab_size=VOCAB))
    with pytest.raises(ValueError, match="supports model types llama"):
        flt.apply_fused_lm(gpt2)
    with pytest.raises(ValueError, match="model_type='qwen2' but the model is 'llama'"):
        flt.apply_fused_lm(stock_model("llama"), model_type="qwen2")


def test_any_model_on_the_attention_interface():
    """register() + set_attn_implementation('fused_lm') on a family apply_fused_lm does not list
    (Phi-3: fused qkv projection, partial names), with padding."""
    flt.register()
    torch.manual_seed(0)
    cfg = transformers.Phi3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=64, initializer_range=0.1,
                                  attn_implementation="sdpa", pad_token_id=0)
    stock = transformers.Phi3ForCausalLM(cfg)
    import copy

    fused = copy.deepcopy(stock)
    fused.set_attn_implementation("fused_lm")
    ids, mask, _ = padded_batch(3, 12, "left")
    real = mask.bool()
    assert_close(_logits(fused, input_ids=ids, attention_mask=mask)[real],
                 _logits(stock, input_ids=ids, attention_mask=mask)[real], torch.float32, scale=10)


def test_class_patching_applies_to_models_built_afterwards():
    from transformers.models.qwen3 import modeling_qwen3

    base = modeling_qwen3.Qwen3PreTrainedModel
    had = "post_init" in vars(base)
    try:
        flt.apply_fused_lm(model_type="qwen3", linear_cross_entropy=True)
        model = stock_model("qwen3")
        assert model.config._attn_implementation == "fused_lm"
        assert model.loss_function is flt.causal_lm_loss
        ids, mask, labels = padded_batch(2, 12, "right")
        out = model.train()(ids, attention_mask=mask, labels=labels)
        assert out.logits is None and torch.isfinite(out.loss)
    finally:
        from fused_lm.transformers import _patch

        _patch._CLASS_OPTIONS.pop("qwen3", None)        # later qwen3 models are stock again
        if not had:
            del base.post_init
    assert stock_model("qwen3").config._attn_implementation == "sdpa"


def test_from_pretrained_after_register(tmp_path):
    """In this process: from_pretrained(attn_implementation='fused_lm') after register(). In a new
    process the implementation is unknown until register() runs again (transformers does not
    save it), which the second half checks."""
    stock = stock_model("llama")
    stock.save_pretrained(tmp_path)
    flt.register()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="fused_lm")
    assert loaded.config._attn_implementation == "fused_lm"
    ids, mask, _ = padded_batch(2, 12, "right")
    real = mask.bool()
    assert_close(_logits(loaded, input_ids=ids, attention_mask=mask)[real],
                 _logits(stock, input_ids=ids, attention_mask=mask)[real], torch.float32, scale=10)

    script = f"""
import json, transformers, fused_lm.transformers as flt
result = {{}}
try:
    transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, attn_implementation="fused_lm")
    result["before"] = "loaded"
except Exception as exc:
    result["before"] = type(exc).__name__ + ": " + str(exc)
flt.register()
m = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, attn_implementation="fused_lm")
result["after"] = m.config._attn_implementation
print(json.dumps(result))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "fused_lm" in result["before"] and result["before"] != "loaded", result
    assert result["after"] == "fused_lm"
