"""Tiny random-init models of every supported family (no hub downloads), built from configs.

Sizes: hidden 64, 2 layers, 4 query heads of 16 over 2 key/value heads (GQA), vocab 256. Windows
(Mistral, Qwen2's second layer, Gemma 2's sliding layers) are 5 tokens, shorter than the 12-token
test sequences; Gemma 2 caps attention scores at 2 and final logits at 3, small enough to bite.
initializer_range=0.1 (transformers' 0.02 gives near-uniform attention, which would hide
masking mistakes).
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install -e '.[test]'); "
    "fused_lm.transformers is tested against it")

import fused_lm.transformers as flt  # noqa: E402

VOCAB = 256
WINDOW = 5
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=128, initializer_range=0.1, tie_word_embeddings=False)

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, "sdpa"),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": WINDOW}, "sdpa"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}, "sdpa"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}, "sdpa"),
    # Gemma 2's scores are softcapped, which SDPA cannot do: its stock path is eager.
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {"sliding_window": WINDOW, "attn_logit_softcapping": 2.0,
                "final_logit_softcapping": 3.0, "query_pre_attn_scalar": 16}, "eager"),
}


def config(family: str, **overrides):
    cfg_name, _, extra, stock_attn = FAMILIES[family]
    kwargs = {**COMMON, **extra, **overrides}
    kwargs.setdefault("attn_implementation", stock_attn)
    return getattr(transformers, cfg_name)(**kwargs)


def stock_model(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return getattr(transformers, FAMILIES[family][1])(config(family, **overrides))


def pair(family: str, seed: int = 0, **apply_kwargs):
    """(stock, fused): the same weights; fused has apply_fused_lm(**apply_kwargs)."""
    stock = stock_model(family, seed)
    fused = flt.apply_fused_lm(copy.deepcopy(stock), **apply_kwargs)
    return stock, fused


def padded_batch(batch: int, seqlen: int, side: str, seed: int = 1):
    """input_ids, attention_mask (1 = token) and labels (-100 on padding) with rows of lengths
    seqlen, seqlen - 3, seqlen - 7, ... padded on ``side``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seqlen), generator=g)
    mask = torch.zeros(batch, seqlen, dtype=torch.long)
    for b in range(batch):
        n = max(2, seqlen - (0, 3, 7, 5)[b % 4])
        if side == "right":
            mask[b, :n] = 1
        else:
            mask[b, seqlen - n:] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


@pytest.fixture
def cpu_paths(monkeypatch):
    """The CPU paths a user gets (torch attention/CE paths, C++ optimizer): tests/conftest.py
    turns the Triton interpreter on for the kernel tests, which would route every attention and
    cross-entropy call of these model-level tests through the (slow) interpreter. The
    interpreter subset is tests/transformers/test_interpreter.py.

    One torch thread: the models are tiny, and with the cores shared (pytest-xdist, CI's 2
    cores) two OpenMP threads wait on each other (measured: 0.8 s against 0.02 s per training
    step of the tiny Llama on a loaded 2-core machine)."""
    from fused_lm import _backend

    monkeypatch.setattr(_backend, "interpreter_on", lambda: False)
    monkeypatch.delenv("FUSED_LM_BACKEND", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
