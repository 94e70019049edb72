#!/usr/bin/env python
"""Trains a tiny character-level GPT (nanoGPT-shaped, ~0.8M parameters) with every fused_lm piece
that is available, and prints what it used and the loss as it falls.

    python examples/train_tiny_gpt.py                       # CPU or GPU, 300 steps (~15 s on 2 CPU cores)
    python examples/train_tiny_gpt.py --steps 500 --device cuda

Pieces (each imported on its own; a missing one falls back to torch and says so):

    optimizer       fused_lm.optim.AdamW over fused_lm.optim.param_groups (no decay on biases and
                    norm weights), with fused_lm.optim.lr_scheduler.warmup_cosine
    clipping        fused_lm.clip_grad_norm_ (one multi-tensor norm + one scale, no host sync)
    loss            fused_lm.nn.functional.linear_cross_entropy: the LM head (tied to the token
                    embedding) and the loss in one, the (tokens, vocab) logits never stored;
                    else fused_lm.nn.functional.cross_entropy on the logits
    attention       fused_lm.nn.functional.scaled_dot_product_attention (causal)

Which kernel runs underneath is fused_lm's backend choice (fused_lm/_backend.py): on a GPU the
Triton/CUDA kernels; on CPU tensors the C++ CPU kernels where they exist and plain PyTorch paths
otherwise (the Triton kernels run on the CPU only under TRITON_INTERPRET=1, far too slowly to
train). The line "backends:" says what was chosen.

The data is the text at the bottom of this file plus this file's own source, split 90/10 into
train and validation; the validation loss on fixed batches is printed before and after training.
``--json`` ends with one JSON line (tests/test_examples.py reads it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

_REPO = Path(__file__).resolve().parents[1]
if (_REPO / "fused_lm" / "__init__.py").exists() and str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))   # run from a checkout without installing the package


# ------------------------------------------------------------------------------------------------
# The fused pieces, each found on its own.

class Pieces:
    """What this run uses for each piece, and why when it is torch's."""

    def __init__(self) -> None:
        self.used: dict[str, str] = {}
        self.sdpa = self._find("attention", "fused_lm.nn.functional", "scaled_dot_product_attention",
                               F.scaled_dot_product_attention,
                               "torch.nn.functional.scaled_dot_product_attention")
        self.linear_ce = self._find("loss", "fused_lm.nn.functional", "linear_cross_entropy", None, None)
        if self.linear_ce is None:
            self.cross_entropy = self._find("loss", "fused_lm.nn.functional", "cross_entropy",
                                            _torch_cross_entropy, "torch.nn.functional.cross_entropy")
        self.clip = self._find("clipping", "fused_lm", "clip_grad_norm_", nn.utils.clip_grad_norm_,
                               "torch.nn.utils.clip_grad_norm_")
        self.adamw = self._find("optimizer", "fused_lm.optim", "AdamW", torch.optim.AdamW,
                                "torch.optim.AdamW")
        self.param_groups = self._find("param groups", "fused_lm.optim", "param_groups",
                                       _torch_param_groups, "a local decay/no-decay split")
        try:
            from fused_lm.optim.lr_scheduler import warmup_cosine

            self.schedule = warmup_cosine
            self.used["schedule"] = "fused_lm.optim.lr_scheduler.warmup_cosine"
        except ImportError as exc:
            self.schedule = _torch_warmup_cosine
            self.used["schedule"] = f"torch LambdaLR (fused_lm's is missing: {exc})"

    def _find(self, piece: str, module: str, name: str, fallback, fallback_name):
        try:
            mod = __import__(module, fromlist=[name])
            fn = getattr(mod, name)
            self.used[piece] = f"{module}.{name}"
            return fn
        except (ImportError, AttributeError) as exc:
            if fallback is not None:
                self.used[piece] = f"{fallback_name} (fused_lm's {name} is missing: {exc})"
            return fallback

    def fused(self, piece: str) -> bool:
        return self.used.get(piece, "").startswith("fused_lm")


def _torch_cross_entropy(logits, targets):
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten())


def _torch_param_groups(model, weight_decay):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _torch_warmup_cosine(optimizer, warmup_steps, total_steps, min_lr_ratio=0.1):
    def factor(s):
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        t = min(1.0, (s - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def backends(device: torch.device) -> dict[str, str]:
    """The backend fused_lm's dispatcher picks for each op on ``device`` (float32)."""
    try:
        from fused_lm import _backend
    except ImportError:
        return {}
    out = {}
    for op in ("adamw", "multi_tensor_norm", "cross_entropy", "linear_cross_entropy", "attention"):
        if op in _backend.OPS:
            try:
                out[op] = _backend.select(op, device, torch.float32)
            except (RuntimeError, ValueError, TypeError) as exc:
                out[op] = f"unavailable: {exc}"
    return out


# ------------------------------------------------------------------------------------------------
# The model: GPT-2's block (pre-norm, causal self-attention, 4x GELU MLP), tied embedding.

class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, sdpa) -> None:
        super().__init__()
        self.n_head, self.sdpa = n_head, sdpa
        self.ln_1 = nn.LayerNorm(n_embd)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.mlp_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)              # (B, T, C) each
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = self.sdpa(q, k, v, is_causal=True)                           # (B, H, T, D)
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, block_size: int, n_layer: int, n_head: int, n_embd: int,
                 pieces: Pieces) -> None:
        super().__init__()
        self.pieces = pieces
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, pieces.sdpa) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.apply(self._init)
        for name, p in self.named_parameters():   # GPT-2: scaled init of the residual projections
            if name.endswith(("c_proj.weight", "mlp_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-character cross-entropy; idx, targets (B, T) int64."""
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)                                                 # (B, T, C)
        if self.pieces.linear_ce is not None:   # head tied to wte, logits never materialised
            return self.pieces.linear_ce(x.flatten(0, 1), self.wte.weight, targets.flatten())
        logits = x @ self.wte.weight.T                                   # (B, T, V)
        return self.pieces.cross_entropy(logits.flatten(0, 1), targets.flatten())


# ------------------------------------------------------------------------------------------------
# Data and training.

def corpus() -> str:
    return TEXT + "\n" + Path(__file__).read_text()


def batch(data: torch.Tensor, batch_size: int, block_size: int, gen: torch.Generator,
          device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, data.numel() - block_size - 1, (batch_size,), generator=gen)
    x = torch.stack([data[s:s + block_size] for s in starts.tolist()])
    y = torch.stack([data[s + 1:s + 1 + block_size] for s in starts.tolist()])
    return x.to(device), y.to(device)


@torch.no_grad()
def evaluate(model: TinyGPT, val_batches) -> float:
    model.eval()
    losses = [model.loss(x, y).float().item() for x, y in val_batches]
    model.train()
    return sum(losses) / len(losses)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default steps // 10)")
    p.add_argument("--clip", type=float, default=1.0, help="max gradient norm")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="end with a JSON summary line")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.n_embd % args.n_head:
        p.error("--n-embd must be a multiple of --n-head")

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    pieces = Pieces()
    text = corpus()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    split = int(0.9 * data.numel())
    train, val = data[:split], data[split:]

    model = TinyGPT(len(chars), args.block_size, args.n_layer, args.n_head, args.n_embd,
                    pieces).to(device)
    optimizer = pieces.adamw(pieces.param_groups(model, args.weight_decay), lr=args.lr,
                             betas=(0.9, 0.95))
    warmup = args.steps // 10 if args.warmup is None else args.warmup
    scheduler = pieces.schedule(optimizer, warmup, args.steps)

    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny GPT: {n_params / 1e6:.2f}M parameters, vocab {len(chars)}, {len(text)} characters, "
          f"device {device}, {args.steps} steps")
    for piece, what in pieces.used.items():
        print(f"  {piece:13s} {what}")
    print(f"  backends:     {backends(device)}")

    gen = torch.Generator().manual_seed(args.seed + 1)
    val_gen = torch.Generator().manual_seed(12345)
    val_batches = [batch(val, args.batch_size, args.block_size, val_gen, device) for _ in range(4)]
    val_start = evaluate(model, val_batches)
    print(f"step    0  val loss {val_start:.4f}  (uniform over the vocabulary: {math.log(len(chars)):.4f})")

    losses: list[float] = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = batch(train, args.batch_size, args.block_size, gen, device)
        loss = model.loss(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = pieces.clip(model.parameters(), args.clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % args.log_every == 0 or step == args.steps:
            ms = (time.perf_counter() - start) / step * 1e3
            print(f"step {step:4d}  train loss {losses[-1]:.4f}  grad norm {float(norm):.3f}  "
                  f"lr {scheduler.get_last_lr()[0]:.2e}  {ms:.0f} ms/step")
    seconds = time.perf_counter() - start
    val_end = evaluate(model, val_batches)
    print(f"val loss {val_start:.4f} -> {val_end:.4f} after {args.steps} steps in {seconds:.1f} s")
    summary = dict(steps=args.steps, device=str(device), params=n_params, used=pieces.used,
                   backends=backends(device), train_losses=losses, val_start=val_start,
                   val_end=val_end, seconds=seconds)
    if args.json:
        print(json.dumps(summary))
    return summary


TEXT = """\
The optimizer reads every parameter, its gradient and two moments, and writes the parameter and
the moments back: twenty-eight bytes for each float32 weight, whatever the arithmetic. A step is
therefore a question of memory traffic, and the fastest step is the one that touches each byte
once, in as few launches as the hardware allows.

Attention is a softmax over scores that are never stored: the kernel walks the keys in blocks,
keeping a running maximum and a running sum, and rescales what it has accumulated whenever the
maximum grows. The same trick serves the loss, where the logits of a large vocabulary would
otherwise fill the memory of the device many times over.

A small model learns the shape of the text first: which letters follow which, where the spaces
fall, how lines end. Then words, then the rhythm of sentences. With a few hundred steps it will
not write anything worth reading, but its loss will fall, and that is what this example shows.
"""


if __name__ == "__main__":
    main()
