#!/usr/bin/env bash
# dev.sh COMMAND [ARGS...]: the one way into fused_lm's environment. The Makefile's targets, CI
# (.ci/run -> make test) and the GPU check all come through here, so the interpreter is chosen,
# what is missing installed and the extensions built the same way everywhere.
#
#   python                 print the interpreter every command uses (below)
#   env [test|bench]       install what is missing (bench: also the peers, best effort)
#   build                  env, then build the extensions (skipped when up to date), locked per
#                          checkout so that two builds of one tree do not clobber each other
#   test [PYTEST ARGS]     build, the whole suite, then the Triton-kernel tests under every release
#                          in $TRITON_COMPAT (default 3.6.0, the GPU machine's; empty skips); both
#                          jobs run, the command fails if either did
#   test-main, test-triton-compat   one of the two jobs
#   bench [bench/run.py ARGS]       build, install the peers, run the harness, plot
#   plot | report | info   bench/plot.py | bench/report.py | python -m fused_lm info
#   gpu-check              the staged GPU check (tools/gpu_check.sh; logs to $OUT)
#
# The interpreter: $FUSED_LM_PYTHON if set; else the project's .venv if it exists; else the active
# python3 when it already imports torch and triton (a GPU machine with no network, where nothing
# must be installed); else .venv/bin/python, which `env` creates.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

pick_python() {
  if [ -n "${FUSED_LM_PYTHON:-}" ]; then echo "$FUSED_LM_PYTHON"; return; fi
  if [ -x "$root/.venv/bin/python" ]; then echo "$root/.venv/bin/python"; return; fi
  if command -v python3 >/dev/null 2>&1 && python3 -c 'import torch, triton' >/dev/null 2>&1; then
    command -v python3; return
  fi
  echo "$root/.venv/bin/python"
}
PY=$(pick_python)
if [ -z "${TRITON_COMPAT+set}" ]; then
  TRITON_COMPAT="${FUSED_LM_TRITON_COMPAT-3.6.0}"
fi

# One build at a time per checkout (the lock is named after the checkout's path): flock where
# util-linux has it, unlocked otherwise.
build_lock() {
  local lock="/tmp/fused_lm_build.$(printf '%s' "$root" | cksum | cut -d' ' -f1).lock"
  if command -v flock >/dev/null 2>&1; then flock "$lock" "$@"; else "$@"; fi
}
env_() { bash tools/ensure_env.sh "$PY" "${1:-test}"; }
build() { env_ test && build_lock bash tools/build.sh "$PY"; }
test_main() { bash tools/run_tests.sh "$PY" "$@"; }
test_compat() {
  local rc=0 v
  for v in $TRITON_COMPAT; do bash tools/test_triton_version.sh "$PY" "$v" "$@" || rc=$?; done
  return $rc
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  python) echo "$PY" ;;
  env) env_ "$@" ;;
  build) build ;;
  test)
    build || exit $?
    rc=0
    test_main "$@" || rc=$?
    test_compat "$@" || rc=$?
    exit $rc ;;
  test-main) build && test_main "$@" ;;
  test-triton-compat) build && test_compat "$@" ;;
  bench) build && env_ bench && "$PY" bench/run.py "$@" && "$PY" bench/plot.py ;;
  plot) env_ && "$PY" bench/plot.py ;;
  report) env_ && "$PY" bench/report.py ;;
  info) build && "$PY" -m fused_lm info ;;
  gpu-check) bash tools/gpu_check.sh "$PY" ;;
  *) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
esac
