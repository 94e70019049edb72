"""One training step of a small Llama in Hugging Face transformers: stock against
fused_lm.transformers.apply_fused_lm (issue 13).

A step is forward, backward, gradient clipping to norm 1 and an AdamW update, on one batch of
B full-length rows (no padding: the pretraining shape):

* ``stock``: ``attn_implementation="sdpa"``, transformers' loss on the logits (upcast to fp32),
  ``clip_grad_norm_`` then ``torch.optim.AdamW`` (foreach);
* ``fused_lm``: ``apply_fused_lm(model)`` (fused_lm attention and cross-entropy on the logits)
  and ``fused_lm.optim.AdamW(max_grad_norm=1.0)`` (clipping inside the step);
* ``fused_lm-linear-ce``: the same with ``linear_cross_entropy=True`` (no (B*T, V) logits);
* ``liger``: Liger-Kernel's instance patch (RMSNorm, SwiGLU, RoPE, fused linear CE) with the
  stock optimizer, when installed (GPU only).

FLOPs per step (matmuls only): 6 * tokens * (non-embedding weights + lm_head weights) for the
linear layers forward and backward, plus attention 6 * B * T^2 * d_model per layer (QK^T and PV,
2 * 2 * B * T^2 * d forward, halved by causality, x3 for forward and backward). Ceiling: the
matmul TFLOP/s measured in the same run. Peak memory: the harness reports it on CUDA; on the CPU
run this file (``python bench/bench_transformers.py``) for peak tensor memory from the profiler.

Sizes: quick (CPU) hidden 128, 2 layers, vocab 2048, B=4, T=128, fp32; full (GPU) hidden 1024,
8 layers, 16 heads over 4 KV heads, vocab 32000, B=4, T=2048, bf16 weights.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.harness import Case, Provider, Skip, peer

_SHORT = {torch.bfloat16: "bf16", torch.float32: "fp32"}


def _sizes(quick: bool) -> dict:
    if quick:
        return dict(hidden=128, layers=2, heads=4, kv_heads=2, inter=352, vocab=2048, batch=4,
                    seqlen=128, dtype=torch.float32)
    return dict(hidden=1024, layers=8, heads=16, kv_heads=4, inter=2816, vocab=32000, batch=4,
                seqlen=2048, dtype=torch.bfloat16)


def _flops(s: dict) -> float:
    d, h_kv = s["hidden"], s["hidden"] * s["kv_heads"] // s["heads"]
    per_layer = 2 * d * d + 2 * d * h_kv + 3 * d * s["inter"]          # q, o; k, v; gate, up, down
    tokens = s["batch"] * s["seqlen"]
    linear = 6 * tokens * (s["layers"] * per_layer + s["vocab"] * d)
    attention = 6 * s["batch"] * s["seqlen"] ** 2 * d * s["layers"]
    return float(linear + attention)


def cases(device: torch.device, quick: bool) -> list[Case]:
    s = _sizes(quick)
    providers = [
        Provider("stock", _setup(s, device, "stock"), reference=True),
        Provider("fused_lm", _setup(s, device, "fused")),
        Provider("fused_lm-linear-ce", _setup(s, device, "linear")),
        Provider("liger", _setup(s, device, "liger")),
    ]
    shape = (f"L={s['layers']} d={s['hidden']} V={s['vocab']} B={s['batch']} T={s['seqlen']}")
    return [Case("transformers", "llama-train-step", shape, _SHORT[s["dtype"]], providers,
                 flops=_flops(s), ceiling="matmul")]


def _model(s: dict, device: torch.device):
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        raise Skip("transformers not installed") from None
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                      num_key_value_heads=s["kv_heads"], max_position_embeddings=s["seqlen"],
                      attn_implementation="sdpa", tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(device=device, dtype=s["dtype"]).train()


def build_step(s: dict, device: torch.device, variant: str):
    """(step function, model) for one variant; the function runs one full training step."""
    model = _model(s, device)
    params = list(model.parameters())
    clip_separately = True
    if variant in ("fused", "linear"):
        import fused_lm.transformers as flt
        from fused_lm.optim import AdamW

        flt.apply_fused_lm(model, linear_cross_entropy=variant == "linear")
        opt = AdamW(params, lr=1e-4, weight_decay=0.1, max_grad_norm=1.0)
        clip_separately = False
    else:
        if variant == "liger":
            if device.type != "cuda":
                raise Skip("liger-kernel needs CUDA")
            lk = peer("liger_kernel.transformers", "liger-kernel")
            lk._apply_liger_kernel_to_instance(model=model)
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seqlen"]), generator=g).to(device)

    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        if clip_separately:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, model


def _setup(s: dict, device: torch.device, variant: str):
    def setup():
        step, _ = build_step(s, device, variant)
        return step
    return setup


def cpu_peak_bytes(fn) -> int:
    """Peak of live CPU tensor bytes during ``fn()`` above the start, from the profiler: each op's
    self allocation (allocations minus frees inside it, children excluded) and the free events
    between ops, accumulated in time order. Allocations freed within one op are netted, so the
    peak inside a single op is not seen; the (tokens, vocab) logits and activations are."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = sorted(((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]"
                      else e.self_cpu_memory_usage) for e in prof.events()), key=lambda x: x[0])
    live = peak = 0
    for _, delta in deltas:
        live += delta
        peak = max(peak, live)
    return peak


def main() -> None:
    """Prints time and peak memory per provider for the quick (CPU) or full (GPU) size."""
    import argparse
    import statistics

    from bench.harness import time_fn

    p = argparse.ArgumentParser(description="training step of a small Llama: stock vs fused_lm")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--full", action="store_true")
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args()
    device = torch.device(args.device)
    s = _sizes(not args.full and device.type == "cpu")
    print(f"# {device}, {torch.get_num_threads()} threads, {s}")
    print(f"{'provider':20s} {'median ms':>10s} {'TFLOP/s':>8s} {'peak MB':>8s}")
    ref = None
    for variant, name in (("stock", "stock"), ("fused", "fused_lm"), ("linear", "fused_lm-linear-ce")):
        try:
            step, model = build_step(s, device, variant)
        except Skip as exc:
            print(f"{name:20s} skipped: {exc}")
            continue
        step()                                            # state, allocator warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = cpu_peak_bytes(step)
        ms = statistics.median(time_fn(step, device, args.reps, 2, 60))
        ref = ref or ms
        print(f"{name:20s} {ms:10.2f} {_flops(s) / ms / 1e9:8.3f} {peak / 2**20:8.1f}   "
              f"{ref / ms:.2f}x vs stock")
        del step, model


if __name__ == "__main__":
    main()
