"""examples/hf_trainer.py runs end to end as a user runs it (a subprocess, no TRITON_INTERPRET):
the stock and fused_lm loss curves agree, the loss falls, the PNG is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the example needs transformers (pip install -e '.[test]')")
pytest.importorskip("accelerate", reason="the example's Trainer needs accelerate")

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "hf_trainer.py"
TIMEOUT_S = 240


def test_hf_trainer_example(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSED_LM_BACKEND")}
    env["OMP_NUM_THREADS"] = "1"          # tiny model on shared cores (see tests/test_examples.py)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    png = tmp_path / "loss.png"
    try:
        proc = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "24", "--batch-size", "4",
                               "--max-len", "32", "--png", str(png), "--json"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{EXAMPLE.name} did not finish in {TIMEOUT_S} s: {(exc.stdout or b'')[-2000:]}")
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    stock, fused = summary["stock"], summary["fused"]
    assert fused["optimizer"] == "fused_lm.optim.adamw.AdamW" and fused["attention"] == "fused_lm"
    assert len(stock["loss"]) == len(fused["loss"]) == 24
    assert summary["max_rel_loss_diff"] < 1e-4, summary["max_rel_loss_diff"]
    assert len(fused["grad_norm"]) == 24
    assert sum(fused["loss"][-4:]) / 4 < sum(fused["loss"][:4]) / 4 - 0.5, fused["loss"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert summary["png"] is None
    else:
        assert summary["png"] == str(png) and png.stat().st_size > 1000
