"""The benchmark harness: every op family, providers side by side, ceilings measured in the run.

Method (DESIGN.md, convention 7):
* Each provider's ``setup()`` builds its inputs untimed and returns the function to time.
* Warm-up calls are excluded (compilation, autotuning, allocator growth), then ``reps`` timed
  calls; we report the median and the 20th/80th percentiles.
* GPU: one pair of CUDA events per call, so only device time is measured; inputs are rotated
  (``rotating``) so their footprint exceeds the L2 cache and every call reads from DRAM.
* CPU: wall clock per call (``time.perf_counter``), with the thread count recorded.
* Ceilings measured in the same run (``measure_ceilings``): device-to-device copy bandwidth,
  in-place read-modify-write bandwidth, and bf16 (GPU) / fp32 (CPU) matmul FLOP/s. Each row
  reports its achieved GB/s or TFLOP/s as a fraction of the matching ceiling.
* Speed-ups: every provider against every provider marked ``reference=True`` in the same case.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


class Skip(Exception):
    """Raised by a provider's setup when it cannot run here; the message says why."""


@dataclass
class Provider:
    name: str
    setup: Callable[[], Callable[[], Any]]
    reference: bool = False
    # Compilation-heavy providers (torch.compile, FlexAttention) run after every other provider
    # of every family, so a compile that eats the time budget costs only their own rows.
    # None: decided from the name (is_compile_heavy).
    compile_heavy: bool | None = None


def is_compile_heavy(provider: Provider) -> bool:
    if provider.compile_heavy is not None:
        return provider.compile_heavy
    name = provider.name.lower()
    return "compile" in name or name.startswith("flex")


@dataclass
class Case:
    family: str
    op: str
    shape: str
    dtype: str
    providers: list[Provider]
    bytes: float | None = None
    flops: float | None = None
    ceiling: str = "copy"
    note: str = ""


@dataclass
class Row:
    family: str
    op: str
    shape: str
    dtype: str
    provider: str
    status: str                      # "ok" or "skipped: <reason>" / "error: <message>"
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    gbps: float | None = None
    tflops: float | None = None
    ceiling: str = ""
    ceiling_value: float | None = None   # GB/s for bandwidth ceilings, TFLOP/s for matmul
    frac_of_ceiling: float | None = None
    speedups: dict[str, float] = field(default_factory=dict)
    peak_mem_mb: float | None = None
    reps: int = 0


def peer(module: str, pip_name: str | None = None):
    """Imports a peer library (liger-kernel, lion-pytorch, apex, deepspeed...) or raises Skip."""
    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, or a peer that fails at import (e.g. a CUDA-only build)
        name = pip_name or module
        if isinstance(exc, ImportError) and exc.name in (module, module.split(".")[0]):
            raise Skip(f"{name} not installed") from None
        raise Skip(f"{name} failed to import: {type(exc).__name__}: {exc}") from None


def require_backend(backend: str, device: torch.device) -> None:
    """Raises Skip unless fused_lm's ``backend`` can run on ``device`` as a real backend (the
    Triton interpreter runs kernels on CPU tensors for tests, but is no CPU backend to time)."""
    from fused_lm import _backend

    reason = _backend.unavailable_reason(backend, device)
    if reason:
        raise Skip(reason)
    if backend == "triton" and device.type == "cpu":
        raise Skip("the Triton interpreter is a correctness tool, not a CPU backend")


def cache_bytes(device: torch.device) -> int:
    """Last-level cache size: L2 on a GPU, LLC on the CPU (fallback 32 MiB)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 50 << 20))
    try:
        for idx in (3, 2):
            path = f"/sys/devices/system/cpu/cpu0/cache/index{idx}/size"
            if os.path.exists(path):
                text = open(path).read().strip()
                mult = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
                return int(text.rstrip("KM")) * mult
    except (OSError, ValueError):
        pass
    return 32 << 20


def rotating(make_inputs: Callable[[], Any], footprint_bytes: int, device: torch.device,
             max_copies: int = 8) -> Callable[[], Any]:
    """Returns ``next_inputs()``, cycling through enough independent input sets that together
    exceed twice the last-level cache, so timed calls do not hit data left in cache by the
    previous call. Bounded by ``max_copies`` to cap memory."""
    copies = 1
    if footprint_bytes > 0:
        copies = max(1, min(max_copies, -(-2 * cache_bytes(device) // footprint_bytes)))
    sets = [make_inputs() for _ in range(copies)]
    state = {"i": 0}

    def next_inputs():
        state["i"] = (state["i"] + 1) % len(sets)
        return sets[state["i"]]

    return next_inputs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int,
            max_seconds: float) -> list[float]:
    """Per-call times in milliseconds (device events on CUDA, wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    budget_end = time.perf_counter() + max_seconds
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        done = 0
        for i in range(reps):
            starts[i].record()
            fn()
            ends[i].record()
            done += 1
            if time.perf_counter() > budget_end and done >= 5:
                break
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts[:done], ends[:done])]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            if time.perf_counter() > budget_end and len(times) >= 5:
                break
    return times


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def measure_ceilings(device: torch.device, quick: bool) -> dict[str, float]:
    """Copy and read-modify-write bandwidth (GB/s, bytes read + written) and matmul TFLOP/s,
    measured now on ``device`` with the same timer as the cases."""
    reps, warmup = (10, 2) if quick else (30, 5)
    if device.type == "cuda":
        n = max(cache_bytes(device) * 8, 1 << 30) // 4       # well beyond L2
        mm, mm_dtype = (4096, torch.bfloat16) if quick else (8192, torch.bfloat16)
    else:
        n = max(cache_bytes(device) * 8, 64 << 20) // 4
        mm, mm_dtype = (512, torch.float32) if quick else (1024, torch.float32)
    def median_ms(fn) -> float:
        return statistics.median(time_fn(fn, device, reps, warmup, 10))

    def bandwidth_ms() -> tuple[float, float]:
        src = torch.randn(n, device=device)
        dst = torch.empty_like(src)
        # Read-modify-write in place: each element read once and written once.
        return median_ms(lambda: dst.copy_(src)), median_ms(lambda: src.mul_(1.0000001))

    def matmul_ms() -> float:
        a = torch.randn(mm, mm, device=device, dtype=mm_dtype)
        b = torch.randn(mm, mm, device=device, dtype=mm_dtype)
        return median_ms(lambda: a @ b)

    copy_ms, rmw_ms = bandwidth_ms()
    mm_ms = matmul_ms()
    return {
        "copy": 2 * n * 4 / (copy_ms * 1e-3) / 1e9,     # GB/s, bytes read + written
        "rmw": 2 * n * 4 / (rmw_ms * 1e-3) / 1e9,
        "matmul": 2 * mm**3 / (mm_ms * 1e-3) / 1e12,    # TFLOP/s
        "matmul_dtype": str(mm_dtype).replace("torch.", ""),
    }


def run_case(case: Case, device: torch.device, ceilings: dict[str, float], quick: bool,
             reps: int | None = None, on_row: Callable[[Row], None] | None = None,
             known_refs: dict[str, float] | None = None) -> list[Row]:
    """Times every provider of ``case``; returns the rows in the case's provider order.

    References are measured first, so each row handed to ``on_row`` the moment it is measured
    (bench/run.py saves it then) already carries its speed-ups over them; ``known_refs``
    ({provider: median ms}, e.g. measured by an earlier process of the same run) stands in for
    references not measured here. The returned rows carry every speed-up, also a reference's
    over references measured after it."""
    reps = reps or (10 if quick else 50)
    warmup = 2 if quick else 10
    ref_names = {p.name for p in case.providers if p.reference}
    refs: dict[str, float] = dict(known_refs or {})
    order = sorted(range(len(case.providers)), key=lambda i: not case.providers[i].reference)
    by_index: dict[int, Row] = {}

    def finish(i: int, row: Row) -> None:
        by_index[i] = row
        if row.median_ms and row.provider in ref_names:
            refs[row.provider] = row.median_ms
        if row.median_ms:
            row.speedups = {n: ms / row.median_ms for n, ms in refs.items() if n != row.provider}
        if on_row is not None:
            on_row(row)

    for i in order:
        prov = case.providers[i]
        row = Row(case.family, case.op, case.shape, case.dtype, prov.name, "ok", ceiling=case.ceiling)
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            fn = prov.setup()
            times = time_fn(fn, device, reps, warmup, max_seconds=5 if quick else 20)
            if device.type == "cuda":
                row.peak_mem_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            del fn
        except Skip as exc:
            row.status = f"skipped: {exc}"
            finish(i, row)
            continue
        except Exception as exc:  # a provider failing must not take the run down
            msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            row.status = f"error: {type(exc).__name__}: {msg}"
            finish(i, row)
            continue
        row.reps = len(times)
        row.median_ms = statistics.median(times)
        row.p20_ms, row.p80_ms = _percentile(times, 0.2), _percentile(times, 0.8)
        seconds = row.median_ms * 1e-3
        if case.bytes:
            row.gbps = case.bytes / seconds / 1e9
        if case.flops:
            row.tflops = case.flops / seconds / 1e12
        row.ceiling_value = ceilings.get(case.ceiling)
        if row.ceiling_value:
            achieved = row.tflops if case.ceiling == "matmul" else row.gbps
            if achieved is not None:
                row.frac_of_ceiling = achieved / row.ceiling_value
        finish(i, row)
    rows = [by_index[i] for i in sorted(by_index)]
    for r in rows:
        if r.median_ms:
            r.speedups = {name: ms / r.median_ms for name, ms in refs.items() if name != r.provider}
    return rows


def interleaved_rounds(cases: list[Case], rounds: int = 5, reps: int = 5,
                       device: torch.device = torch.device("cpu")) -> list[str]:
    """``cases`` (each with a "fused_lm" and a "torch-eager" provider) in interleaved rounds (case
    order and provider order alternate between rounds), for a machine whose cores are shared: one
    round's ratio compares providers timed back to back; the table (markdown lines) gives
    per-provider median times, the median ratio to torch-eager and its range over the rounds (the
    noise)."""
    ceilings = measure_ceilings(device, True)
    times: dict = {}
    ratios: dict = {}
    for r in range(rounds):
        for case in (cases if r % 2 == 0 else cases[::-1]):
            order = case.providers if r % 2 == 0 else case.providers[::-1]
            rows = run_case(dataclasses.replace(case, providers=order), device, ceilings, True, reps)
            by = {row.provider: row.median_ms for row in rows if row.median_ms}
            for name, ms in by.items():
                times.setdefault((case.op, case.shape, name), []).append(ms)
            if "fused_lm" in by and "torch-eager" in by:
                ratios.setdefault((case.op, case.shape), []).append(by["torch-eager"] / by["fused_lm"])
            print(f"round {r + 1}/{rounds} {case.op} {case.shape}: "
                  + ", ".join(f"{name} {ms:.1f} ms" for name, ms in by.items()),
                  file=sys.stderr, flush=True)
    lines = [f"CPU rows, {rounds} interleaved rounds of {reps} timed calls, {torch.get_num_threads()} "
             "threads; ms = median over rounds; ratio = torch-eager time / fused_lm time",
             "| case | shape | fused_lm ms | torch-eager ms | ratio | range | others |",
             "|---|---|---|---|---|---|---|"]
    for (op, shape), rs in ratios.items():
        others = ", ".join(f"{name} {statistics.median(v):.1f} ms" for (o, s, name), v in times.items()
                           if (o, s) == (op, shape) and name not in ("fused_lm", "torch-eager"))
        lines.append(f"| {op} | {shape} | {statistics.median(times[(op, shape, 'fused_lm')]):.1f} | "
                     f"{statistics.median(times[(op, shape, 'torch-eager')]):.1f} | "
                     f"{statistics.median(rs):.2f}x | {min(rs):.2f}-{max(rs):.2f} | {others} |")
    return lines


def git_commit() -> str:
    """The checkout's short commit (+"-dirty"); $FUSED_LM_COMMIT where the tree is a copy
    without git (the GPU machine gets the working tree, not the repository)."""
    if os.environ.get("FUSED_LM_COMMIT"):
        return os.environ["FUSED_LM_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10)
        # Results and plots the harness itself writes do not make the measured code dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                ":(top,exclude)bench/results"],
                               capture_output=True, text=True, timeout=10,
                               cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device) -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return {
        "device": name,
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }


def row_dict(row: Row, env: dict[str, Any]) -> dict[str, Any]:
    d = dataclasses.asdict(row)
    d["speedups"] = ";".join(f"{k}={v:.3f}" for k, v in row.speedups.items())
    d.update({k: env[k] for k in ("device", "threads", "torch", "triton", "commit", "date")})
    return d
