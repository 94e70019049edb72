"""The tooling of `make gpu-check`, on the CPU: the dry run walks every stage and leaves the eight
named files in $OUT; a benchmark run stopped by SIGTERM keeps every finished row; runs are joined
across processes; setup.py finds the static CUDA runtime wherever the toolkit keeps it."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OUT_FILES = {"preflight.log", "build.log", "smoke.log", "tests.log", "tests.xml", "bench.log",
             "results.csv", "results.json"}


def _env(**extra) -> dict:
    """The environment of a user's shell: no interpreter switch (tests/conftest.py sets it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    env.update(extra)
    return env


def _data_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r["family"] != "ceiling"]


def test_bench_killed_after_first_row_keeps_it():
    """SIGTERM right after the first row is printed: the process exits 143 and results.csv and
    results.json (valid) hold every row it printed."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        proc = subprocess.Popen(
            [sys.executable, "bench/run.py", "--only", "multi_tensor_scale", "--quick", "--reps", "3",
             "--out", str(out), "--no-table"],
            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        printed, header_seen, deadline = [], False, time.monotonic() + 120
        try:
            for line in proc.stdout:
                if line.startswith("op ") and "provider" in line:
                    header_seen = True
                elif header_seen and line.strip() and not line.startswith(("#", "-")):
                    printed.append(line.split())
                    proc.send_signal(signal.SIGTERM)
                    break
                assert time.monotonic() < deadline, "no row within 120 s"
            rest = proc.communicate(timeout=60)[0]
        finally:
            if proc.poll() is None:
                proc.kill()
        assert printed, "bench/run.py printed no row"
        assert proc.returncode == 128 + signal.SIGTERM, rest
        assert "stopped by SIGTERM" in rest
        rows = _data_rows(out / "results.csv")
        assert len(rows) >= 1
        first = printed[0]
        assert rows[0]["op"] == first[0] and rows[0]["provider"] in first
        runs = json.loads((out / "results.json").read_text())
        assert len(runs) == 1 and len(runs[0]["rows"]) == len(rows)
        assert [r["provider"] for r in runs[0]["rows"]] == [r["provider"] for r in rows]
        assert not list(out.glob("*.tmp"))


def test_signal_tripped_during_a_row_write_is_held_until_both_files_are_written(tmp_path,
                                                                                monkeypatch):
    """Deterministic twin of the test above: Python runs a signal handler between two bytecodes,
    so a SIGTERM that reached the process just before a row is written runs its handler inside
    the write (here: right after the CSV row is synced). The row must still reach results.json,
    and the stop must come after it."""
    import bench.run as run
    from bench import harness

    env = harness.environment(__import__("torch").device("cpu"))
    writer = run.ResultsWriter(tmp_path, env)
    writer.start({"copy": 1.0, "rmw": 1.0, "matmul": 1.0, "matmul_dtype": "fp32"})
    real_fsync = os.fsync

    def fsync_then_signal(fd):
        real_fsync(fd)
        run._raise_stopped(signal.SIGTERM, None)  # what Python does at the next bytecode

    monkeypatch.setattr(run.os, "fsync", fsync_then_signal)
    row = harness.Row("multi_tensor_scale", "scale", "s", "fp32", "torch", "ok")
    with pytest.raises(run.Stopped) as exc:
        writer.add(row)
    assert exc.value.signum == signal.SIGTERM
    rows = _data_rows(tmp_path / "results.csv")
    runs = json.loads((tmp_path / "results.json").read_text())
    assert len(rows) == 1 and len(runs[0]["rows"]) == 1
    assert run._HOLD == {"depth": 0, "pending": None}
    monkeypatch.setattr(run.os, "fsync", real_fsync)
    writer.add(row)  # the next row is written normally
    assert len(_data_rows(tmp_path / "results.csv")) == 2


def test_bench_processes_join_one_run(tmp_path):
    """--run DATE: the second process reuses the first one's ceilings and run entry."""
    cmd = [sys.executable, "bench/run.py", "--only", "multi_tensor_scale", "--quick", "--out", str(tmp_path),
           "--no-table", "--run", "2026-01-02T03:04:05Z", "--time-limit", "0"]
    first = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=180)
    assert first.returncode == 0, first.stdout + first.stderr
    second = subprocess.run(cmd + ["--providers", "heavy"], cwd=REPO, env=_env(), capture_output=True,
                            text=True, timeout=180)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "measured now" in first.stdout and "of this run" in second.stdout
    runs = json.loads((tmp_path / "results.json").read_text())
    assert len(runs) == 1 and runs[0]["environment"]["date"] == "2026-01-02T03:04:05Z"
    with open(tmp_path / "results.csv", newline="") as f:
        ceilings = [r for r in csv.DictReader(f) if r["family"] == "ceiling"]
    assert sorted(r["op"] for r in ceilings) == ["copy", "matmul", "rmw"]


def test_gpu_check_dry_run_walks_every_stage(tmp_path):
    """FUSED_LM_GPU_CHECK_DRY=1 on this CPU machine: every stage runs its CPU part, $OUT holds
    exactly the eight files of the protocol, and the summary names every stage."""
    env = _env(OUT=str(tmp_path), FUSED_LM_GPU_CHECK_DRY="1", FUSED_LM_GPU_CHECK_SMOKE_ARGS="--only multi_tensor",
               FUSED_LM_GPU_CHECK_BENCH_FAMILIES="multi_tensor_scale")
    proc = subprocess.run(["bash", "tools/gpu_check.sh", sys.executable], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert {p.name for p in tmp_path.iterdir()} == OUT_FILES, proc.stdout[-3000:]
    summary = (tmp_path / "preflight.log").read_text()
    for stage in ("preflight", "build", "smoke", "tests:gpu_first", "tests:rest", "bench"):
        assert f"== stage {stage} " in summary, summary
    assert "DRY RUN" in summary and "Python headers" in summary
    smoke = (tmp_path / "smoke.log").read_text()
    assert "PASS multi_tensor/scale/fp32/cpu/small" in smoke and "0 failed" in smoke, smoke
    suites = ET.parse(tmp_path / "tests.xml").getroot().findall("testsuite")
    assert [s.get("name") for s in suites] == ["gpu_first", "rest"]
    assert len(_data_rows(tmp_path / "results.csv")) >= 1
    runs = json.loads((tmp_path / "results.json").read_text())
    assert len(runs) == 1 and runs[0]["rows"]
    assert "results.csv" in proc.stdout and "bench/merge.py" in proc.stdout


def _setup_module():
    spec = importlib.util.spec_from_file_location("fused_lm_setup", REPO / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("where", ["lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"])
def test_setup_finds_static_cudart(tmp_path, where):
    (tmp_path / where).mkdir(parents=True)
    (tmp_path / where / "libcudart_static.a").write_bytes(b"!<arch>\n")
    assert _setup_module()._cudart_static_dir(str(tmp_path)) == str(tmp_path / where)


def test_setup_without_static_cudart_says_where_it_looked(tmp_path):
    (tmp_path / "lib64").mkdir()
    with pytest.raises(SystemExit, match=r"libcudart_static\.a.*lib64.*FUSED_LM_SKIP_CUDA_BUILD"):
        _setup_module()._cudart_static_dir(str(tmp_path))


def test_build_script_uses_the_builds_exit_status(tmp_path):
    """tools/build.sh under pipefail: a build whose every output line is filtered away succeeded
    (grep exits 1 then); a failing build fails."""
    fake = tmp_path / "python"
    script = REPO / "tools" / "build.sh"
    for outcome, expected in (("0", 0), ("1", 1)):
        # A stand-in interpreter: the version probe prints a line, setup.py prints only chatter.
        fake.write_text("#!/bin/sh\n"
                        "case \"$1\" in -c) echo probe;; setup.py) echo 'running build_ext'; "
                        f"exit {outcome};; esac\n")
        fake.chmod(0o755)
        work = tmp_path / f"repo{outcome}"
        (work / "tools").mkdir(parents=True)
        (work / "csrc").mkdir()
        (work / "csrc" / "a.cpp").write_text("")
        (work / "setup.py").write_text("")
        (work / "tools" / "build.sh").write_text(script.read_text())
        proc = subprocess.run(["bash", str(work / "tools" / "build.sh"), str(fake)], cwd=work,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == expected, proc.stdout + proc.stderr
        if expected:
            assert "setup.py exited 1" in proc.stderr


def test_smoke_pins_faults_on_their_case(tmp_path):
    """A case that aborts its process, one that hangs and one that loses the (CUDA) context each
    get their FAIL line; every other case of the family still runs in a fresh worker and passes."""
    crash, hang, lost = ("multi_tensor/scale/fp32/cpu/small", "multi_tensor/norm/bf16/cpu/small",
                         "multi_tensor/clamp/fp16/cpu/small")
    env = _env(FUSED_LM_SMOKE_INJECT=f"crash={crash};hang={hang};lost={lost}")
    log = tmp_path / "smoke.log"
    proc = subprocess.run([sys.executable, "tools/gpu_smoke.py", "--device", "cpu", "--only", "multi_tensor",
                           "--sizes", "small", "--case-timeout", "15", "--log", str(log)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = {ln.split()[1]: ln for ln in log.read_text().splitlines() if ln.startswith(("PASS", "FAIL"))}
    listed = subprocess.run([sys.executable, "tools/gpu_smoke.py", "--device", "cpu", "--only", "multi_tensor",
                             "--sizes", "small", "--list"], cwd=REPO, env=_env(), capture_output=True,
                            text=True, timeout=120).stdout.split()
    cases = [c for c in listed if c.startswith("multi_tensor/")]
    assert sorted(lines) == sorted(cases)
    assert "crashed: worker died with signal 6" in lines[crash]
    assert "timeout" in lines[hang]
    assert "context lost" in lines[lost]
    assert all(ln.startswith("PASS") for cid, ln in lines.items() if cid not in (crash, hang, lost)), lines
    assert "3 failed" in log.read_text()


def test_rows_stream_references_first_and_heavy_providers_last():
    """harness.run_case hands each row over as it is measured, references first (so every later
    row carries its speed-ups); bench/run.py's passes split compile-heavy providers off and give
    them the references already measured in the run instead of timing them again."""
    import torch

    from bench import harness
    from bench.run import select_providers

    calls = []

    def provider(name, **kw):
        def setup():
            calls.append(name)
            return lambda: None
        return harness.Provider(name, setup, **kw)

    case = harness.Case("fam", "op", "shape", "fp32",
                        [provider("fused"), provider("torch-compile"), provider("eager", reference=True),
                         provider("flex-attention"), provider("plain", compile_heavy=True)])
    assert [p.name for p in case.providers if harness.is_compile_heavy(p)] == \
        ["torch-compile", "flex-attention", "plain"]
    light = select_providers(case, "light", {})
    streamed = []
    rows = harness.run_case(light, torch.device("cpu"), {}, quick=True, reps=5, on_row=streamed.append)
    assert calls == ["eager", "fused"] and [r.provider for r in streamed] == ["eager", "fused"]
    assert [r.provider for r in rows] == ["fused", "eager"]          # the case's own order
    assert "eager" in streamed[1].speedups
    heavy = select_providers(case, "heavy", {"eager": 1.0})
    assert [p.name for p in heavy.providers] == ["torch-compile", "flex-attention", "plain"]
    rows = harness.run_case(heavy, torch.device("cpu"), {}, quick=True, reps=5, known_refs={"eager": 1.0})
    assert all(set(r.speedups) == {"eager"} for r in rows)
    assert select_providers(harness.Case("f", "o", "s", "d", [provider("x")]), "heavy", {}) is None
