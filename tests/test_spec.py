"""The op-family specs (fused_lm/ops/_spec.py): one description of each family that the backend
choice, the optimizer engine, the Triton launches, the AOT check and the C++ functors all read."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from fused_lm import _backend
from fused_lm.ops import _spec
from fused_lm.ops._spec import FamilySpec, TensorList


def test_cpp_header_is_generated_from_the_specs():
    """csrc/include/fused_lm/lists.h is what `python -m fused_lm.ops._spec` writes today."""
    want = _spec.render_header(_spec.header_specs())
    assert _spec.HEADER.read_text() == want, "stale lists.h: run python -m fused_lm.ops._spec"
    assert _spec.main(["--check"]) == 0


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to compile the header")
def test_cpp_header_values_equal_the_python_layouts(tmp_path):
    """The C++ compiler agrees with the specs on every list index of every variant (a
    static_assert per index, so a wrong header does not compile)."""
    lines = ['#include "fused_lm/lists.h"']
    for spec in _spec.header_specs():
        for flags in spec.variants():
            args = ", ".join("true" if flags[f] else "false" for f in spec.flags)
            ns = f"flm::lists::{spec.name}"
            lines.append(f"static_assert({ns}::count({args}) == {spec.n_lists(**flags)});")
            for lst in spec.lists:
                want = spec.index(lst.name, **flags) if lst.name in spec.layout(**flags) else -1
                if lst.flag:
                    got = f"{ns}::{lst.name}({args})"
                else:
                    got = f"{ns}::k{_spec._camel(lst.name)}"
                lines.append(f"static_assert({got} == {want}, \"{spec.name} {lst.name} {flags}\");")
    src = tmp_path / "check.cpp"
    src.write_text("\n".join(lines) + "\n")
    include = _spec.HEADER.parents[1]
    proc = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
                           f"-I{include}", str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_op_has_a_consistent_spec():
    for op, spec in _backend.OPS.items():
        assert spec.name == op
        assert spec.gpu_default in spec.backends and set(spec.backends) <= set(_backend.BACKENDS)
        assert "torch" in spec.backends, f"{op}: every family keeps a torch path"
        assert spec.gpu_default_why, f"{op}: say why the GPU default is what it is"
        assert callable(spec.reference_fn()), f"{op}: reference {spec.reference}"


@pytest.mark.parametrize("name", ["adamw", "lion"])
def test_engine_tables_follow_the_spec_layout(name):
    """The optimizer engine builds its tables in SPEC.layout order: each list of the table holds
    the state tensor the layout names (checked by address, every variant the dtype allows)."""
    from fused_lm.optim import AdamW, Lion

    spec = _backend.OPS[name]
    state_key = {"params": None, "grads": "grad", "exp_avgs": "exp_avg",
                 "exp_avg_sqs": "exp_avg_sq", "max_exp_avg_sqs": "max_exp_avg_sq",
                 "masters": "master_param"}
    for flags in spec.variants():
        dtype = torch.bfloat16 if flags.get("master") else torch.float32
        p = torch.nn.Parameter(torch.randn(37, dtype=dtype))
        p.grad = torch.randn_like(p)
        kw = dict(master_weights=flags.get("master", False))
        opt = (AdamW([p], amsgrad=flags.get("amsgrad", False), **kw) if name == "adamw"
               else Lion([p], **kw))
        opt.step()
        (bucket,) = opt._plan.buckets
        assert bucket.layout == spec.layout(**flags)
        lists = bucket.kernel_lists()
        assert len(lists) == spec.n_lists(**flags)
        for list_name, tensors in zip(spec.layout(**flags), lists):
            key = state_key[list_name]
            want = p if key is None else (p.grad if key == "grad" else opt.state[p][key])
            assert tensors[0].data_ptr() == want.data_ptr(), (name, flags, list_name)


def test_triton_kernels_take_the_spec_offsets():
    """The optimizer kernels name every constexpr that SPEC.offsets passes (a renamed list in the
    spec must rename the kernel's parameter, or the launch fails here, not on a GPU)."""
    pytest.importorskip("triton")
    from fused_lm.ops import adamw, lion

    for mod, kernel in ((adamw, "_adamw_kernel"), (lion, "_lion_kernel")):
        names = set(getattr(mod, kernel).arg_names)
        for flags in mod.SPEC.variants():
            assert set(mod.SPEC.offsets(**flags)) <= names


def test_spec_validation():
    with pytest.raises(ValueError, match="after an optional"):
        FamilySpec("f", ("torch",), "torch", "why", "m:f", flags=("a",),
                   lists=(TensorList("x", "param"), TensorList("y", "state", "a"),
                          TensorList("z", "param")))
    with pytest.raises(ValueError, match="needs flag"):
        FamilySpec("f", ("torch",), "torch", "why", "m:f",
                   lists=(TensorList("y", "state", "a"),))
    spec = _backend.OPS["adamw"]
    with pytest.raises(ValueError, match="unknown flags"):
        spec.layout(amsgrad=True, nesterov=True)
    with pytest.raises(ValueError, match="no list"):
        spec.index("max_exp_avg_sqs", amsgrad=False, master=False)
    assert spec.offsets(amsgrad=False, master=True) == {
        "LISTS": 5, "MAX_EXP_AVG_SQS_ROW": -1, "MASTERS_ROW": 4}


def test_launch_offsets_reject_a_table_of_another_variant():
    spec = _backend.OPS["adamw"]
    assert spec.launch_offsets(6, amsgrad=True, master=True)["MASTERS_ROW"] == 5
    with pytest.raises(ValueError, match="the table has 5 lists"):
        spec.launch_offsets(5, amsgrad=True, master=True)


# ------------------------------------------------------------------------------------------------
# One stem per family: a reader finds a family's launcher, reference, tests, benchmark and C++
# sources by its name (SPEC.name). docs/ARCHITECTURE.md has the table.

ROOT = _spec.HEADER.parents[3]   # csrc/include/fused_lm/lists.h -> the repository root


@pytest.mark.parametrize("name", list(_backend.OPS))
def test_family_files_share_its_name(name):
    spec = _backend.OPS[name]
    ops = ROOT / "fused_lm" / "ops"
    assert (ops / f"{name}.py").is_file() or (ops / name / "__init__.py").is_file()
    assert spec.reference.split(":")[0] == f"fused_lm.reference.{name}", spec.reference
    assert list(ROOT.glob(f"tests/*/test_{name}.py")), f"no tests/<area>/test_{name}.py"
    assert (ROOT / "bench" / f"bench_{name}.py").is_file()
    missing = []
    if "cpu" in spec.backends:
        missing += [p for p in (f"csrc/cpu/{name}.cpp",) if not (ROOT / p).is_file()]
    if "cuda" in spec.backends:
        missing += [p for p in (f"csrc/cuda/{name}.cu", f"csrc/cuda/{name}_binding.cpp")
                    if not (ROOT / p).is_file()]
    if {"cpu", "cuda"} & set(spec.backends):
        missing += [p for p in (f"csrc/include/fused_lm/{name}.h",) if not (ROOT / p).is_file()]
    assert not missing, f"{name}: C++ sources not named after the family: {missing}"


def test_benchmark_families_are_the_op_families():
    """bench/run.py runs one family per op family (named as its SPEC, its rows labelled so) plus
    the end-to-end transformers step; the earlier names expand to the families they became."""
    from bench import run

    assert set(run.FAMILIES) == set(_backend.OPS) | {"transformers"}
    assert {p.stem[len("bench_"):] for p in (ROOT / "bench").glob("bench_*.py")} == set(run.FAMILIES)
    for name in _backend.OPS:
        labels = {case.family for case in run.load_family(name).cases(torch.device("cpu"), True)}
        assert labels == {name}, f"bench_{name}.py labels its rows {labels}"
    assert run.expand_families(["optim", "clip", "multi_tensor", "adamw"]) == [
        "adamw", "lion", "multi_tensor_norm", "multi_tensor_scale", "multi_tensor_clamp"]
