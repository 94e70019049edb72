#!/usr/bin/env python
"""Writes README.md's performance tables from bench/results/results.csv (no figure in the README
without a results file behind it).

For every device and family, the rows of the latest run that measured that family become one
markdown table (with that run's date, commit, versions and ceilings):
median time, achieved GB/s or TFLOP/s, fraction of the ceiling measured in the same run, and the
speed-up of each fused_lm provider over each reference. The tables replace whatever stands
between the markers ``<!-- perf:begin -->`` and ``<!-- perf:end -->`` in README.md.

    python bench/report.py [--results bench/results] [--readme README.md] [--print]
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"


def _latest(path: Path):
    """{device: {family: rows of the latest run that measured that family}} and
    {(device, date): {ceiling: value}} (each table is quoted with the ceilings of its own run)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    last: dict[tuple, str] = {}
    for r in rows:
        if r["family"] != "ceiling":
            key = (r["device"], r["family"])
            last[key] = max(last.get(key, ""), r["date"])
    tables: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    ceilings: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in rows:
        if r["family"] == "ceiling":
            ceilings[(r["device"], r["date"])][r["op"]] = float(r["ceiling_value"])
        elif r["date"] == last[(r["device"], r["family"])]:
            tables[r["device"]][r["family"]].append(r)
    return tables, ceilings


def _num(v: str, spec: str) -> str:
    return format(float(v), spec) if v not in ("", None) else "-"


def render(path: Path) -> str:
    tables, ceilings = _latest(path)
    out = []
    for device, families in tables.items():
        out.append(f"#### {device}\n")
        for family, rs in families.items():
            ok = [r for r in rs if r["status"] == "ok"]
            if not ok:
                continue
            # A case's rows together, in the order the cases were first measured (compile-heavy
            # providers are measured after every other case and appended later).
            first: dict[tuple, int] = {}
            for r in ok:
                first.setdefault((r["op"], r["shape"], r["dtype"]), len(first))
            ok.sort(key=lambda r: first[(r["op"], r["shape"], r["dtype"])])
            r0 = ok[0]
            c = ceilings.get((device, r0["date"]), {})
            out.append(f"*{family}*: {r0['date']}, commit `{r0['commit']}`, {r0['threads']} threads, "
                       f"torch {r0['torch']}, triton {r0['triton']}; ceilings of that run: copy "
                       f"{c.get('copy', float('nan')):.1f} GB/s, read-modify-write "
                       f"{c.get('rmw', float('nan')):.1f} GB/s, matmul {c.get('matmul', float('nan')):.2f} TFLOP/s.\n")
            out.append("| op | shape | dtype | provider | median ms | GB/s | TFLOP/s | of ceiling | speed-up |")
            out.append("|---|---|---|---|---:|---:|---:|---:|---|")
            for r in ok:
                frac = f"{float(r['frac_of_ceiling']):.0%}" if r["frac_of_ceiling"] else "-"
                pairs = [kv.split("=") for kv in r["speedups"].split(";") if kv]
                speed = ", ".join(f"{float(x):.2f}x vs {name}" for name, x in pairs)
                out.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['provider']} | "
                           f"{_num(r['median_ms'], '.3f')} | {_num(r['gbps'], '.1f')} | "
                           f"{_num(r['tflops'], '.2f')} | {frac} | {speed} |")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--readme", type=Path, default=HERE.parent / "README.md")
    p.add_argument("--print", action="store_true", help="print the tables instead of editing README.md")
    args = p.parse_args(argv)
    csv_path = args.results / "results.csv"
    if not csv_path.exists():
        print(f"no {csv_path}: run `make bench` first", file=sys.stderr)
        return 1
    tables = render(csv_path)
    if args.print:
        print(tables)
        return 0
    text = args.readme.read_text()
    if BEGIN not in text or END not in text:
        print(f"{args.readme} has no {BEGIN} ... {END} markers", file=sys.stderr)
        return 1
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    args.readme.write_text(f"{head}{BEGIN}\n{tables}{END}{tail}")
    print(f"updated the performance tables of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
