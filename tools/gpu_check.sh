#!/usr/bin/env bash
# `make gpu-check`: the whole GPU validation in one command on a GPU machine with no network,
# under 9 minutes: print the device, build (sm_90 only, to save time), run the test suite on CUDA
# (every backend), run the benchmarks at realistic sizes, and leave logs + results in $OUT (when
# set, e.g. by the device tool) or bench/results/. $OUT gets six files (the device tool returns at
# most eight): gpu_check.log, gpu_tests.xml, bench.log, results.csv, results.json, latest_cuda.txt;
# the PNG charts are drawn from results.csv afterwards with `python bench/plot.py`.
# Peers missing on the machine (liger-kernel, lion-pytorch) travel as wheels in .whl/ and are
# installed to /tmp/site first when present.
set -uo pipefail
PY="${1:-python3}"
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out="${OUT:-$root/bench/results}"
mkdir -p "$out"
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 FUSED_LM_CUDA_ARCHS="${FUSED_LM_CUDA_ARCHS:-90}"

{
  echo "== gpu-check $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "nvidia-smi unavailable"
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "device", torch.cuda.get_device_name())'
} 2>&1 | tee "$out/gpu_check.log"

echo "== build ($(elapsed) s)"
tools/locked.sh /tmp/fused_lm_build.lock tools/build.sh "$PY" 2>&1 | tail -5 | tee -a "$out/gpu_check.log"
"$PY" -m fused_lm info 2>&1 | tee -a "$out/gpu_check.log"

echo "== tests on CUDA ($(elapsed) s)"
per_test=()
"$PY" -c 'import pytest_timeout' 2>/dev/null && per_test=(--timeout=120)
# Most of the CUDA suite's time is Triton JIT compilation on the host: spread it over processes
# (one GPU is shared; the tests are small next to its memory).
"$PY" -c 'import xdist' 2>/dev/null && per_test+=(-n "${FUSED_LM_GPU_TEST_WORKERS:-8}" --dist loadgroup)
timeout "${FUSED_LM_GPU_TEST_TIMEOUT:-300}" "$PY" -m pytest tests -q "${per_test[@]}" -p no:cacheprovider \
  --junitxml="$out/gpu_tests.xml" --durations=20 2>&1 | tee -a "$out/gpu_check.log" | tail -40 \
  || echo "(tests exited non-zero: see gpu_check.log)"

echo "== benchmarks, realistic sizes ($(elapsed) s)"
remaining=$(( ${FUSED_LM_GPU_CHECK_BUDGET:-520} - $(elapsed) ))
[ "$remaining" -lt 60 ] && remaining=60
timeout "$remaining" "$PY" bench/run.py --full --out "$out" 2>&1 | tee "$out/bench.log" | tail -80 \
  || echo "(benchmarks stopped at the time limit: partial results in bench.log)"
echo "== done in $(elapsed) s; results in $out"
