"""The tensor lists the multi-tensor and optimizer families run on (bench_multi_tensor_*,
bench_adamw, bench_lion): real models' parameter shapes and many tiny tensors.

``quick`` (the CPU default) shrinks them: GPT-2 with every dimension / 4 (1/16 of the elements)
and 500 tiny tensors instead of 10,000.
"""

from __future__ import annotations

import math

import torch


def gpt2_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of GPT-2 small (124M): embeddings, 12 blocks, final norm."""
    d, v, ctx = 768, 50257, 1024
    shapes = [(v, d), (ctx, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,),
                   (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


def tiny_shapes(count: int, seed: int = 0) -> list[tuple[int, ...]]:
    """``count`` tensors of 1 to 64k elements, log-uniform (many small norms and biases)."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.exp(torch.rand(count, generator=g) * math.log(65536)).long().clamp(1, 65536)
    return [(int(n),) for n in sizes]


def llama_1b_shapes() -> list[tuple[int, ...]]:
    """Llama-3.2-1B-shaped list (1.24B parameters): tied 128256 x 2048 embedding, 16 blocks of
    RMSNorm + grouped-query attention (32 query heads, 8 key/value heads of 64) + SwiGLU 8192,
    final norm."""
    d, vocab, layers, kv, ffn = 2048, 128256, 16, 512, 8192
    shapes = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d,), (d, d), (kv, d), (kv, d), (d, d), (d,), (ffn, d), (ffn, d), (d, ffn)]
    return shapes + [(d,)]


def tensor_lists(quick: bool) -> dict[str, list[tuple[int, ...]]]:
    """GPT-2 124M and 10,000 tiny tensors (quick: GPT-2/16 and 500 tiny tensors)."""
    if quick:
        return {"gpt2-124M/16": [tuple(max(1, x // 4) for x in s) for s in gpt2_shapes()],
                "tiny-500": tiny_shapes(500)}
    return {"gpt2-124M": gpt2_shapes(), "tiny-10k": tiny_shapes(10_000)}


def param_lists(device: torch.device, quick: bool) -> dict[str, list[tuple[int, ...]]]:
    """The optimizer lists: ``tensor_lists`` plus, at full size on a GPU, Llama-1B (parameters,
    gradients and moments take 20 GB), between the two."""
    lists = tensor_lists(quick)
    if quick or device.type != "cuda":
        return lists
    return {"gpt2-124M": lists["gpt2-124M"], "llama-1B": llama_1b_shapes(), "tiny-10k": lists["tiny-10k"]}


def describe(label: str, shapes: list[tuple[int, ...]]) -> str:
    """The shape column of a case: ``label (count tensors, numel M)``."""
    numel = sum(math.prod(s) for s in shapes)
    return f"{label} ({len(shapes)} tensors, {numel / 1e6:.1f}M)"


__all__ = ["describe", "gpt2_shapes", "llama_1b_shapes", "param_lists", "tensor_lists", "tiny_shapes"]
