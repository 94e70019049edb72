#!/usr/bin/env bash
# Builds fused_lm._C (always) and fused_lm._C_cuda (when nvcc is found) in place, with ninja.
# Skips the build when neither the sources nor the toolchain changed since the last one.
set -euo pipefail
PY="$1"
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
stamp=.build-stamp
key=$( { find csrc -type f | sort | xargs sha1sum; sha1sum setup.py;
         "$PY" -c 'import torch, sys; print(torch.__version__, sys.version)';
         echo "${FUSED_LM_CUDA_ARCHS:-80;90} ${FUSED_LM_SKIP_CUDA_BUILD:-0} $(command -v nvcc || true)"; } | sha1sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ] && ls fused_lm/_C.*.so >/dev/null 2>&1; then
  echo "== extensions up to date"
  exit 0
fi
echo "== building extensions (MAX_JOBS=${MAX_JOBS:-auto}, archs ${FUSED_LM_CUDA_ARCHS:-80;90})"
start=$(date +%s)
"$PY" setup.py -q build_ext --inplace 2>&1 | grep -vE '^(copying|running|creating)|ninja: no work' || { echo "build failed" >&2; exit 1; }
"$PY" -c 'import fused_lm._ext as e; print("== built:", e.describe_extensions())'
echo "$key" > "$stamp"
echo "== build took $(( $(date +%s) - start )) s"
