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

import importlib.util
import os
from dataclasses import dataclass

import torch

from fused_lm import _ext

BACKENDS = ("cuda", "triton", "cpu", "torch")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class OpSpec:
    backends: tuple[str, ...]            # implemented backends
    gpu_default: str                     # default on CUDA tensors (see the measurement below)
    dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES  # dtypes the kernels take; others -> torch


# GPU defaults: the backend the benchmarks measured fastest on a GPU, with the measurement.
# No GPU measurement exists yet for these ops (no GPU session so far): the CUDA C++ kernel is the
# default for the multi-tensor family because it issues 16-byte vector accesses with several
# loads in flight per thread, which the Triton kernel (one program per chunk) cannot express.
# Revisit with bench/results from `make gpu-check`.
OPS: dict[str, OpSpec] = {
    "multi_tensor_scale": OpSpec(("cuda", "triton", "cpu", "torch"), gpu_default="cuda"),
    # Optimizers (issue 4): same reasoning as multi_tensor_scale, not yet measured on a GPU.
    "adamw": OpSpec(("cuda", "triton", "cpu", "torch"), gpu_default="cuda"),
    "lion": OpSpec(("cuda", "triton", "cpu", "torch"), gpu_default="cuda"),
    # Gradient clipping (issue 5): same reasoning as multi_tensor_scale, not yet measured.
    "multi_tensor_norm": OpSpec(("cuda", "triton", "cpu", "torch"), gpu_default="cuda"),
    "multi_tensor_clamp": OpSpec(("cuda", "triton", "cpu", "torch"), gpu_default="cuda"),
    # Losses (issue 6): Triton default on GPUs, not yet measured on a GPU.
    "cross_entropy": OpSpec(("triton", "torch"), gpu_default="triton"),
    "linear_cross_entropy": OpSpec(("triton", "torch"), gpu_default="triton"),
    # Attention (issue 7): Triton default on GPUs, not yet measured (bench/bench_attention.py).
    "attention": OpSpec(("triton", "torch"), gpu_default="triton"),
}


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


def _defaults(spec: OpSpec, device: torch.device) -> list[str]:
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
    except KeyError:
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
