#!/usr/bin/env bash
# Runs the whole test suite. Without CUDA the Triton kernels run under the interpreter on CPU
# tensors (TRITON_INTERPRET=1, set before triton is imported); with CUDA the CUDA tests run too.
# Parallel over the cores with pytest-xdist when it is installed.
set -uo pipefail
PY="$1"; shift
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  export TRITON_INTERPRET=1
fi
xdist=()
if "$PY" -c 'import xdist' 2>/dev/null && [ -z "${FUSED_LM_SERIAL_TESTS:-}" ]; then
  xdist=(-n "${FUSED_LM_TEST_WORKERS:-auto}" --dist loadgroup)
fi
"$PY" -m pytest tests "${xdist[@]}" "$@"
rc=$?
if [ $rc -eq 5 ]; then echo "error: no test was collected" >&2; fi
exit $rc
