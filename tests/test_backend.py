"""Backend selection, the extensions' build state and `python -m fused_lm info`."""

import os
import subprocess
import sys

import pytest
import torch

from fused_lm import _backend, _ext
from tests._helpers import HAS_CUDA


def test_import_needs_no_extension():
    code = ("import sys; sys.modules['fused_lm._C'] = None; sys.modules['fused_lm._C_cuda'] = None; "
            "import fused_lm, fused_lm._ext as e; print(e.has_cpu())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_missing_extension_error_says_how_to_build(monkeypatch):
    monkeypatch.setitem(_ext._errors, "_C", "not built")
    monkeypatch.delitem(_ext._loaded, "_C", raising=False)
    with pytest.raises(_ext.ExtensionNotBuilt, match="make build"):
        _ext.cpu_ext()


def test_cpu_extension_built_and_imports():
    """CI builds the CPU extension; a missing build must fail loudly here."""
    assert _ext.has_cpu(), _ext.describe_extensions()["_C"]
    info = _ext.cpu_ext().build_info()
    assert info["openmp"] is True


@pytest.mark.skipif(subprocess.run(["which", "nvcc"], capture_output=True).returncode != 0,
                    reason="nvcc not installed: the CUDA extension is built only where nvcc is")
def test_cuda_extension_built_and_imports_without_gpu():
    """The CUDA extension builds and links without a GPU and imports without one."""
    assert _ext.has_cuda(), _ext.describe_extensions()["_C_cuda"]
    assert _ext.cuda_ext().archs
    assert hasattr(torch.ops.fused_lm, "multi_tensor_scale_")


def test_select_default_and_forced(monkeypatch):
    monkeypatch.delenv("FUSED_LM_BACKEND", raising=False)
    assert _backend.select("multi_tensor_scale", "cpu") == "cpu"
    assert _backend.select("multi_tensor_scale", "cpu", torch.float64) == "torch"
    monkeypatch.setenv("FUSED_LM_BACKEND", "torch")
    assert _backend.select("multi_tensor_scale", "cpu") == "torch"
    monkeypatch.setenv("FUSED_LM_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FUSED_LM_BACKEND"):
        _backend.select("multi_tensor_scale", "cpu")


def test_select_errors(monkeypatch):
    monkeypatch.delenv("FUSED_LM_BACKEND", raising=False)
    with pytest.raises(KeyError, match="unknown op"):
        _backend.select("no_such_op", "cpu")
    with pytest.raises(ValueError, match="expected one of"):
        _backend.select("multi_tensor_scale", "cpu", backend="metal")
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="needs CUDA tensors"):
            _backend.select("multi_tensor_scale", "cpu", backend="cuda")
    with pytest.raises(TypeError, match="supports"):
        _backend.select("multi_tensor_scale", "cpu", torch.float64, backend="cpu")


def test_triton_on_cpu_only_under_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "interpreter" in _backend.unavailable_reason("triton", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.unavailable_reason("triton", torch.device("cpu")) is None


def test_info_command():
    out = subprocess.run([sys.executable, "-m", "fused_lm", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for needle in ("torch", "triton", "_C ", "_C_cuda", "multi_tensor_scale"):
        assert needle in out.stdout


def test_dtype_checked_before_availability(monkeypatch):
    """A dtype the kernels do not take is a TypeError wherever the call runs: also where the
    requested backend could not run at all (Triton on CPU tensors without the interpreter)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("FUSED_LM_BACKEND", raising=False)
    with pytest.raises(TypeError, match="supports"):
        _backend.select("adamw", "cpu", torch.float64, backend="triton")
    with pytest.raises(RuntimeError, match="interpreter"):
        _backend.select("adamw", "cpu", torch.float32, backend="triton")


def test_selection_does_not_look_for_triton_each_call(monkeypatch):
    """torch.compile(fullgraph=True) on torch 2.11 cannot trace importlib.util.find_spec, and
    select() runs inside compiled regions: whether triton is installed is decided at import."""
    import importlib.util

    def untraceable(*args, **kwargs):
        raise AssertionError("find_spec called during backend selection")

    monkeypatch.setattr(importlib.util, "find_spec", untraceable)
    for op in _backend.OPS:
        _backend.table("cpu")
        _backend.unavailable_reason("triton", torch.device("cpu"))
        _backend.select(op, "cpu", torch.float32)


def test_import_does_not_import_triton():
    """Importing fused_lm, its backend choice and fused_lm.nn compiles nothing; the specs (and
    with them the kernels' modules) load when a family is first used (here by table())."""
    code = ("import sys, fused_lm, fused_lm._backend as b, fused_lm.nn; "
            "print('triton' in sys.modules); b.table('cpu')")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
