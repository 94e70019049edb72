#!/usr/bin/env python
"""Runs the benchmark families side by side and prints the table.

    python bench/run.py                 # every family, default device, quick on CPU / full on GPU
    python bench/run.py --quick         # small sizes (about a minute)
    python bench/run.py --only optim,cross_entropy --device cuda --out results_dir

Rows are appended to <out>/results.csv and <out>/results.json (default bench/results, or $OUT
when set) with the device, torch/triton versions, commit and date; `python bench/plot.py` draws
the PNG charts.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository root: `bench` and `fused_lm` import from it

import torch  # noqa: E402

from bench import harness  # noqa: E402

FAMILIES = ["multi_tensor", "optim", "clip", "cross_entropy", "attention", "transformers"]


def default_out() -> Path:
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else HERE / "results"


def load_family(name: str):
    try:
        return importlib.import_module(f"bench.bench_{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"bench.bench_{name}":
            return None
        raise


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_rows(rows: list[harness.Row], file=sys.stdout) -> None:
    header = (f"{'op':22s} {'shape':28s} {'dtype':5s} {'provider':22s} {'median ms':>10s} "
              f"{'p20':>9s} {'p80':>9s} {'GB/s':>8s} {'TFLOP/s':>8s} {'of ceil':>7s} "
              f"{'mem MB':>8s}  speed-up vs refs")
    print(header, file=file)
    print("-" * len(header), file=file)
    last = None
    for r in rows:
        key = (r.op, r.shape, r.dtype)
        if last is not None and key != last:
            print(file=file)
        last = key
        if r.status != "ok":
            print(f"{r.op:22s} {r.shape:28s} {r.dtype:5s} {r.provider:22s} {r.status}", file=file)
            continue
        sp = "  ".join(f"{k}: {v:.2f}x" for k, v in r.speedups.items())
        frac = "-" if r.frac_of_ceiling is None else f"{r.frac_of_ceiling:.0%}"
        print(f"{r.op:22s} {r.shape:28s} {r.dtype:5s} {r.provider:22s} {fmt(r.median_ms, '10.4f')} "
              f"{fmt(r.p20_ms, '9.4f')} {fmt(r.p80_ms, '9.4f')} {fmt(r.gbps, '8.1f')} "
              f"{fmt(r.tflops, '8.2f')} {frac:>7s} {fmt(r.peak_mem_mb, '8.1f')}  {sp}", file=file)


def append_results(out: Path, rows: list[harness.Row], env: dict, ceilings: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    dicts = [harness.row_dict(r, env) for r in rows]
    for name in ("copy", "rmw", "matmul"):
        dicts.append({"family": "ceiling", "op": name, "shape": "", "dtype": ceilings.get("matmul_dtype", "")
                      if name == "matmul" else "fp32", "provider": "torch", "status": "ok",
                      "ceiling": name, "ceiling_value": ceilings[name],
                      **{k: env[k] for k in ("device", "threads", "torch", "triton", "commit", "date")}})
    csv_path = out / "results.csv"
    fields = list(harness.row_dict(harness.Row("", "", "", "", "", ""), env).keys())
    new = not csv_path.exists()
    with open(csv_path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(dicts)
    json_path = out / "results.json"
    runs = json.loads(json_path.read_text()) if json_path.exists() else []
    runs.append({"environment": env, "ceilings": ceilings, "rows": dicts})
    json_path.write_text(json.dumps(runs, indent=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes (default on CPU)")
    size.add_argument("--full", action="store_true", help="the issues' realistic sizes (default on GPU)")
    p.add_argument("--only", default="", help="comma-separated families: " + ", ".join(FAMILIES))
    p.add_argument("--out", type=Path, default=None, help="results folder (default $OUT or bench/results)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per provider")
    p.add_argument("--no-save", action="store_true", help="print only")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    quick = args.quick or (device.type == "cpu" and not args.full)
    families = [f for f in (args.only.split(",") if args.only else FAMILIES) if f]
    env = harness.environment(device)
    print(f"# fused_lm benchmarks on {env['device']} ({device.type}, {env['threads']} threads), "
          f"torch {env['torch']}, triton {env['triton']}, commit {env['commit']}, {env['date']}, "
          f"{'quick' if quick else 'full'} sizes")
    ceilings = harness.measure_ceilings(device, quick)
    print(f"# ceilings measured now: copy {ceilings['copy']:.1f} GB/s, read-modify-write "
          f"{ceilings['rmw']:.1f} GB/s, {ceilings['matmul_dtype']} matmul {ceilings['matmul']:.2f} TFLOP/s")

    cases = []
    for fam in families:
        mod = load_family(fam)
        if mod is None:
            print(f"# family {fam}: no bench/bench_{fam}.py yet, skipped")
            continue
        cases += mod.cases(device, quick)
    try:
        from tqdm import tqdm

        iterator = tqdm(cases, desc="bench", unit="case", file=sys.stderr, disable=not sys.stderr.isatty())
    except ImportError:
        iterator = cases
    rows: list[harness.Row] = []
    for case in iterator:
        rows += harness.run_case(case, device, ceilings, quick, args.reps)
    print_rows(rows)
    if not args.no_save:
        out = args.out or default_out()
        append_results(out, rows, env, ceilings)
        with open(out / f"latest_{device.type}.txt", "w") as f:
            f.write(f"# {env}\n# ceilings: {ceilings}\n")
            print_rows(rows, file=f)
        print(f"# appended {len(rows)} rows to {out / 'results.csv'} and {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
