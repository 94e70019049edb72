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

from tests._helpers import DEVICES, HAS_CUDA, SEED  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs CUDA (realistic sizes on a GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
