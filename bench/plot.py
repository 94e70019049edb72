#!/usr/bin/env python
"""Draws PNG charts from bench/results/results.csv: one chart per (device, family, op), for the
latest run of each device; bars are throughput (GB/s or TFLOP/s) per shape and provider, with the
measured ceiling as a dashed line.

    python bench/plot.py [--results bench/results] [--out bench/results/plots]
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:60]


def latest_rows(path: Path) -> dict[str, list[dict]]:
    """{device: rows of that device's latest run (by date)}."""
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("family") not in ("ceiling", None)]
    by_device: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_device[r["device"]].append(r)
    out = {}
    for device, rs in by_device.items():
        last = max(r["date"] for r in rs)
        out[device] = [r for r in rs if r["date"] == last]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    default = Path(os.environ["OUT"]) if os.environ.get("OUT") else HERE / "results"
    p.add_argument("--results", type=Path, default=default)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    csv_path = args.results / "results.csv"
    if not csv_path.exists():
        print(f"no {csv_path}: run `make bench` first", file=sys.stderr)
        return 1
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return 0
    out_dir = args.out or args.results
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for device, rows in latest_rows(csv_path).items():
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for r in rows:
            if r["status"] == "ok":
                groups[(r["family"], r["op"])].append(r)
        for (family, op), rs in sorted(groups.items()):
            use_tflops = any(r["tflops"] for r in rs) and not any(r["gbps"] for r in rs)
            metric, unit = ("tflops", "TFLOP/s") if use_tflops else ("gbps", "GB/s")
            shapes = list(dict.fromkeys(f"{r['shape']} {r['dtype']}" for r in rs))
            providers = list(dict.fromkeys(r["provider"] for r in rs))
            width = 0.8 / max(1, len(providers))
            fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(shapes) * max(1, len(providers)) / 2), 4.5))
            for k, prov in enumerate(providers):
                xs, ys = [], []
                for i, shape in enumerate(shapes):
                    for r in rs:
                        if r["provider"] == prov and f"{r['shape']} {r['dtype']}" == shape and r[metric]:
                            xs.append(i + k * width)
                            ys.append(float(r[metric]))
                ax.bar(xs, ys, width, label=prov)
            ceil = [float(r["ceiling_value"]) for r in rs if r["ceiling_value"]]
            if ceil:
                ax.axhline(max(ceil), color="k", linestyle="--", linewidth=1,
                           label=f"measured {rs[0]['ceiling']} ceiling")
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))])
            ax.set_xticklabels(shapes, rotation=20, ha="right", fontsize=8)
            ax.set_ylabel(unit)
            ax.set_title(f"{family} / {op} on {device}\n{rs[0]['date']}, torch {rs[0]['torch']}, "
                         f"triton {rs[0]['triton']}, commit {rs[0]['commit']}", fontsize=9)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out_dir / f"{slug(device)}_{slug(family)}_{slug(op)}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
