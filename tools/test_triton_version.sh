#!/usr/bin/env bash
# test_triton_version.sh PY VERSION [pytest args...]: the tests that launch a Triton kernel (the
# `triton` marker, tests/conftest.py) under another Triton release, next to the one installed in
# PY's environment: the kernels under that release's interpreter, and tests/test_triton_aot.py's
# AOT compile for sm_90/sm_80 with that release's compiler. `make test` runs it for 3.6.0, the
# release of the GPU machine, so CI covers it next to the pinned 3.9.0.
#
# The release is installed once into .triton-VERSION/ (gitignored; pip's cache makes a fresh
# clone's install ~20 s) and put first on PYTHONPATH for this run only. Triton < 3.8's interpreter
# calls int() on one-element arrays, which NumPy >= 2.4 rejects: tests/conftest.py patches that,
# and the folder also gets numpy<2.4, the combination this job was validated with
# (FUSED_LM_TRITON_COMPAT_NUMPY overrides the pin).
set -uo pipefail
PY="$1"; VERSION="$2"; shift 2
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
dir="$root/.triton-$VERSION"
numpy_pin="${FUSED_LM_TRITON_COMPAT_NUMPY:-numpy<2.4}"
want="triton==$VERSION $numpy_pin $("$PY" -c 'import sys; print(sys.version.split()[0])')"
if [ ! -f "$dir/.installed" ] || [ "$(cat "$dir/.installed")" != "$want" ]; then
  echo "== installing triton==$VERSION and $numpy_pin into $dir"
  rm -rf "$dir"
  # --no-deps: torch stays the environment's; triton's own needs are met there.
  if ! "$PY" -m pip install -q --disable-pip-version-check --no-deps --target "$dir" \
      "triton==$VERSION" "$numpy_pin"; then
    echo "error: could not install triton==$VERSION into $dir (set FUSED_LM_TRITON_COMPAT= to skip this job)" >&2
    exit 1
  fi
  echo "$want" > "$dir/.installed"
fi
export PYTHONPATH="$dir${PYTHONPATH:+:$PYTHONPATH}"
got=$("$PY" -c 'import triton, numpy; print(triton.__version__, numpy.__version__)') || exit 1
if [ "${got%% *}" != "$VERSION" ]; then
  echo "error: $dir should provide triton $VERSION, got $got" >&2
  exit 1
fi
echo "== Triton-kernel tests under triton ${got% *} (numpy ${got#* }): -m triton"
# The old interpreter's int(array) also warns once per launch under NumPy 2.3: silenced here.
exec tools/run_tests.sh "$PY" -m triton -p no:cacheprovider \
  -W "ignore:Conversion of an array with ndim > 0:DeprecationWarning" "$@"
