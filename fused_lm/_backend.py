"""The one place that chooses how an op runs: ``cuda | triton | cpu | torch`` per (op, device, dtype).

* ``cuda``   CUDA C++ kernels of the compiled extension ``fused_lm._C_cuda`` (CUDA tensors).
* ``triton`` Triton kernels: on CUDA tensors, or on CPU tensors under the Triton interpreter
             (``TRITON_INTERPRET=1``, which is how every Triton kernel is tested without a GPU).
* ``cpu``    C++ kernels of ``fused_lm._C`` (OpenMP + SIMD) running the same update functors as
             the CUDA kernels (CPU tensors).
* ``torch``  a plain PyTorch path (any device), still memory-lean where the op promises it.

Order of precedence: the ``backend=`` argument of an op or optimizer, then the environment
variable ``FUSED_LM_BACKEND`` (applied to every op that implements that backend; tests use it),
then the op's default. An explicit choice that cannot run raises; it never silently changes the
numerics.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Mapping

import torch

from fused_lm import _ext
from fused_lm.ops._spec import KERNEL_DTYPES, FamilySpec

BACKENDS = ("cuda", "triton", "cpu", "torch")
__all__ = ["BACKENDS", "KERNEL_DTYPES", "OPS", "select", "table", "forced", "unavailable_reason"]


# Where each op family's spec lives: ``SPEC`` in the module of its launchers (ops/_spec.py says
# what a spec holds: backends, the GPU default and the measurement behind it, dtypes, lists).
_FAMILY_MODULES = {
    "multi_tensor_scale": "fused_lm.ops.multi_tensor_scale",
    "multi_tensor_clamp": "fused_lm.ops.multi_tensor_clamp",
    "multi_tensor_norm": "fused_lm.ops.multi_tensor_norm",
    "adamw": "fused_lm.ops.adamw",
    "lion": "fused_lm.ops.lion",
    "cross_entropy": "fused_lm.ops.cross_entropy",
    "linear_cross_entropy": "fused_lm.ops.linear_cross_entropy",
    "attention": "fused_lm.ops.attention",
}


class _Specs(Mapping):
    """{op name: FamilySpec}, each read from its module on first use (a module imports its
    kernels: nothing is compiled before an op is used)."""

    def __init__(self, modules: dict[str, str]):
        self._modules = modules
        self._specs: dict[str, FamilySpec] = {}

    def __getitem__(self, op: str) -> FamilySpec:
        spec = self._specs.get(op)
        if spec is None:
            spec = importlib.import_module(self._modules[op]).SPEC
            if spec.name != op:
                raise RuntimeError(f"{self._modules[op]}.SPEC is named {spec.name!r}, not {op!r}")
            self._specs[op] = spec
        return spec

    def __iter__(self):
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)


OPS: Mapping[str, FamilySpec] = _Specs(_FAMILY_MODULES)


def interpreter_on() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Decided once, at import: torch.compile(fullgraph=True) cannot trace importlib.util.find_spec
# (torch 2.11 fails on it), and select() runs inside compiled regions on every call. find_spec of
# a top-level name locates the package without importing it, so `import fused_lm` still does not
# import triton.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def forced() -> str | None:
    """The backend forced by ``FUSED_LM_BACKEND``, validated; None when unset."""
    value = os.environ.get("FUSED_LM_BACKEND", "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"FUSED_LM_BACKEND={value!r}: expected one of {', '.join(BACKENDS)}")
    return value


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can run on ``device``, else why not (for errors and `info`)."""
    if backend == "torch":
        return None
    if backend == "triton":
        if not triton_installed():
            return "triton is not installed"
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            return None if interpreter_on() else (
                "Triton runs on CPU tensors only under the interpreter (set TRITON_INTERPRET=1 "
                "before triton is imported)")
        return f"Triton does not run on {device.type} tensors"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device.type} tensors"
        return None if _ext.has_cuda() else f"fused_lm._C_cuda is not built; {_ext.BUILD_HINT}"
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend needs CPU tensors, got {device.type} tensors"
        return None if _ext.has_cpu() else f"fused_lm._C is not built; {_ext.BUILD_HINT}"
    raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def _defaults(spec: FamilySpec, device: torch.device) -> list[str]:
    if device.type == "cuda":
        order = [spec.gpu_default, "cuda", "triton", "torch"]
    elif device.type == "cpu":
        # Under the interpreter a CPU tensor exercises the Triton kernel only when the op has no
        # C++ CPU kernel; otherwise the C++ kernel is the fast CPU path.
        order = ["cpu", "triton", "torch"] if interpreter_on() else ["cpu", "torch"]
    else:
        order = ["triton", "torch"]
    return [b for b in dict.fromkeys(order) if b in spec.backends]


def select(op: str, device: torch.device | str, dtype: torch.dtype | None = None,
           backend: str | None = None) -> str:
    """Chooses the backend of ``op`` for tensors on ``device`` of ``dtype``."""
    try:
        spec = OPS[op]
    except KeyError:  # an unknown name (a known family's import errors propagate)
        raise KeyError(f"unknown op {op!r}; known: {', '.join(sorted(OPS))}") from None
    device = torch.device(device)
    kernel_dtype = dtype is None or dtype in spec.dtypes
    if backend is not None:
        backend = backend.lower()
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)} or None")
        if backend not in spec.backends:
            raise ValueError(f"{op} has no {backend} implementation; it has {', '.join(spec.backends)}")
    else:
        env = forced()
        if env is not None and env in spec.backends:
            backend = env
    if backend is not None:
        # The dtype first: it is a property of the call, the same on every machine, while
        # availability depends on where it runs (a float64 request to the Triton kernel is a
        # TypeError with or without the interpreter).
        if not kernel_dtype and backend != "torch":
            raise TypeError(f"{op}: backend {backend!r} supports {_names(spec.dtypes)}, got {dtype}")
        reason = unavailable_reason(backend, device)
        if reason is not None:
            raise RuntimeError(f"{op}: backend {backend!r} cannot run here: {reason}")
        return backend
    if not kernel_dtype and "torch" in spec.backends:
        return "torch"
    for candidate in _defaults(spec, device):
        if unavailable_reason(candidate, device) is None:
            return candidate
    raise RuntimeError(f"{op}: no backend can run on {device} tensors (implemented: "
                       f"{', '.join(spec.backends)}); {_ext.BUILD_HINT}")


def _names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def table(device: torch.device | str) -> dict[str, str]:
    """{op: backend it would use on ``device`` with float32, or the reason none can}."""
    out = {}
    for op in sorted(OPS):
        try:
            out[op] = select(op, device, torch.float32)
        except (RuntimeError, ValueError) as exc:
            out[op] = f"unavailable ({exc})"
    return out
