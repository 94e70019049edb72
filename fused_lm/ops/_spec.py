"""What an op family is, written down once: ``FamilySpec``.

Each family's module in ``fused_lm/ops`` defines ``SPEC`` next to its launchers: the backends it
implements and the one it defaults to on a GPU (with the measurement, or the reasoning while
there is none), the dtypes its kernels take, its PyTorch twin in ``fused_lm/reference``, and for
the multi-tensor families the names and order of the tensor lists of a table row. Everything else
reads it:

* ``fused_lm/_backend.py`` chooses backends from it (``_backend.OPS`` maps op names to specs);
* the optimizer engine (``optim/_plan.py``) orders a bucket's lists with ``layout``;
* the Triton kernels get the row offset of each optional list as a constexpr (``offsets``);
* ``tools/triton_aot_check.py`` compiles the variants ``variants`` enumerates;
* the C++ functors take the list indices from ``csrc/include/fused_lm/lists.h``, which
  ``python -m fused_lm.ops._spec`` writes from these specs (``tests/test_spec.py`` fails when
  the file is stale).

This module imports no kernel code (no triton): ``_backend`` reads specs without compiling.
"""

from __future__ import annotations

import itertools
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Why the multi-tensor families default to CUDA C++ on a GPU, until a GPU run measures it.
MULTI_TENSOR_GPU_DEFAULT_WHY = (
    "not yet measured on a GPU: the CUDA C++ kernel issues 16-byte vector accesses with several "
    "loads in flight per thread, which one Triton program per chunk does not express; revisit "
    "with bench/results of make gpu-check")


@dataclass(frozen=True)
class TensorList:
    """One tensor list of a table row. ``storage``: the dtype of its elements, "param" (the
    parameter dtype), "state" (the optimizer-state dtype) or "float32". ``flag``: the variant
    flag that adds it (it is absent without), "" for a list every variant has."""
    name: str
    storage: str
    flag: str = ""


@dataclass(frozen=True)
class FamilySpec:
    name: str                                  # the op name _backend.select takes
    backends: tuple[str, ...]                  # implemented, in no particular order
    gpu_default: str                           # default on CUDA tensors
    gpu_default_why: str                       # the measurement (or reasoning) behind it
    reference: str                             # "module:function" of the PyTorch twin
    dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES   # the kernels' dtypes; others -> torch
    lists: tuple[TensorList, ...] = ()         # table row order: fixed lists, then optional ones
    flags: tuple[str, ...] = field(default=())  # the variant flags that add lists, in order

    def __post_init__(self):
        seen_optional = False
        for lst in self.lists:
            if lst.flag and lst.flag not in self.flags:
                raise ValueError(f"{self.name}: list {lst.name} needs flag {lst.flag!r}, "
                                 f"not one of {self.flags}")
            if seen_optional and not lst.flag:
                raise ValueError(f"{self.name}: fixed list {lst.name} after an optional one")
            seen_optional = seen_optional or bool(lst.flag)

    def pick(self, **flags: bool) -> dict[str, bool]:
        """The flags among ``flags`` this family has (an engine shared by families passes all)."""
        return {f: bool(v) for f, v in flags.items() if f in self.flags}

    def layout(self, **flags: bool) -> tuple[str, ...]:
        """The names of the lists of a variant, in table order."""
        self._check_flags(flags)
        return tuple(lst.name for lst in self.lists if not lst.flag or flags.get(lst.flag))

    def n_lists(self, **flags: bool) -> int:
        return len(self.layout(**flags))

    def index(self, name: str, **flags: bool) -> int:
        """The row offset of list ``name`` in a variant (ValueError when the variant lacks it)."""
        layout = self.layout(**flags)
        if name not in layout:
            raise ValueError(f"{self.name}: no list {name!r} with {flags}; it has {layout}")
        return layout.index(name)

    def offsets(self, **flags: bool) -> dict[str, int]:
        """The Triton constexprs of a variant: LISTS (lists per row) and, for every optional
        list, ``<NAME>_ROW``, its row offset (-1 when the variant lacks it)."""
        layout = self.layout(**flags)
        out = {"LISTS": len(layout)}
        for lst in self.lists:
            if lst.flag:
                out[f"{lst.name.upper()}_ROW"] = layout.index(lst.name) if lst.name in layout else -1
        return out

    def launch_offsets(self, table_lists: int, **flags: bool) -> dict[str, int]:
        """``offsets`` of a variant, after checking that a table built for it has that many lists
        (the Triton kernels index rows by these constexprs and cannot check)."""
        offsets = self.offsets(**flags)
        if table_lists != offsets["LISTS"]:
            raise ValueError(f"{self.name}: the table has {table_lists} lists; {flags} needs "
                             f"{offsets['LISTS']} ({self.layout(**flags)})")
        return offsets

    def variants(self) -> list[dict[str, bool]]:
        """Every combination of the flags."""
        return [dict(zip(self.flags, bits))
                for bits in itertools.product((False, True), repeat=len(self.flags))]

    def reference_fn(self):
        import importlib

        module, fn = self.reference.split(":")
        return getattr(importlib.import_module(module), fn)

    def _check_flags(self, flags: dict) -> None:
        unknown = set(flags) - set(self.flags)
        if unknown:
            raise ValueError(f"{self.name}: unknown flags {sorted(unknown)}; it has {self.flags}")


# ---- the C++ header ----------------------------------------------------------------------------

HEADER = Path(__file__).resolve().parents[2] / "csrc" / "include" / "fused_lm" / "lists.h"
# The families whose tables the C++ functors read (the others have a single list, "x").
HEADER_FAMILIES = ("fused_lm.ops.adamw", "fused_lm.ops.lion")


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def render_header(specs: list[FamilySpec]) -> str:
    """lists.h: per family a namespace with kName for every fixed list, a constexpr function
    name(flags...) for every optional one (-1 when absent), and count(flags...)."""
    out = ["// Generated by `python -m fused_lm.ops._spec` from the family specs (SPEC in",
           "// fused_lm/ops/<family>.py): the position of each tensor list in a table row.",
           "// Do not edit; tests/test_spec.py fails when this file differs from the specs.",
           "#pragma once", "", "namespace flm::lists {", ""]
    for spec in specs:
        fixed = [lst for lst in spec.lists if not lst.flag]
        out.append(f"namespace {spec.name} {{")
        for i, lst in enumerate(fixed):
            out.append(f"constexpr int k{_camel(lst.name)} = {i};")
        terms = [str(len(fixed))]

        def fn(name: str, body: str) -> str:
            # Every function takes every flag (one call shape per family); unused ones marked.
            params = ", ".join(("" if re.search(rf"\b{f}\b", body) else "[[maybe_unused]] ")
                               + f"bool {f}" for f in spec.flags)
            return f"constexpr int {name}({params}) {{ return {body}; }}"

        for lst in spec.lists:
            if not lst.flag:
                continue
            out.append(fn(lst.name, f"{lst.flag} ? {' + '.join(terms)} : -1"))
            terms.append(f"({lst.flag} ? 1 : 0)")
        out.append(fn("count", " + ".join(terms)))
        out.append(f"}}  // namespace {spec.name}")
        out.append("")
    out.append("}  // namespace flm::lists")
    return "\n".join(out) + "\n"


def header_specs() -> list[FamilySpec]:
    import importlib

    return [importlib.import_module(m).SPEC for m in HEADER_FAMILIES]


def main(argv: list[str]) -> int:
    text = render_header(header_specs())
    if "--check" in argv:
        current = HEADER.read_text() if HEADER.exists() else ""
        if current != text:
            print(f"{HEADER} is stale: run python -m fused_lm.ops._spec", file=sys.stderr)
            return 1
        return 0
    HEADER.write_text(text)
    print(f"wrote {HEADER}")
    return 0



if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
