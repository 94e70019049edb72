#!/usr/bin/env bash
# Prints the Python interpreter the Makefile uses:
#  1. $FUSED_LM_PYTHON if set;
#  2. the project's .venv if it exists;
#  3. the active python3 when it already imports torch and triton (e.g. a GPU machine with no
#     network, where nothing must be installed);
#  4. otherwise .venv/bin/python, which tools/ensure_env.sh then creates.
root=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "${FUSED_LM_PYTHON:-}" ]; then echo "$FUSED_LM_PYTHON"; exit 0; fi
if [ -x "$root/.venv/bin/python" ]; then echo "$root/.venv/bin/python"; exit 0; fi
if command -v python3 >/dev/null 2>&1 && python3 -c 'import torch, triton' >/dev/null 2>&1; then
  command -v python3; exit 0
fi
echo "$root/.venv/bin/python"
