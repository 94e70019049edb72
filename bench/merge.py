#!/usr/bin/env python
"""Appends the results of another run folder (e.g. what `make gpu-check` wrote to $OUT on a GPU
machine) to bench/results/: the CSV rows and the JSON runs, skipping runs already present.

    python bench/merge.py /path/to/returned/files [--into bench/results]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path)
    p.add_argument("--into", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    args.into.mkdir(parents=True, exist_ok=True)
    src_json, dst_json = args.source / "results.json", args.into / "results.json"
    runs = json.loads(dst_json.read_text()) if dst_json.exists() else []
    seen = {(r["environment"]["date"], r["environment"]["device"]) for r in runs}
    new = [r for r in json.loads(src_json.read_text())
           if (r["environment"]["date"], r["environment"]["device"]) not in seen]
    if not new:
        print("nothing new to merge")
        return 0
    dst_json.write_text(json.dumps(runs + new, indent=1))
    dates = {(r["environment"]["date"], r["environment"]["device"]) for r in new}
    with open(args.source / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = [row for row in reader if (row["date"], row["device"]) in dates]
        fields = reader.fieldnames
    dst_csv = args.into / "results.csv"
    header = not dst_csv.exists()
    with open(dst_csv, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if header:
            w.writeheader()
        w.writerows(rows)
    print(f"merged {len(new)} run(s), {len(rows)} rows into {args.into}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
