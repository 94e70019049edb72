"""Every Triton kernel of fused_lm compiles for a real GPU target (sm_90, and sm_80 for one variant
per kernel), without a GPU: tools/triton_aot_check.py --quick in a subprocess.

The CPU tests run the kernels under the Triton interpreter, which never runs the compiler; this
test runs the compiler (frontend, MLIR, LLVM, PTX, ptxas) over the configurations the launchers
choose on a GPU. It runs without TRITON_INTERPRET, as its own process. About 35 s on 2 idle
cores (the bounded --quick set; the full set is `python tools/triton_aot_check.py`).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "triton_aot_check.py"
TIMEOUT_S = 300


def test_every_triton_kernel_compiles_for_gpu_targets():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    try:
        proc = subprocess.run([sys.executable, str(SCRIPT), "--quick"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        pytest.fail(f"{SCRIPT.name} --quick did not finish in {TIMEOUT_S} s; output so far:\n{out[-4000:]}")
    lines = proc.stdout.strip().splitlines()
    if lines and lines[-1].startswith("skipped:"):
        pytest.skip(lines[-1])
    failures = "\n".join(line for line in lines if not line.startswith("ok "))
    assert proc.returncode == 0, (f"{SCRIPT.name} --quick exited {proc.returncode}:\n"
                                  f"{failures[-6000:]}\nstderr:\n{proc.stderr[-3000:]}")
    assert any(line.startswith("ok ") for line in lines), proc.stdout[-3000:]
