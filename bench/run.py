#!/usr/bin/env python
"""Runs the benchmark families side by side, saving and printing each row the moment it is measured.

    python bench/run.py                 # every family, default device, quick on CPU / full on GPU
    python bench/run.py --quick         # small sizes (about a minute)
    python bench/run.py --only adamw,lion,cross_entropy --device cuda --out results_dir

Rows go to <out>/results.csv and <out>/results.json (default bench/results, or $OUT when set)
with the device, torch/triton versions, commit and date, one row at a time: the CSV line is
appended and the JSON file atomically replaced as soon as a provider's timing is done, so a run
stopped at any point (SIGTERM, SIGINT, a time limit, a crash in a later case) leaves every
finished row in both files, and results.json always parses. SIGTERM/SIGINT stop the run between
rows (a row being written is completed first) and exit with 128 + the signal number.

Compile-heavy providers (torch.compile, FlexAttention: harness.is_compile_heavy) run after every
other provider of every selected family (``--providers light`` / ``heavy`` runs one half alone).
``--run DATE`` joins the run of that date: its ceilings are reused and its rows extended, which is
how `make gpu-check` keeps one run over one process per family. `python bench/plot.py` draws the
PNG charts.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import json
import os
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository root: `bench` and `fused_lm` import from it

import torch  # noqa: E402

from bench import harness  # noqa: E402

# One per op family, named as its SPEC (bench/bench_<family>.py), cheapest first; then the
# end-to-end transformers step.
FAMILIES = ["multi_tensor_scale", "multi_tensor_clamp", "multi_tensor_norm", "adamw", "lion",
            "cross_entropy", "linear_cross_entropy", "attention", "transformers"]
# The names --only took before the families were named as their specs (still accepted).
FAMILY_ALIASES = {"multi_tensor": ["multi_tensor_scale", "multi_tensor_clamp"],
                  "optim": ["adamw", "lion"], "clip": ["multi_tensor_norm"]}


def expand_families(names: list[str]) -> list[str]:
    """``names`` with the earlier names replaced by the families they became, in order, once each."""
    out: list[str] = []
    for name in names:
        for fam in FAMILY_ALIASES.get(name, [name]):
            if fam not in out:
                out.append(fam)
    return out
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


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


HEADER = (f"{'op':22s} {'shape':28s} {'dtype':5s} {'provider':22s} {'median ms':>10s} "
          f"{'p20':>9s} {'p80':>9s} {'GB/s':>8s} {'TFLOP/s':>8s} {'of ceil':>7s} "
          f"{'mem MB':>8s}  speed-up vs refs")


def format_row(r: harness.Row) -> str:
    if r.status != "ok":
        return f"{r.op:22s} {r.shape:28s} {r.dtype:5s} {r.provider:22s} {r.status}"
    sp = "  ".join(f"{k}: {v:.2f}x" for k, v in r.speedups.items())
    frac = "-" if r.frac_of_ceiling is None else f"{r.frac_of_ceiling:.0%}"
    return (f"{r.op:22s} {r.shape:28s} {r.dtype:5s} {r.provider:22s} {fmt(r.median_ms, '10.4f')} "
            f"{fmt(r.p20_ms, '9.4f')} {fmt(r.p80_ms, '9.4f')} {fmt(r.gbps, '8.1f')} "
            f"{fmt(r.tflops, '8.2f')} {frac:>7s} {fmt(r.peak_mem_mb, '8.1f')}  {sp}")


def print_rows(rows: list[harness.Row], file=sys.stdout) -> None:
    print(HEADER, file=file)
    print("-" * len(HEADER), file=file)
    last = None
    for r in rows:
        key = (r.op, r.shape, r.dtype)
        if last is not None and key != last:
            print(file=file)
        last = key
        print(format_row(r), file=file)


def csv_fields(env: dict) -> list[str]:
    return list(harness.row_dict(harness.Row("", "", "", "", "", ""), env).keys())


class ResultsWriter:
    """Appends one run's rows to <out>/results.csv and results.json, one row at a time.

    results.json is a list of runs ({"environment", "ceilings", "rows"}); it is rewritten whole
    into a temporary file and renamed over the old one after every row, so it is valid JSON at
    every instant. A run is identified by (date, device): a writer whose environment matches an
    existing run continues it (same ceilings, rows appended)."""

    def __init__(self, out: Path, env: dict):
        self.out = out
        self.env = env
        out.mkdir(parents=True, exist_ok=True)
        self.csv_path = out / "results.csv"
        self.json_path = out / "results.json"
        self.runs = json.loads(self.json_path.read_text()) if self.json_path.exists() else []
        self.run = next((r for r in self.runs if r["environment"]["date"] == env["date"]
                         and r["environment"]["device"] == env["device"]), None)
        self.fields = csv_fields(env)
        if self.csv_path.exists() and self.csv_path.stat().st_size > 0:
            with open(self.csv_path, newline="") as f:
                self.fields = next(csv.reader(f), self.fields)

    @property
    def ceilings(self) -> dict | None:
        return self.run["ceilings"] if self.run is not None else None

    def rows_of_run(self) -> list[dict]:
        return self.run["rows"] if self.run is not None else []

    def start(self, ceilings: dict) -> None:
        """Opens a new run with the ceilings measured for it (written as rows of family 'ceiling')."""
        self.run = {"environment": self.env, "ceilings": ceilings, "rows": []}
        self.runs.append(self.run)
        rows = []
        for name in ("copy", "rmw", "matmul"):
            rows.append({"family": "ceiling", "op": name, "shape": "",
                         "dtype": ceilings.get("matmul_dtype", "") if name == "matmul" else "fp32",
                         "provider": "torch", "status": "ok", "ceiling": name,
                         "ceiling_value": ceilings[name],
                         **{k: self.env[k] for k in ("device", "threads", "torch", "triton", "commit", "date")}})
        self._save(rows)

    def add(self, row: harness.Row) -> None:
        self._save([harness.row_dict(row, self.env)])

    def _save(self, dicts: list[dict]) -> None:
        # A stop signal arriving while both files are written is held until they are (then it
        # stops the run). Blocking the signal with pthread_sigmask is not enough: a signal that
        # reached the process just before has already tripped Python's flag, and its handler
        # would run between two bytecodes in here (after the CSV row, before results.json).
        _HOLD["depth"] += 1
        try:
            new = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
            with open(self.csv_path, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
                if new:
                    w.writeheader()
                w.writerows(dicts)
                f.flush()
                os.fsync(f.fileno())
            if dicts and dicts[0]["family"] != "ceiling":
                self.run["rows"].extend(dicts)
            tmp = self.json_path.with_name(self.json_path.name + ".tmp")
            tmp.write_text(json.dumps(self.runs, indent=1))
            os.replace(tmp, self.json_path)
        finally:
            _HOLD["depth"] -= 1
        if _HOLD["depth"] == 0 and _HOLD["pending"] is not None:
            signum, _HOLD["pending"] = _HOLD["pending"], None
            raise Stopped(signum)


# Signal held while a row is written: {"depth": nesting of _save, "pending": signal number}.
_HOLD: dict = {"depth": 0, "pending": None}


class Stopped(BaseException):
    """A stop signal (BaseException, like KeyboardInterrupt: a provider's `except Exception` must
    not turn it into an error row)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum, frame):
    if _HOLD["depth"]:
        _HOLD["pending"] = _HOLD["pending"] or signum
        return
    raise Stopped(signum)


def select_providers(case: harness.Case, which: str, known: dict[str, float]) -> harness.Case | None:
    """The case with the providers of this pass: 'light' drops compile-heavy providers; 'heavy'
    keeps them plus the references not yet measured in this run (needed for their speed-ups)."""
    if which == "all":
        return case
    heavy = [p for p in case.providers if harness.is_compile_heavy(p)]
    if which == "light":
        keep = [p for p in case.providers if not harness.is_compile_heavy(p)]
    else:
        if not heavy:
            return None
        keep = [p for p in case.providers
                if harness.is_compile_heavy(p) or (p.reference and p.name not in known)]
    return dataclasses.replace(case, providers=keep) if keep else None


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
    p.add_argument("--providers", choices=("all", "light", "heavy"), default="all",
                   help="all (compile-heavy ones last), or one half alone")
    p.add_argument("--run", default=None, metavar="DATE",
                   help="the run's date (UTC, 2026-01-31T12:00:00Z): join that run if it exists")
    p.add_argument("--time-limit", type=float, default=None, metavar="S",
                   help="start no new case after S seconds from the start (the first case always "
                        "starts when S > 0; 0 starts none)")
    p.add_argument("--no-table", action="store_true", help="do not write <out>/latest_<device>.txt")
    args = p.parse_args(argv)

    for sig in STOP_SIGNALS:
        signal.signal(sig, _raise_stopped)
    started = time.monotonic()
    device = torch.device(args.device)
    quick = args.quick or (device.type == "cpu" and not args.full)
    families = expand_families([f for f in (args.only.split(",") if args.only else FAMILIES) if f])
    env = harness.environment(device)
    if args.run:
        env["date"] = args.run
    out = args.out or default_out()
    writer = None if args.no_save else ResultsWriter(out, env)
    saved: list[harness.Row] = []
    try:
        print(f"# fused_lm benchmarks on {env['device']} ({device.type}, {env['threads']} threads), "
              f"torch {env['torch']}, triton {env['triton']}, commit {env['commit']}, run {env['date']}, "
              f"{'quick' if quick else 'full'} sizes, providers: {args.providers}", flush=True)
        ceilings = writer.ceilings if writer is not None else None
        if ceilings is None:
            ceilings = harness.measure_ceilings(device, quick)
            if writer is not None:
                writer.start(ceilings)
            origin = "measured now"
        else:
            origin = "of this run, measured by its first process"
        print(f"# ceilings {origin}: copy {ceilings['copy']:.1f} GB/s, read-modify-write "
              f"{ceilings['rmw']:.1f} GB/s, {ceilings['matmul_dtype']} matmul {ceilings['matmul']:.2f} TFLOP/s",
              flush=True)

        cases: list[harness.Case] = []
        for fam in families:
            mod = load_family(fam)
            if mod is None:
                print(f"# family {fam}: no bench/bench_{fam}.py yet, skipped", flush=True)
                continue
            cases += mod.cases(device, quick)
        passes = ["light", "heavy"] if args.providers == "all" else [args.providers]
        print(HEADER, flush=True)

        def on_row(row: harness.Row) -> None:
            if writer is not None:
                writer.add(row)
            saved.append(row)
            print(format_row(row), flush=True)

        stopped_by_limit = False
        first = True
        for which in passes:
            for case in cases:
                if args.time_limit is not None and (args.time_limit <= 0 or not first) \
                        and time.monotonic() - started > args.time_limit:
                    stopped_by_limit = True
                    break
                key = (case.family, case.op, case.shape, case.dtype)
                known = {}
                if which == "heavy":
                    # References measured earlier in this run (this process or an earlier one).
                    for r in (writer.rows_of_run() if writer is not None else []):
                        if (r["family"], r["op"], r["shape"], r["dtype"]) == key and r["median_ms"]:
                            known[r["provider"]] = r["median_ms"]
                    for r in saved:
                        if (r.family, r.op, r.shape, r.dtype) == key and r.median_ms:
                            known[r.provider] = r.median_ms
                    ref_names = {pr.name for pr in case.providers if pr.reference}
                    known = {k: v for k, v in known.items() if k in ref_names}
                sub = select_providers(case, which, known)
                if sub is not None:
                    first = False
                    harness.run_case(sub, device, ceilings, quick, args.reps, on_row=on_row,
                                     known_refs=known)
            if stopped_by_limit:
                print(f"# time limit of {args.time_limit:g} s reached: no further case started", flush=True)
                break
    except Stopped as exc:
        print(f"# stopped by {exc}: {len(saved)} finished row(s) saved"
              + (f" in {out}" if writer is not None else ""), flush=True)
        return 128 + exc.signum
    if writer is not None:
        if not args.no_table:
            with open(out / f"latest_{device.type}.txt", "w") as f:
                f.write(f"# {env}\n# ceilings: {ceilings}\n")
                print_rows(saved, file=f)
        print(f"# appended {len(saved)} rows to {out / 'results.csv'} and {out / 'results.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
