#!/usr/bin/env bash
# `make gpu-check`: the GPU validation in bounded stages, each saving as it goes, within
# FUSED_LM_GPU_CHECK_BUDGET seconds (default 360: a 15-minute device lease then still holds a
# second, corrected run). Writes at most eight files to $OUT (the device tool returns no more),
# default ./gpu-check-out/:
#
#   preflight.log  device, driver, versions, nvcc, Python headers, static cudart, cores, wheels;
#                  then one line per stage (status, seconds) as each ends: the run's summary
#   build.log      the full build log (sm_90 only, MAX_JOBS = cores) and the extension import check
#   smoke.log      one PASS/FAIL line per kernel x dtype x backend x size (tools/gpu_smoke.py)
#   tests.log      both pytest passes, one line per test as it finishes, -rfE summaries
#   tests.xml      JUnit: one <testsuite> per pass ("gpu_first": realistic-size `gpu` tests and
#                  the cuda/triton-backend tests; "rest": the others; `cpu_only` tests deselected)
#   bench.log      the benchmark processes' output, each row printed the moment it is measured
#   results.csv    benchmark rows, appended one at a time (one run: one date for every process)
#   results.json   the same run, rewritten atomically after each row (always valid JSON)
#
# Stages: preflight (seconds) -> build (<= 150 s) -> smoke (<= 75 s) -> tests (gpu_first
# <= 110 s, rest <= 40 s) -> benchmarks (what is left: one process per family, cheapest first,
# compile-heavy providers in a last process). Each stage's limit also keeps back what the later
# stages need, so an early stage that finishes early leaves its time to the later ones. A stage
# that hits its limit gets SIGINT first (pytest then writes its JUnit file, bench/run.py has
# already saved every finished row), SIGKILL 15 s later.
#
# If fused_lm._C_cuda does not import after the build, the run says so loudly, and every
# CUDA-backend test and smoke case FAILS (FUSED_LM_REQUIRE_CUDA_EXT=1) instead of skipping.
#
# FUSED_LM_GPU_CHECK_DRY=1 walks every stage on a machine without a GPU: preflight as is, the
# build check, the smoke script on the CPU backends at the small size, the tests' selection
# (--collect-only), the benchmarks on the CPU at quick sizes with a short limit per family; then
# it lists what $OUT holds.
#
# The GPU machine gets a copy of the working tree without .git: pass the commit as
# FUSED_LM_COMMIT. Peers missing there (liger-kernel, lion-pytorch) travel as pure-Python wheels
# in .whl/ (gitignored), installed to /tmp/site first.
#
# Knobs: FUSED_LM_GPU_CHECK_BUDGET (s), FUSED_LM_GPU_TEST_WORKERS (8),
# FUSED_LM_GPU_CHECK_SMOKE_ARGS (extra tools/gpu_smoke.py arguments),
# FUSED_LM_GPU_CHECK_BENCH_FAMILIES (space-separated process groups, each a comma list of
# bench/run.py families; default all, cheapest first).
set -uo pipefail
PY="${1:-python3}"
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
DRY=""
[ "${FUSED_LM_GPU_CHECK_DRY:-0}" != 0 ] && DRY=1
out="${OUT:-$root/gpu-check-out}"
mkdir -p "$out"
# The dry run keeps the stages' shape but not their GPU-sized limits: on a small, busy CPU machine
# collecting the tests alone can take longer than a GPU pass.
SLACK=1
[ -n "$DRY" ] && SLACK=5
BUDGET="${FUSED_LM_GPU_CHECK_BUDGET:-$(( 360 * SLACK ))}"
CORES=$(nproc 2>/dev/null || echo 4)
t0=$(date +%s)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 PYTHONDONTWRITEBYTECODE=1

elapsed() { echo $(( $(date +%s) - t0 )); }
# cap MAX RESERVE: a stage's limit: at most MAX s, keeping RESERVE s of the budget for the
# stages after it; never under 10 s (a stage that starts must be able to save something).
cap() {
  local c=$(( BUDGET - $(elapsed) - $2 * SLACK ))
  [ "$c" -gt $(( $1 * SLACK )) ] && c=$(( $1 * SLACK ))
  [ "$c" -lt 10 ] && c=10
  echo "$c"
}
# capped SECONDS CMD...: SIGINT at the limit (the programs save what they have), SIGKILL 15 s later.
capped() { local s=$1; shift; timeout -s INT -k 15 "$s" "$@"; }
summary=()
stage_result() {  # stage_result NAME STATUS DETAIL: a line in preflight.log and the final summary
  local line
  line=$(printf '%-15s %-4s %4s s  %s' "$1" "$2" "$(elapsed)" "$3")
  summary+=("$line")
  echo "== stage $line" | tee -a "$out/preflight.log"
}
banner() { printf '\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n!! %s\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\n' "$*"; }
failed=0

# ---------------------------------------------------------------------------------- preflight
wheels=""
if ls .whl/*.whl >/dev/null 2>&1; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl >"$tmp/pip.log" 2>&1; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    wheels="installed to /tmp/site: $(cd .whl && ls *.whl | tr '\n' ' ')"
  else
    wheels="FAILED to install .whl/*.whl: $(tail -2 "$tmp/pip.log" | tr '\n' ' ')"
  fi
fi
commit=$(git rev-parse --short HEAD 2>/dev/null || true)
if [ -z "$commit" ]; then
  commit="${FUSED_LM_COMMIT:-unknown}"
  export FUSED_LM_COMMIT="$commit"
fi
export MAX_JOBS="${MAX_JOBS:-$CORES}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$CORES}"
{
  echo "== gpu-check $(date -u +%FT%TZ), commit $commit${DRY:+, DRY RUN (no GPU parts)}, budget ${BUDGET} s, out $out"
  echo "cores: $CORES; MAX_JOBS=$MAX_JOBS (build); OMP_NUM_THREADS=$OMP_NUM_THREADS (benchmarks; tests and smoke split the cores between their processes)"
  echo "nvidia-smi: $(timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | head -3 | tr '\n' ' ' || true)"
  echo "nvcc: $(timeout 20 nvcc --version 2>&1 | tail -2 | tr '\n' ' ' || echo 'not found')"
  GPU_FLAG="$tmp/has_gpu" timeout 60 "$PY" - <<'PYEOF' 2>&1
import importlib.util, os, sys, sysconfig
print(f"python {sys.version.split()[0]} at {sys.executable}")
inc = sysconfig.get_paths()["include"]
print(f"Python headers: {inc}: {'ok' if os.path.exists(os.path.join(inc, 'Python.h')) else 'MISSING Python.h (the build will fail)'}")
import numpy
import torch
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), numpy {numpy.__version__}")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError as exc:
    print(f"triton: not importable: {exc}")
for mod in ("pytest", "xdist", "pytest_timeout", "ninja", "liger_kernel", "lion_pytorch"):
    print(f"{mod}: {'yes' if importlib.util.find_spec(mod) else 'no'}", end="; ")
print()
with open(os.environ["GPU_FLAG"], "w") as f:
    f.write("1" if torch.cuda.is_available() else "0")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.0f} GiB, L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
else:
    print("device: torch sees NO CUDA device")
spec = importlib.util.spec_from_file_location("fused_lm_setup", "setup.py")
setup = importlib.util.module_from_spec(spec)
spec.loader.exec_module(setup)
home = setup._cuda_home()
print(f"CUDA toolkit: {home}")
if home:
    try:
        print(f"libcudart_static.a: in {setup._cudart_static_dir(home)}")
    except SystemExit as exc:
        print(exc)
PYEOF
  echo "wheels (.whl/): ${wheels:-none}"
} 2>&1 | tee "$out/preflight.log"
has_gpu=$(cat "$tmp/has_gpu" 2>/dev/null || echo 0)
if [ -z "$DRY" ] && [ "$has_gpu" != 1 ]; then
  banner "torch sees no CUDA device: this is no GPU run (FUSED_LM_GPU_CHECK_DRY=1 walks the stages without one)"
  stage_result preflight FAIL "no CUDA device"
  failed=1
else
  stage_result preflight ok "${DRY:+dry run}"
fi

# -------------------------------------------------------------------------------------- build
# sm_90 only (FUSED_LM_CUDA_ARCHS): half the nvcc work of the default 80;90. The dry run keeps the
# checkout's archs, so an up-to-date build stays up to date.
[ -z "$DRY" ] && export FUSED_LM_CUDA_ARCHS="${FUSED_LM_CUDA_ARCHS:-90}"
limit=$(cap 150 180)
echo "== build (limit ${limit} s, archs ${FUSED_LM_CUDA_ARCHS:-checkout default}, MAX_JOBS=$MAX_JOBS)" | tee "$out/build.log"
# The dry run only checks that the build is current (a rebuild takes minutes on a small machine).
# (No build lock for a check that builds nothing: another checkout's build may hold it for minutes.)
lock=(flock "/tmp/fused_lm_build.$(printf "%s" "$root" | cksum | cut -d" " -f1).lock")
command -v flock >/dev/null 2>&1 || lock=()
[ -n "$DRY" ] && lock=()
FUSED_LM_BUILD_CHECK_ONLY="$DRY" FUSED_LM_BUILD_LOG="$out/build.log" capped "$limit" \
  "${lock[@]}" bash tools/build.sh "$PY" 2>&1 | tail -n 12
build_rc=${PIPESTATUS[0]}
echo "== build.sh exited $build_rc" >> "$out/build.log"
"$PY" - >>"$out/build.log" 2>&1 <<'PYEOF'
import sys, torch
import fused_lm._ext as e
print("extensions:", e.describe_extensions())
ok = e.has_cpu() and e.has_cuda()
if ok and torch.cuda.is_available():
    import fused_lm.ops.multi_tensor_scale as s
    x = [torch.ones(5, device="cuda")]
    s.multi_tensor_scale_(x, 2.0, backend="cuda")
    torch.cuda.synchronize()
    ok = float(x[0].sum()) == 10.0
    print("CUDA extension kernel on the GPU:", "ok" if ok else f"WRONG RESULT {x[0]}")
sys.exit(0 if ok else 1)
PYEOF
import_rc=$?
tail -n 2 "$out/build.log"
if [ -z "$DRY" ]; then
  # From here on a CUDA-backend test that cannot run fails instead of skipping.
  export FUSED_LM_REQUIRE_CUDA_EXT=1
fi
if [ "$import_rc" -ne 0 ] || [ "$build_rc" -ne 0 ]; then
  banner "BUILD FAILED or fused_lm._C_cuda DOES NOT IMPORT (build.sh exit $build_rc, import check exit $import_rc): every CUDA-backend test and smoke case will FAIL. See build.log."
  stage_result build FAIL "build.sh exit $build_rc, import check exit $import_rc"
  failed=1
else
  stage_result build ok "extensions import"
fi

# -------------------------------------------------------------------------------------- smoke
limit=$(cap 75 140)
smoke_args=(--log "$out/smoke.log" --deadline "$limit" --quiet)
if [ -n "$DRY" ] || [ "$has_gpu" != 1 ]; then
  smoke_args+=(--device cpu --sizes small)
fi
# shellcheck disable=SC2206
smoke_args+=(${FUSED_LM_GPU_CHECK_SMOKE_ARGS:-})
: > "$out/smoke.log"
echo "== smoke (limit ${limit} s): tools/gpu_smoke.py ${smoke_args[*]}"
OMP_NUM_THREADS=$(( CORES / 5 > 0 ? CORES / 5 : 1 )) capped $(( limit + 20 )) "$PY" tools/gpu_smoke.py "${smoke_args[@]}"
smoke_rc=$?
smoke_line=$(grep '^# smoke:' "$out/smoke.log" | tail -1)
if [ "$smoke_rc" -eq 0 ]; then stage_result smoke ok "${smoke_line#\# smoke: }"
else stage_result smoke FAIL "${smoke_line#\# smoke: }${smoke_line:+ }(exit $smoke_rc)"; failed=1; fi

# -------------------------------------------------------------------------------------- tests
# The same runner as `make test` (tools/run_tests.sh): pytest-xdist over the cores, the
# interpreter where there is no GPU. Two passes, selected by the markers of tests/conftest.py.
workers="${FUSED_LM_GPU_TEST_WORKERS:-8}"
: > "$out/tests.log"
merge_junit() {
  "$PY" - "$out/tests.xml" "$tmp"/tests_*.xml <<'PYEOF'
import sys
import xml.etree.ElementTree as ET
root = ET.Element("testsuites")
for path in sys.argv[2:]:
    try:
        tree = ET.parse(path).getroot()
    except (ET.ParseError, OSError):
        continue
    root.extend(tree.findall("testsuite") if tree.tag == "testsuites" else [tree])
ET.ElementTree(root).write(sys.argv[1], encoding="utf-8", xml_declaration=True)
PYEOF
}
run_pass() {  # run_pass NAME MARKEXPR MAX RESERVE
  local name=$1 expr=$2 limit extra=()
  limit=$(cap "$3" "$4")
  "$PY" -c 'import pytest_timeout' 2>/dev/null && extra+=(--timeout=60)
  local serial="${FUSED_LM_SERIAL_TESTS:-}"
  [ -n "$DRY" ] && extra+=(--collect-only -q) && serial=1   # (collection needs no workers)
  echo "== tests, pass $name (limit ${limit} s): -m \"$expr\"" | tee -a "$out/tests.log"
  FUSED_LM_SERIAL_TESTS="$serial" FUSED_LM_TEST_WORKERS="$workers" OMP_NUM_THREADS=$(( CORES / workers > 0 ? CORES / workers : 1 )) \
    capped "$limit" bash tools/run_tests.sh "$PY" -m "$expr" -v -rfE -p no:cacheprovider \
    --junitxml="$tmp/tests_$name.xml" -o junit_suite_name="$name" "${extra[@]}" 2>&1 \
    | tee -a "$out/tests.log" | grep --line-buffered -E '(FAILED|ERROR)|^=+ .*( in [0-9.]+s| seconds? )|tests? collected|^[0-9]+ tests'
  local rc=${PIPESTATUS[0]}
  merge_junit
  local last
  last=$(grep -E '^=+ .* in [0-9.]+s|tests? collected' "$out/tests.log" | tail -1 | tr -d '=' | sed 's/^ *//')
  if [ "$rc" -eq 0 ]; then stage_result "tests:$name" ok "$last"
  else
    [ "$rc" -eq 124 ] || [ "$rc" -eq 130 ] && last="$last (stopped at the ${limit} s limit)"
    stage_result "tests:$name" FAIL "$last (exit $rc)"; failed=1
  fi
}
run_pass gpu_first "(gpu or cuda_ext or triton) and not cpu_only" 110 90
run_pass rest "not (gpu or cuda_ext or triton) and not cpu_only" 40 60

# --------------------------------------------------------------------------------- benchmarks
# One process per group of families (a comma list: related families share a process, so six
# process starts, not nine), cheapest first, all joining one run (one date); each gets a share of
# what is left by weight as a soft limit (no new case after it) and is stopped 20 s after it.
# Compile-heavy providers (torch.compile, FlexAttention) run last, in one process.
families=(${FUSED_LM_GPU_CHECK_BENCH_FAMILIES:-multi_tensor_scale,multi_tensor_clamp multi_tensor_norm adamw,lion cross_entropy,linear_cross_entropy attention transformers})
declare -A weight=([multi_tensor_scale,multi_tensor_clamp]=1 [multi_tensor_norm]=1 [adamw,lion]=1
                   [cross_entropy,linear_cross_entropy]=2 [attention]=3 [transformers]=1)
size_args=(--full)
[ -n "$DRY" ] && size_args=(--quick --reps 3)
run_date=$(date -u +%FT%TZ)
bench_total=$(( BUDGET - $(elapsed) - 5 ))
[ "$bench_total" -lt 30 ] && bench_total=30
heavy_share=$(( bench_total / 4 ))
[ -n "$DRY" ] && heavy_share=0
light_end=$(( $(elapsed) + bench_total - heavy_share ))
echo "== benchmarks: run $run_date, ${bench_total} s (compile-heavy providers: last ${heavy_share} s)" | tee "$out/bench.log"
bench_fail=""
wsum=0
for f in "${families[@]}"; do wsum=$(( wsum + ${weight[$f]:-1} )); done
for f in "${families[@]}"; do
  w=${weight[$f]:-1}
  left=$(( light_end - $(elapsed) ))
  soft=$(( left * w / wsum ))
  [ -n "$DRY" ] && soft=6
  [ "$soft" -lt 5 ] && [ -z "$DRY" ] && soft=5
  wsum=$(( wsum - w ))
  hard=$(( soft + 20 ))
  # (The dry run's first case on a busy 2-core machine can take minutes: it must finish.)
  [ -n "$DRY" ] && hard=$(( soft + 300 ))
  echo "== bench $f (no new case after ${soft} s, stopped at ${hard} s)" | tee -a "$out/bench.log"
  OMP_NUM_THREADS=$CORES capped "$hard" "$PY" bench/run.py --only "$f" "${size_args[@]}" \
    --providers light --run "$run_date" --out "$out" --no-table --time-limit "$soft" 2>&1 | tee -a "$out/bench.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && bench_fail="$bench_fail $f(exit $rc)"
done
heavy_limit=$(( BUDGET - $(elapsed) - 3 ))
[ "$heavy_limit" -lt 10 ] && heavy_limit=10
echo "== bench compile-heavy providers (no new case after $(( heavy_limit - 20 > 0 ? heavy_limit - 20 : 0 )) s)" | tee -a "$out/bench.log"
heavy_soft=$(( heavy_limit - 20 > 0 ? heavy_limit - 20 : 0 ))
[ -n "$DRY" ] && heavy_soft=0
capped "$heavy_limit" "$PY" bench/run.py --only "$(IFS=,; echo "${families[*]}")" "${size_args[@]}" \
  --providers heavy --run "$run_date" --out "$out" --no-table --time-limit "$heavy_soft" 2>&1 | tee -a "$out/bench.log"
rc=${PIPESTATUS[0]}
[ "$rc" -ne 0 ] && bench_fail="$bench_fail heavy(exit $rc)"
rm -f "$out"/*.tmp
rows=$(awk -F, 'NR > 1 && $1 != "ceiling"' "$out/results.csv" 2>/dev/null | wc -l)
if [ -z "$bench_fail" ]; then stage_result bench ok "$rows rows in results.csv"
else stage_result bench PART "$rows rows in results.csv; stopped or failed:$bench_fail"; fi

# ------------------------------------------------------------------------------------ summary
echo
echo "== gpu-check${DRY:+ (dry run)} done in $(elapsed) s of ${BUDGET} s; commit $commit; \$OUT = $out:"
n=0
for f in "$out"/*; do
  [ -e "$f" ] || continue
  n=$(( n + 1 ))
  printf '   %-14s %9s bytes  %s\n' "$(basename "$f")" "$(wc -c < "$f")" "$(head -c 300 "$f" | head -1 | cut -c1-90)"
done
[ "$n" -gt 8 ] && banner "$n files in \$OUT: the device tool returns only 8"
for line in "${summary[@]}"; do echo "   $line"; done
echo "== next: python bench/merge.py <returned folder>; make report; commit bench/results with device, versions, commit and date"
exit $failed
