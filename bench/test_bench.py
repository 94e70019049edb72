"""Every benchmark case and provider as a pytest-benchmark test (see bench/conftest.py)."""

from __future__ import annotations

import os

import pytest
import torch

from bench import harness
from bench.run import FAMILIES, load_family

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = os.environ.get("FUSED_LM_BENCH_FULL", "0") != "1"


def _params():
    params = []
    for fam in FAMILIES:
        mod = load_family(fam)
        if mod is None:
            continue
        for case in mod.cases(DEVICE, QUICK):
            for prov in case.providers:
                params.append(pytest.param(case, prov, id=f"{fam}-{case.op}-{case.shape}-{case.dtype}-{prov.name}"))
    return params


@pytest.mark.parametrize("case,provider", _params())
def test_bench(benchmark, case, provider):
    try:
        fn = provider.setup()
    except harness.Skip as exc:
        pytest.skip(str(exc))
    benchmark.extra_info.update({"bytes": case.bytes, "flops": case.flops, "device": str(DEVICE)})
    if DEVICE.type == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize()
        benchmark(timed)
    else:
        benchmark(fn)
