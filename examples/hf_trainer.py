#!/usr/bin/env python
"""Trains a tiny Llama (random init, built from a config: nothing is downloaded) twice on the same
byte-level text with Hugging Face's Trainer: once stock, once with fused_lm in one line, and
prints the two loss curves side by side (and writes a PNG of both).

    python examples/hf_trainer.py                    # CPU or GPU, 80 steps (~20 s on 2 CPU cores)
    python examples/hf_trainer.py --steps 200 --png loss.png

stock     LlamaForCausalLM(attn_implementation="sdpa"), transformers.Trainer: torch AdamW, a
          clip_grad_norm_ pass before every step, transformers' cross-entropy on the logits.
fused_lm  fused_lm.transformers.apply_fused_lm(model, linear_cross_entropy=True) and
          fused_lm.transformers.FusedLMTrainer: fused_lm attention (padding unpadded into the
          varlen kernel), the loss from the last hidden states by linear cross-entropy (no
          (tokens, vocab) logits in training), fused_lm.optim.AdamW clipping inside its step
          (no separate norm pass; grad_norm logged from the optimizer).

Both runs see the same batches (variable-length rows, right-padded) from the same seed, so the
curves agree to float32 rounding. On a CPU the fused_lm attention runs a PyTorch path (the
Triton kernels need a GPU), so this shows equivalence, not speed: bench/bench_transformers.py
measures speed. ``--json`` ends with one JSON line (tests/transformers/test_example.py reads it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

_REPO = Path(__file__).resolve().parents[1]
if (_REPO / "fused_lm" / "__init__.py").exists() and str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))   # run from a checkout without installing the package


def byte_rows(n_rows: int, max_len: int, seed: int) -> list[dict]:
    """Rows of 8..max_len bytes of text (this file and the README), as token ids 1..255 (0 pads)."""
    text = Path(__file__).read_bytes()
    readme = _REPO / "README.md"
    if readme.exists():
        text += readme.read_bytes()
    data = torch.tensor([b if b else 32 for b in text], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_rows):
        n = int(torch.randint(8, max_len + 1, (1,), generator=g))
        start = int(torch.randint(0, len(data) - n, (1,), generator=g))
        rows.append({"input_ids": data[start:start + n]})
    return rows


def collate(rows: list[dict]) -> dict:
    """Right-pads to the longest row: attention_mask 0 and labels -100 on padding."""
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r["input_ids"])] = r["input_ids"]
        mask[i, :len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=0, attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(args.device)


def train(args, fused: bool) -> dict:
    from transformers import PrinterCallback, Trainer, TrainingArguments

    model = build_model(args)
    trainer_cls = Trainer
    if fused:
        import fused_lm.transformers as flt

        flt.apply_fused_lm(model, linear_cross_entropy=True)     # the one line
        trainer_cls = flt.FusedLMTrainer
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr, weight_decay=0.1, warmup_steps=args.steps // 10,
            lr_scheduler_type="cosine", max_grad_norm=1.0, logging_steps=1, save_strategy="no",
            report_to=[], seed=args.seed, data_seed=args.seed, disable_tqdm=True,
            use_cpu=args.device == "cpu", dataloader_num_workers=0)
        trainer = trainer_cls(model=model, args=targs, data_collator=collate,
                              train_dataset=byte_rows(args.steps * args.batch_size, args.max_len, args.seed))
        trainer.remove_callback(PrinterCallback)                  # the table below says it all
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    return {"loss": [float(h["loss"]) for h in logs],
            "grad_norm": [float(h["grad_norm"]) for h in logs if "grad_norm" in h],
            "seconds": seconds, "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
            "attention": model.config._attn_implementation}


def plot(stock: dict, fused: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = range(1, len(stock["loss"]) + 1)
    ax.plot(steps, stock["loss"], label="stock transformers", linewidth=3, alpha=0.5)
    ax.plot(steps, fused["loss"], label="apply_fused_lm + FusedLMTrainer", linestyle="--")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats/byte)")
    ax.set_title("tiny Llama, byte-level text: stock vs fused_lm")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png", type=Path, default=Path("hf_trainer_loss.png"))
    p.add_argument("--json", action="store_true", help="end with a JSON summary line")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*right-padding.*")

    stock = train(args, fused=False)
    fused = train(args, fused=True)
    print(f"{'step':>4}  {'stock loss':>10}  {'fused_lm loss':>13}  {'stock |g|':>9}  {'fused |g|':>9}")
    for i, (a, b) in enumerate(zip(stock["loss"], fused["loss"])):
        if i % max(1, len(stock["loss"]) // 20) == 0 or i == len(stock["loss"]) - 1:
            ga = stock["grad_norm"][i] if i < len(stock["grad_norm"]) else float("nan")
            gb = fused["grad_norm"][i] if i < len(fused["grad_norm"]) else float("nan")
            print(f"{i + 1:4d}  {a:10.4f}  {b:13.4f}  {ga:9.4f}  {gb:9.4f}")
    diff = max(abs(a - b) / abs(a) for a, b in zip(stock["loss"], fused["loss"]))
    print(f"largest relative loss difference: {diff:.2e}; stock {stock['seconds']:.1f} s "
          f"({stock['optimizer']}), fused_lm {fused['seconds']:.1f} s ({fused['optimizer']}, "
          f"attention {fused['attention']})")
    png = plot(stock, fused, args.png)
    print(f"loss curves written to {png}" if png else "matplotlib is not installed: no PNG")
    summary = {"stock": stock, "fused": fused, "max_rel_loss_diff": diff, "png": png}
    if args.json:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
