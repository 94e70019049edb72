"""Loads the compiled extensions, with a clear message when one is missing.

``import fused_lm`` never needs them: they are imported on first use. ``fused_lm._C`` (CPU, C++
with OpenMP) defines every compiled op's schema and its CPU kernel; ``fused_lm._C_cuda`` adds the
CUDA kernels for the same schemas, so it needs ``_C`` loaded first.
"""

from __future__ import annotations

import importlib
import shutil

import torch

BUILD_HINT = (
    "build it from the repository root with `make build` "
    "(or `python setup.py build_ext --inplace`; `pip install --no-build-isolation -e .` also works)"
)


class ExtensionNotBuilt(RuntimeError):
    """A compiled extension that an operation needs is not built or failed to load."""


_loaded: dict[str, object] = {}
_errors: dict[str, str] = {}


def _load(name: str):
    if name in _loaded:
        return _loaded[name]
    if name in _errors:
        return None
    try:
        mod = importlib.import_module(f"fused_lm.{name}")
    except ImportError as exc:  # not built, or built against another torch
        _errors[name] = str(exc)
        return None
    _loaded[name] = mod
    return mod


def _missing(name: str, what: str) -> ExtensionNotBuilt:
    reason = _errors.get(name, "not built")
    return ExtensionNotBuilt(f"fused_lm.{name} ({what}) is not available: {reason}. To use it, {BUILD_HINT}.")


def has_cpu() -> bool:
    return _load("_C") is not None


def has_cuda() -> bool:
    return has_cpu() and _load("_C_cuda") is not None


def cpu_ext():
    """The CPU extension module; raises ExtensionNotBuilt with build instructions if missing."""
    mod = _load("_C")
    if mod is None:
        raise _missing("_C", "the C++ CPU kernels")
    return mod


def cuda_ext():
    """The CUDA extension module (loads ``_C`` first, which defines the op schemas)."""
    cpu_ext()
    mod = _load("_C_cuda")
    if mod is None:
        if shutil.which("nvcc") is None and "_C_cuda" not in _errors:
            _errors["_C_cuda"] = "nvcc was not found when the package was built"
        raise _missing("_C_cuda", "the CUDA C++ kernels")
    return mod


def cuda_stream(device: torch.device) -> int:
    """The raw handle of the current CUDA stream of ``device``, passed to compiled CUDA ops (the
    .cu sources cannot include c10/cuda headers, which the CPU wheel of torch lacks)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.current_stream(device).cuda_stream


def describe_extensions() -> dict[str, str]:
    """{extension: "built (...)" or "missing: reason"} for `python -m fused_lm info`."""
    out = {}
    if has_cpu():
        info = _loaded["_C"].build_info()
        out["_C"] = f"built (OpenMP {info['openmp']}, {info['max_threads']} threads, SIMD {info['simd']})"
    else:
        out["_C"] = f"missing: {_errors.get('_C', 'not built')}"
    if has_cuda():
        out["_C_cuda"] = f"built (archs {_loaded['_C_cuda'].archs.replace('_', ';')})"
    else:
        reason = _errors.get("_C_cuda", "not built")
        if shutil.which("nvcc") is None:
            reason += " (nvcc not found: the CUDA extension is built only where nvcc is installed)"
        out["_C_cuda"] = f"missing: {reason}"
    return out
