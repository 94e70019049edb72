"""pytest-benchmark entry: `pytest bench --benchmark-only` runs the same cases as bench/run.py
(quick sizes unless FUSED_LM_BENCH_FULL=1), so CI can track them with --benchmark-compare."""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
