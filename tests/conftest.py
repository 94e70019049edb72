"""Test configuration: devices, seeding, the interpreter switch and the `gpu` marker.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at the top of
the root conftest, when no GPU is present: every Triton kernel then runs on CPU tensors.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import pytest  # noqa: E402

from tests._helpers import DEVICES, HAS_CUDA, REQUIRE_CUDA_EXT, SEED  # noqa: E402

# Checks that need no GPU and learn nothing more on one: `make gpu-check` deselects them
# (-m "not cpu_only") so its minutes go to what only the GPU can show.
CPU_ONLY_FILES = {
    "tests/test_triton_aot.py",            # compiles for sm_90/sm_80 without a GPU
    "tests/test_examples.py",              # the examples as a user runs them, on the CPU
    "tests/optim/test_distributed.py",     # two gloo ranks on CPU tensors
    "tests/test_gpu_check_tooling.py",     # the gpu-check scripts themselves (dry run, SIGTERM)
}
# Files none of whose tests launches a Triton kernel (see the `triton` marker below).
NO_TRITON_FILES = {
    "tests/test_examples.py",              # runs without the interpreter: CPU C++ and torch paths
    "tests/test_helpers_selftest.py",
    "tests/optim/test_helpers_sched.py",
    "tests/test_gpu_check_tooling.py",
}


def _backend_param(item):
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("backend") if callspec is not None else None


def pytest_collection_modifyitems(config, items):
    """Markers derived from where a test lives and which backend it runs:

    * ``triton``: the test launches a Triton kernel: its ``backend`` parameter is "triton", or it
      has none and so runs the op's default, which is the Triton kernel wherever Triton runs
      (GPU, or CPU under the interpreter) for the ops without a C++ CPU kernel and in the
      interpreter comparisons. The Triton 3.6 job of `make test` runs these alone: a test pinned
      to the cpu, cuda or torch backend executes no Triton code, so another Triton version cannot
      change its outcome.
    * ``cuda_ext``: the test runs the CUDA C++ kernels (``backend`` "cuda").
    * ``cpu_only``: see CPU_ONLY_FILES.
    * ``gpu`` tests are skipped without CUDA (they fail instead under FUSED_LM_REQUIRE_CUDA_EXT=1).
    """
    root = config.rootpath
    no_gpu = None
    if not HAS_CUDA:
        no_gpu = (pytest.mark.required_but_unavailable(reason="needs CUDA") if REQUIRE_CUDA_EXT
                  else pytest.mark.skip(reason="needs CUDA (realistic sizes on a GPU)"))
    for item in items:
        path = item.path.relative_to(root).as_posix() if item.path.is_relative_to(root) else ""
        backend = _backend_param(item)
        if backend == "triton" or (backend is None and path not in NO_TRITON_FILES):
            item.add_marker(pytest.mark.triton)
        if backend == "cuda":
            item.add_marker(pytest.mark.cuda_ext)
        if path in CPU_ONLY_FILES:
            item.add_marker(pytest.mark.cpu_only)
        if no_gpu is not None and "gpu" in item.keywords:
            item.add_marker(no_gpu)


def pytest_runtest_setup(item):
    mark = item.get_closest_marker("required_but_unavailable")
    if mark is not None:
        pytest.fail(f"FUSED_LM_REQUIRE_CUDA_EXT=1 and this CUDA test cannot run: "
                    f"{mark.kwargs.get('reason', '')}", pytrace=False)


def _interpreter_numpy_clash() -> str | None:
    """Triton 3.6's interpreter converts a loop bound taken from a tensor with
    ``int(ndarray of shape (1,))``, which NumPy >= 2.4 rejects (3.8 and 3.9 squeeze first):
    every kernel with a runtime trip count would fail with a confusing TypeError."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return None
    import numpy

    try:
        int(numpy.ones(1))
        return None                   # NumPy < 2.4 still converts (with a DeprecationWarning)
    except TypeError:
        pass
    try:
        import inspect

        import triton
        from triton.runtime import interpreter
        source = inspect.getsource(interpreter)
    except (ImportError, OSError, TypeError):
        return None
    if "int(self.handle.data))" not in source:
        return None
    return (f"Triton {triton.__version__}'s interpreter cannot run these kernels with NumPy "
            f"{numpy.__version__}: it calls int() on one-element arrays, which NumPy >= 2.4 "
            f"rejects. Install numpy<2.4 next to this Triton (the Triton 3.6 job of `make test` "
            f"does: tools/test_triton_version.sh).")


def pytest_configure(config):
    clash = _interpreter_numpy_clash()
    if clash:
        pytest.exit(clash, returncode=4)
    if REQUIRE_CUDA_EXT and not HAS_CUDA:
        config.issue_config_time_warning(pytest.PytestWarning(
            "FUSED_LM_REQUIRE_CUDA_EXT=1 without CUDA: every CUDA test will fail"), stacklevel=2)


def pytest_report_header(config):
    from fused_lm import _ext

    ext = ", ".join(f"{k}: {v}" for k, v in _ext.describe_extensions().items())
    mode = "CUDA" if HAS_CUDA else "CPU (Triton interpreter)"
    return [f"fused_lm tests on {mode}; torch {torch.__version__}", f"extensions: {ext}"]


@pytest.fixture(params=DEVICES)
def device(request):
    """Every device of this machine: cpu always, cuda when present."""
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same seed: failures reproduce, inputs are still random."""
    random.seed(SEED)
    torch.manual_seed(SEED)
    yield
