#!/usr/bin/env bash
# Makes sure the chosen Python has what `make test` and `make bench` need, installing only what is
# missing. A .venv gets the pinned versions (torch 2.13.0 installs offline from the local CPU
# wheel here); a foreign Python that already has torch and triton (the GPU machine, no network)
# gets nothing installed: missing optional tools are reported, not fetched.
set -euo pipefail
PY="$1"
MODE="${2:-test}"   # "bench" also installs the peers (liger-kernel, lion-pytorch), best effort
root=$(cd "$(dirname "$0")/.." && pwd)
TORCH_PIN="${FUSED_LM_TORCH:-torch==2.13.0}"
TRITON_PIN="${FUSED_LM_TRITON:-triton==3.9.0}"
TOOLS=(numpy ninja setuptools wheel pytest pytest-benchmark pytest-xdist hypothesis matplotlib tqdm transformers accelerate)

missing() {  # prints the pip names among "$@" whose module does not import
  "$PY" - "$@" <<'PYEOF'
import importlib.util, sys
mods = {"pytest-benchmark": "pytest_benchmark", "pytest-xdist": "xdist"}
for name in sys.argv[1:]:
    if importlib.util.find_spec(mods.get(name, name)) is None:
        print(name)
PYEOF
}

if [ "$PY" = "$root/.venv/bin/python" ]; then
  if [ ! -x "$PY" ]; then
    echo "== creating $root/.venv"
    python3 -m venv "$root/.venv"
    "$PY" -m pip install -q --upgrade pip
  fi
  need=$(missing torch triton "${TOOLS[@]}" | tr '\n' ' ')
  if [ -n "${need// /}" ]; then
    pins=()
    for n in $need; do
      case $n in torch) pins+=("$TORCH_PIN");; triton) pins+=("$TRITON_PIN");;
        transformers) pins+=("transformers==5.24.0");; accelerate) pins+=("accelerate==1.15.0");;
        *) pins+=("$n");; esac
    done
    echo "== installing: ${pins[*]}"
    "$PY" -m pip install -q "${pins[@]}"
  fi
  if [ "$MODE" = bench ]; then
    peers=$(missing lion_pytorch liger_kernel | tr '\n' ' ')
    if [ -n "${peers// /}" ]; then
      names=$(echo "$peers" | sed 's/lion_pytorch/lion-pytorch/; s/liger_kernel/liger-kernel/')
      echo "== installing benchmark peers: $names (best effort)"
      # --no-deps: they must not replace the pinned torch/triton; their other needs are ours.
      "$PY" -m pip install -q --no-deps $names || echo "note: could not install $names; their rows will say skipped"
    fi
  fi
else
  if ! "$PY" -c 'import torch, triton' 2>/dev/null; then
    echo "error: $PY cannot import torch and triton; unset FUSED_LM_PYTHON or install them" >&2
    exit 1
  fi
  need=$(missing "${TOOLS[@]}" | tr '\n' ' ')
  if [ -n "${need// /}" ]; then
    echo "note: $PY lacks: $need (not installed automatically on a foreign Python)"
  fi
fi
