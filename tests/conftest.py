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


def _squeeze_interpreter_index() -> None:
    """Triton 3.6's interpreter turns a tensor used as a loop bound into a Python int with
    ``int(ndarray of shape (1,))``: NumPy 2.4 rejects that (221 tests fail) and NumPy < 2.4 warns
    (an error in tests that turn warnings into errors). Triton 3.8 and 3.9 squeeze the array
    first; the same one-line change is applied here to older interpreters, on top of the tensor
    patches the interpreter installs around every launch (its patch scope restores both)."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    try:
        import inspect

        from triton.runtime import interpreter
        needs = "int(self.handle.data))" in inspect.getsource(interpreter._patch_lang_tensor)
    except (ImportError, AttributeError, OSError, TypeError):
        return
    if not needs or getattr(interpreter._patch_lang_tensor, "_fused_lm_squeezed", False):
        return
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._fused_lm_squeezed = True
    interpreter._patch_lang_tensor = patch_lang_tensor


def pytest_configure(config):
    _squeeze_interpreter_index()
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
