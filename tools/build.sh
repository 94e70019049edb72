#!/usr/bin/env bash
# Builds fused_lm._C (always) and fused_lm._C_cuda (when nvcc is found) in place, with ninja.
# Skips the build when neither the sources nor the toolchain changed since the last one.
#   FUSED_LM_BUILD_LOG=FILE     also append the full, unfiltered build output (and these messages)
#   FUSED_LM_BUILD_CHECK_ONLY=1 build nothing: exit 0 when up to date, 3 when a build is needed
set -euo pipefail
PY="$1"
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
log="${FUSED_LM_BUILD_LOG:-/dev/null}"
say() { echo "$*"; echo "$*" >> "$log"; }
stamp=.build-stamp
key=$( { find csrc -type f -not -path "csrc/emu/*" | sort | xargs sha1sum; sha1sum setup.py;
         "$PY" -c 'import torch, sys; print(torch.__version__, sys.version)';
         echo "${FUSED_LM_CUDA_ARCHS:-80;90} ${FUSED_LM_SKIP_CUDA_BUILD:-0} $(command -v nvcc || true)"; } | sha1sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ] && ls fused_lm/_C.*.so >/dev/null 2>&1; then
  say "== extensions up to date"
  exit 0
fi
if [ -n "${FUSED_LM_BUILD_CHECK_ONLY:-}" ]; then
  say "== the extensions are NOT up to date with csrc/, setup.py and this toolchain (make build)"
  exit 3
fi
say "== building extensions (MAX_JOBS=${MAX_JOBS:-auto}, archs ${FUSED_LM_CUDA_ARCHS:-80;90})"
start=$(date +%s)
# torch's ninja rule for .cu files records no header dependencies (the .cpp rule does, -MMD): when
# a header changed since the last build, the CUDA objects are removed so that every .cu recompiles.
headers=$( { find csrc/include csrc/cuda -type f \( -name '*.h' -o -name '*.cuh' \) 2>/dev/null | sort | xargs -r sha1sum || true; } \
           | sha1sum | cut -d' ' -f1)
if [ "$(cat .build-headers 2>/dev/null)" != "$headers" ]; then
  find build -path '*csrc/cuda/*.o' -delete 2>/dev/null || true
fi
# The console gets the output without setuptools' chatter. Success is the build's own exit
# status: the filter may drop every line (grep then exits 1), which says nothing about the build.
set +e
"$PY" setup.py -q build_ext --inplace 2>&1 | tee -a "$log" | { grep -vE '^(copying|running|creating)|ninja: no work' || true; }
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
  say "build failed (setup.py exited $status)" >&2
  exit 1
fi
say "== built: $("$PY" -c 'import fused_lm._ext as e; print(e.describe_extensions())')"
echo "$key" > "$stamp"
# (a build without its CUDA part leaves the CUDA objects as old as the last CUDA build)
if [ "${FUSED_LM_SKIP_CUDA_BUILD:-0}" = 0 ]; then echo "$headers" > .build-headers; fi
say "== build took $(( $(date +%s) - start )) s"
