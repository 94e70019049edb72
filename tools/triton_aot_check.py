#!/usr/bin/env python
"""Ahead-of-time compile check of every Triton kernel of fused_lm for real GPU targets, no GPU needed.

The CPU tests run the kernels under the Triton interpreter (TRITON_INTERPRET=1), which never runs
the compiler: a kernel can pass every CPU test and still fail to build on a GPU (type errors,
unsupported ops, constexpr misuse, shared memory). This script builds each kernel with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` (frontend, MLIR passes, LLVM,
PTX and, when ptxas is found, the cubin) over the constexpr variants the launchers really choose
on a GPU (their block-size / config functions are called, not copied), and prints one line per
variant: ok or the compiler error, with registers, spills and shared memory when available.

    .venv/bin/python tools/triton_aot_check.py            # every variant, sm_90 and sm_80
    .venv/bin/python tools/triton_aot_check.py --quick    # the bounded set of tests/test_triton_aot.py
    .venv/bin/python tools/triton_aot_check.py --only attention --arch 90 -v

The PTX of the multi-tensor kernels is read too (``PTX_RULES``): a variant fails when it uses
Triton's approximate float32 division or square root (the GPU lowering of '/' and ``tl.sqrt``)
where torch is IEEE-rounded, a NaN-dropping max where torch.maximum propagates NaN, or, in its
ALIGNED variant, has no 128-bit global load/store (``--ptx-dir DIR`` writes every PTX file).

Exit status: 0 when every variant compiles (or the check is skipped: no triton, no AOT API), 1
when a variant fails. Spills are reported, not failures. Shared memory over the target's
per-block limit fails a variant, except a non-last entry of a launcher's fall-back list (the
flash-attention launcher retries the next config on OutOfResources).

Adding a kernel: one ``Spec`` entry in ``SPECS`` (runtime argument types + a variants function).
Runs as its own process: it unsets TRITON_INTERPRET before importing triton (and refuses to run
if triton was already imported in interpreter mode). Compiles into a throw-away cache directory.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import itertools
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
SMEM_LIMIT = {90: 232448, 80: 166912, 89: 101376, 86: 101376}   # max dynamic shared bytes per block


# ----------------------------------------------------------------------------------------------
# The kernel table
# ----------------------------------------------------------------------------------------------

@dataclass
class Variant:
    label: str
    constexprs: dict                         # constexpr name -> value
    subst: dict = field(default_factory=dict)  # "{dt}"-style placeholders of the argument types
    num_warps: int = 4
    num_stages: int = 3
    fallback_ok: bool = False                # a launcher falls back to another config if it is too big
    options: dict = field(default_factory=dict)  # further compile options the launcher passes
    divisible: tuple = ()                    # int arguments the JIT sees as multiples of 16


@dataclass
class Spec:
    family: str                              # --only selects by family
    module: str
    kernel: str
    types: dict                              # runtime (non-constexpr) argument -> Triton type;
                                             # unlisted arguments are i32 (ints: strides, sizes)
    variants: Callable                       # (module, quick) -> list[Variant]


DT = ("fp32", "bf16", "fp16")


def _tl(name: str):
    import triton.language as tl

    return {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}[name]


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _chunk() -> int:
    from fused_lm.ops import _multi_tensor as mt

    return mt.CHUNK


def _mt_options() -> dict:
    """The compile options of every multi-tensor launch (no FP contraction)."""
    from fused_lm.ops import _multi_tensor as mt

    return dict(mt.LAUNCH_OPTIONS)


def _alignments(quick: bool, first: bool) -> tuple:
    """ALIGNED values to build: both in the full set; in the quick set the aligned variant (the
    one the PTX rules read) and, for the first case of a kernel, the unaligned one too."""
    return (True, False) if not quick or first else (True,)


def _v_scale(m, quick):
    return [Variant(dt + " aligned" * al, dict(DTYPE=_tl(dt), ALIGNED=al, CHUNK=_chunk(),
                                                BLOCK=m._BLOCK), options=_mt_options())
            for i, dt in enumerate(DT) for al in _alignments(quick, i == 0)]


def _v_norm_partials(m, quick):
    kinds = {m.SUM_ABS: "sum|x|", m.SUM_SQ: "sum x^2", m.SUM_POW: "sum|x|^p", m.MAX_ABS: "max|x|",
             m.MIN_ABS: "min|x|"}
    out = []
    for dt in DT:
        for kind, name in kinds.items():
            if quick and dt != "fp32" and kind != m.SUM_SQ:
                continue
            for al in _alignments(quick, not out):
                out.append(Variant(f"{dt} {name}" + " aligned" * al,
                                   dict(DTYPE=_tl(dt), KIND=kind, ALIGNED=al, CHUNK=_chunk(),
                                        BLOCK=m._BLOCK), options=_mt_options()))
    return out


def _v_norm_finalize(m, quick):
    return [Variant(f"kind={k}", dict(KIND=k, BLOCK=m._FINAL_BLOCK), options=_mt_options())
            for k in (m.SUM_ABS, m.SUM_SQ, m.SUM_POW, m.MAX_ABS, m.MIN_ABS)]


def _v_step(m, quick):
    return [Variant("", dict(BLOCK=m._STEP_BLOCK))]


def _optim_combos(quick: bool, amsgrad_options):
    """(param dtype, state dtype, amsgrad, master, sr) the optimizers can hand the kernel: state
    dtype = the param dtype, fp32 or bf16; master copies for low-precision params; stochastic
    rounding only for bf16 params (the launchers turn it off otherwise)."""
    if quick:
        return [("fp32", "fp32", False, False, False), ("bf16", "fp32", True, True, True),
                ("bf16", "bf16", False, False, True), ("fp16", "fp16", True, False, False)]
    out = []
    for p in DT:
        for s in sorted({p, "fp32", "bf16"}):
            for ams, master, sr in itertools.product(amsgrad_options, (False, True), (False, True)):
                if (master and p == "fp32") or (sr and p != "bf16"):
                    continue
                out.append((p, s, ams, master, sr))
    return out


def _v_adamw(m, quick):
    from fused_lm.ops import _optim_common as oc

    out = []
    for i, (p, s, ams, master, sr) in enumerate(_optim_combos(quick, (False, True))):
        label = f"p={p} s={s}" + " amsgrad" * ams + " master" * master + " sr" * sr
        for al in _alignments(quick, i == 0):
            for seed in (("i32", "i64") if not quick and sr and al else ("i32",)):
                out.append(Variant(label + " aligned" * al + (f" seed:{seed}" if seed != "i32" else ""),
                                   dict(P_DTYPE=_tl(p), S_DTYPE=_tl(s), AMSGRAD=ams, MASTER=master,
                                        SR=sr, ALIGNED=al, HP_COLS=oc.HP_COLS, CHUNK=_chunk(),
                                        BLOCK=m._BLOCK,
                                        **m.SPEC.offsets(amsgrad=ams, master=master)),
                                   {"seed": seed},
                                   options=_mt_options()))
    return out


def _v_lion(m, quick):
    from fused_lm.ops import _optim_common as oc

    out = []
    for i, (p, s, _, master, sr) in enumerate(_optim_combos(quick, (False,))):
        label = f"p={p} s={s}" + " master" * master + " sr" * sr
        for al in _alignments(quick, i == 0):
            out.append(Variant(label + " aligned" * al,
                               dict(P_DTYPE=_tl(p), S_DTYPE=_tl(s), MASTER=master, SR=sr,
                                    ALIGNED=al, HP_COLS=oc.HP_COLS, CHUNK=_chunk(),
                                    BLOCK=m._BLOCK, **m.SPEC.offsets(master=master)),
                               {"seed": "i32"},
                               options=_mt_options()))
    return out


_CE_FLAGS = ("HAS_WEIGHT", "HAS_SMOOTHING", "HAS_Z", "HAS_SOFTCAP", "MEAN", "HAS_ROW_SCALE",
             "COMPUTE_GRAD")


def _v_ce(m, quick):
    """Every flag on at least once, at the block sizes _config picks for a small, a mid and a
    large vocabulary."""
    vocabs = (50257, 1000) if quick else (128256, 32000, 1000)
    flagsets = {"grad": {"COMPUTE_GRAD"}, "all": set(_CE_FLAGS), "fwd-only": set()}
    if not quick:
        flagsets.update({f: {f, "COMPUTE_GRAD"} for f in _CE_FLAGS if f != "COMPUTE_GRAD"})
    out = []
    for dt in DT:
        for v in vocabs:
            block, warps = m._config(v)
            for name, on in flagsets.items():
                if quick and (dt != "bf16" or v != vocabs[0]) and name != "all":
                    continue
                out.append(Variant(f"{dt} V={v} {name}",
                                   {**{f: f in on for f in _CE_FLAGS}, "BLOCK": block},
                                   {"dt": dt, "wt": "fp32" if "HAS_WEIGHT" in on else dt},
                                   num_warps=warps))
    return out


def _v_ce_scale(m, quick):
    return [Variant(f"{dt} per_row={pr}", dict(PER_ROW=pr, BLOCK=m._SCALE_BLOCK), {"dt": dt},
                    num_warps=4)
            for dt in DT for pr in (False, True)]


_ATTN_FLAGS = {
    "causal": dict(varlen=False, has_left=False, has_right=True, softcap=False, bias=False),
    "all": dict(varlen=True, has_left=True, has_right=True, softcap=True, bias=True),
    "plain": dict(varlen=False, has_left=False, has_right=False, softcap=False, bias=False),
}


def _attention_variant(m, kind, dt, hd, fname, precision, config, fallback_ok):
    """One attention build (``m``: the kernels module) with the launcher's own constexprs: those
    of the Problem the launcher would build for these features (fused_lm.ops.attention)."""
    a = importlib.import_module("fused_lm.ops.attention")
    dtype = _torch_dtype(dt)
    if kind == "pre":
        flags = dict(_ATTN_FLAGS["all" if fname == "varlen" else "plain"])
    else:
        flags = dict(_ATTN_FLAGS[fname])
    problem = a.Problem(dtype, hd, varlen=flags["varlen"], has_left=flags["has_left"],
                        has_right=flags["has_right"], softcap=1.0 if flags["softcap"] else 0.0,
                        bias=flags["bias"], precision=precision)
    ce = {**problem.meta(kind), **a.config_meta(kind, config)}
    label = (f"{dt}{'/' + precision if dt == 'fp32' else ''} d={hd} {fname} BM={config.block_m}"
             + (f" BN={config.block_n}" if kind != "pre" else "")
             + f" w{config.num_warps} s{config.num_stages}")
    # Strides are multiples of 16 when the head dim is (the JIT specialises them so at run time).
    strides = tuple(n for n in getattr(m, _ATTN_KERNEL[kind]).arg_names
                    if n.startswith("stride_") and hd % 16 == 0)
    return Variant(label, ce, {"dt": dt, "cu": "i32" if flags["varlen"] else "fp32"},
                   num_warps=config.num_warps, num_stages=config.num_stages,
                   fallback_ok=fallback_ok, divisible=strides)


def _attention_variants(kind: str):
    """Head dims 64/128/256 (and 96 and 59: the masked head-dim path), every dtype (fp32 at the
    TF32 and IEEE product precisions), every config of the launcher's list for that head dim and
    dtype in this Triton version (launch_configs; later ones are fall-backs); feature flags:
    causal, none, all on (varlen + window + softcap + bias). Quick: the first config only."""

    def build(m, quick):
        fnames = ("batched", "varlen") if kind == "pre" else tuple(_ATTN_FLAGS)
        if quick:     # the main config first (it also gets sm_80), then every flag, dtype, odd D
            cases = [("bf16", 128, "causal"), ("bf16", 64, "all"), ("fp16", 59, "plain"),
                     ("fp32", 64, "causal")]
            if kind == "pre":
                cases = [("bf16", 128, "batched"), ("bf16", 64, "varlen"), ("fp32", 96, "varlen")]
        else:
            cases = [(dt, hd, f) for dt in DT for hd in (59, 64, 96, 128, 256) for f in fnames]
        out = []
        for dt, hd, fname in cases:
            a = importlib.import_module("fused_lm.ops.attention")
            # fp32: both product precisions (TF32 tensor cores; IEEE, torch's default), each
            # with its own configs -- not in the quick set, which keeps its time.
            precisions = ("tf32", "ieee") if dt == "fp32" and kind != "pre" and not quick else ("tf32",)
            for precision in precisions:
                configs = a.Problem(_torch_dtype(dt), hd, precision=precision).configs(
                    kind, interpreted=False)
                if quick or _FIRST_CONFIG:
                    configs = configs[:1]
                for i, config in enumerate(configs):
                    out.append(_attention_variant(m, kind, dt, hd, fname, precision, config,
                                                  i + 1 < len(configs)))
        return out

    return build


# Candidate block configurations for choosing the launcher's tables (--attention-sweep): tiles
# of 16..128 rows; for the wgmma instructions of sm_90 the M side of every product (BLOCK_M in
# fwd/dq, BLOCK_N in dkdv) needs 64 rows per warpgroup of 4 warps.
_SWEEP = {
    "fwd": [(128, 128, 8), (128, 64, 8), (128, 32, 8), (128, 64, 4), (64, 128, 4), (64, 64, 4),
            (64, 32, 4), (32, 32, 4), (32, 16, 4), (16, 16, 4)],
    "dkdv": [(32, 128, 8), (64, 128, 8), (16, 128, 8), (32, 128, 4), (64, 64, 4), (32, 64, 4),
             (16, 64, 4), (16, 32, 4), (16, 16, 4)],
    "dq": [(128, 64, 8), (128, 32, 8), (128, 16, 8), (64, 64, 4), (64, 32, 4), (64, 16, 4),
           (32, 32, 4), (32, 16, 4), (16, 16, 4)],
}


def _attention_sweep(kind: str):
    """--attention-sweep: every candidate tile for bf16 (stages 2 and 3; 1 and 2 at d=256) and
    fp32 (TF32; stages 2, or 1 at d=256) at d = 64, 128, 256, causal: the rows to choose
    launch_configs' tables from."""

    def build(m, quick):
        from fused_lm.ops.attention import Config

        if kind == "pre":
            return []
        out = []
        for dt in ("bf16", "fp32"):
            for hd in (64, 128, 256):
                for bm, bn, warps in _SWEEP[kind]:
                    stages_list = (1, 2) if hd == 256 else (2, 3)
                    for stages in (stages_list if dt == "bf16" else stages_list[:1]):
                        out.append(_attention_variant(m, kind, dt, hd, "causal", "tf32",
                                                      Config(bm, bn, warps, stages), True))
        return out

    return build


_MT = {"table_ptr": "*i64", "chunks_ptr": "*i64"}
_OPT = {**_MT, "step_table_ptr": "*i64", "hp_ptr": "*fp32", "mult_ptr": "*fp32",
        "skip_ptr": "*fp32", "seed": "{seed}"}
_FA = {"Q": "*{dt}", "K": "*{dt}", "V": "*{dt}", "O": "*{dt}", "DO": "*{dt}", "DQ": "*{dt}",
       "DK": "*{dt}", "DV": "*{dt}", "LSE": "*fp32", "DELTA": "*fp32", "BIAS": "*fp32",
       "CU_Q": "*{cu}", "CU_K": "*{cu}", "qk_scale": "fp32", "softcap_log2": "fp32",
       "sm_scale": "fp32"}

_ATTN_KIND = {"_fwd_kernel": "fwd", "_bwd_preprocess_kernel": "pre", "_bwd_dkdv_kernel": "dkdv",
              "_bwd_dq_kernel": "dq"}
_ATTN_KERNEL = {kind: kernel for kernel, kind in _ATTN_KIND.items()}

SPECS = [
    Spec("multi_tensor", "fused_lm.ops.multi_tensor_scale", "_scale_kernel",
         {**_MT, "scale_ptr": "*fp32"}, _v_scale),
    Spec("multi_tensor", "fused_lm.ops.multi_tensor_clamp", "_clamp_kernel",
         {**_MT, "lo": "fp32", "hi": "fp32", "lo_q": "fp32", "hi_q": "fp32"}, _v_scale),
    Spec("multi_tensor", "fused_lm.ops.multi_tensor_norm", "_norm_partials_kernel",
         {**_MT, "partials_ptr": "*fp32", "p": "fp32"}, _v_norm_partials),
    Spec("multi_tensor", "fused_lm.ops.multi_tensor_norm", "_norm_finalize_kernel",
         {"partials_ptr": "*fp32", "out_ptr": "*fp32", "p": "fp32", "max_norm": "fp32"},
         _v_norm_finalize),
    Spec("optim", "fused_lm.ops._optim_common", "_step_kernel",
         {"step_table_ptr": "*i64", "skip_ptr": "*fp32"}, _v_step),
    Spec("optim", "fused_lm.ops.adamw", "_adamw_kernel", _OPT, _v_adamw),
    Spec("optim", "fused_lm.ops.lion", "_lion_kernel", _OPT, _v_lion),
    Spec("cross_entropy", "fused_lm.ops.cross_entropy", "_ce_kernel",
         {"x_ptr": "*{dt}", "target_ptr": "*i64", "weight_ptr": "*{wt}", "loss_ptr": "*fp32",
          "grad_ptr": "*{dt}", "den_ptr": "*fp32", "cnt_ptr": "*fp32", "row_scale_ptr": "*fp32",
          "eps": "fp32", "z_loss": "fp32", "softcap": "fp32"}, _v_ce),
    Spec("cross_entropy", "fused_lm.ops.cross_entropy", "_scale_kernel",
         {"g_ptr": "*{dt}", "s_ptr": "*fp32"}, _v_ce_scale),
    Spec("attention", "fused_lm.ops.attention.kernels", "_fwd_kernel", _FA, _attention_variants("fwd")),
    Spec("attention", "fused_lm.ops.attention.kernels", "_bwd_preprocess_kernel", _FA,
         _attention_variants("pre")),
    Spec("attention", "fused_lm.ops.attention.kernels", "_bwd_dkdv_kernel", _FA,
         _attention_variants("dkdv")),
    Spec("attention", "fused_lm.ops.attention.kernels", "_bwd_dq_kernel", _FA,
         _attention_variants("dq")),
]
# fused_lm.ops.linear_cross_entropy has no kernel of its own: it runs _ce_kernel on vocabulary
# chunks (covered above with its vocabularies and flags).


# ----------------------------------------------------------------------------------------------
# PTX rules of the multi-tensor kernels (issue 11): IEEE-rounded math, NaN-propagating max,
# 128-bit global accesses in the ALIGNED variants
# ----------------------------------------------------------------------------------------------

# Triton's default '/' and sqrt on float32 become the approximate div.full / sqrt.approx on a GPU
# (exact under the interpreter), its exp2/log2 the approximate ex2/lg2 (2^-22 absolute error).
_PTX_APPROX_ARITH = re.compile(r"\b(?:div\.full|div\.approx|sqrt\.approx|rcp\.approx)(?:\.ftz)?\.f32\b")
_PTX_APPROX_EXP = re.compile(r"\b(?:lg2|ex2)\.approx(?:\.ftz)?\.f32\b")
# max.f32 (maxNum) drops NaN; torch.maximum keeps it (max.NaN.f32 would be fine).
_PTX_NAN_DROPPING_MAX = re.compile(r"\bmax(?:\.ftz)?\.f32\b")
# One 128-bit global access: 4 x 32-bit, 2 x 64-bit or 8 x 16-bit lanes, any cache qualifiers.
_PTX_V128 = {op: re.compile(rf"\b{op}\.global(?:\.[\w:]+)*?\.(?:v4\.[bfsu]32|v2\.[bfsu]64|v8\.[bfsu]16|v8\.bf16)\b")
             for op in ("ld", "st")}


@dataclass
class PtxRule:
    vector: tuple = ()          # "ld"/"st": at least one 128-bit access in the ALIGNED variant
    require: tuple = ()         # instructions that must appear (the IEEE-rounded forms)
    exp_ok: bool = False        # approximate ex2/lg2 allowed (the p-norm's |x|^p, as documented)
    nan_max: bool = False       # no NaN-dropping max.f32


# By "module.kernel" (Task.name). Every multi-tensor kernel forbids the approximate division and
# square root: torch's are IEEE-rounded, and so must ours be on the GPU as in the interpreter.
PTX_RULES = {
    "adamw._adamw_kernel": PtxRule(("ld", "st"), ("div.rn.f32", "sqrt.rn.f32", "fma.rn.f32"),
                                   nan_max=True),
    "lion._lion_kernel": PtxRule(("ld", "st"), ("fma.rn.f32",)),
    "multi_tensor_scale._scale_kernel": PtxRule(("ld", "st")),
    "multi_tensor_clamp._clamp_kernel": PtxRule(("ld", "st")),
    "multi_tensor_norm._norm_partials_kernel": PtxRule(("ld",), exp_ok=True),
    "multi_tensor_norm._norm_finalize_kernel": PtxRule((), ("div.rn.f32",), exp_ok=True),
}


def ptx_problems(task: Task, ptx: str) -> list[str]:
    """What ``ptx`` (of ``task``'s variant) breaks of its kernel's PtxRule; [] if none."""
    rule = PTX_RULES.get(task.name)
    if rule is None or not ptx:
        return []
    body = "\n".join(line.split("//")[0] for line in ptx.splitlines())    # no comments
    problems = []
    approx = set(_PTX_APPROX_ARITH.findall(body))
    if not rule.exp_ok:
        approx |= set(_PTX_APPROX_EXP.findall(body))
    if approx:
        problems.append(f"approximate {', '.join(sorted(approx))} (expected div_rn/sqrt_rn/exact pow)")
    require = list(rule.require)
    if task.name.endswith("_norm_finalize_kernel") and task.variant.constexprs.get("KIND") == 1:
        require.append("sqrt.rn.f32")
    missing = [r for r in require if not re.search(rf"\b{re.escape(r)}\b", body)]
    if missing:
        problems.append(f"no {', '.join(missing)} in the PTX")
    if rule.nan_max and _PTX_NAN_DROPPING_MAX.search(body):
        problems.append("NaN-dropping max.f32 (expected a NaN-propagating max, as torch.maximum)")
    if task.variant.constexprs.get("ALIGNED"):
        for op in rule.vector:
            if not _PTX_V128[op].search(body):
                problems.append(f"no 128-bit global {'load' if op == 'ld' else 'store'} in the "
                                f"ALIGNED variant (expected {op}.global.v4.b32 or similar)")
    return problems


def _ptx_file_name(task: Task) -> str:
    return re.sub(r"[^\w.=-]+", "_", f"sm{task.arch}_{task.name}_{task.variant.label}").strip("_") + ".ptx"


# ----------------------------------------------------------------------------------------------
# Compiling one variant (Triton 3.0 .. 3.9 API differences handled here)
# ----------------------------------------------------------------------------------------------

@dataclass
class Task:
    name: str
    spec: Spec
    variant: Variant
    arch: int


_PTX_ONLY = False
_PTX_DIR = None                              # --ptx-dir: where each variant's PTX is written
_FIRST_CONFIG = False         # attention: only the configuration each launch tries first


def _ast_source(fn, spec: Spec, variant: Variant, backend):
    """ASTSource for ``fn`` with ``variant``: modern (3.2+: name-keyed signature including
    "constexpr" entries, ``constexprs``, dict ``attrs``) or legacy (3.0/3.1: ``constants``,
    signature of the runtime arguments only, AttrsDescriptor)."""
    from triton.compiler import ASTSource

    names = list(fn.arg_names)
    const_names = {p.name for p in fn.params if p.is_constexpr}
    missing = set(variant.constexprs) ^ const_names
    if missing:
        raise ValueError(f"constexprs of the table and of {fn.__name__} differ: {sorted(missing)}")
    types = {}
    for name in names:
        if name in const_names:
            continue
        t = spec.types.get(name, "i32").format(**variant.subst)
        if name.endswith("_ptr") and not t.startswith("*"):
            raise ValueError(f"{fn.__name__}: pointer {name} has no pointer type in the table")
        types[name] = t
    pointers = [i for i, n in enumerate(names) if n in types and types[n].startswith("*")]
    # Integer arguments that are multiples of 16 at run time get the same "divisible by 16"
    # specialisation from the JIT (it decides the vector width of loads, and so pipelining).
    pointers += [names.index(n) for n in variant.divisible]
    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in params:
        sig = {n: types.get(n, "constexpr") for n in names}
        consts = {(names.index(k),): v for k, v in variant.constexprs.items()}
        # Pointers from torch allocations are 16-byte aligned: the JIT specialises them so.
        attrs = ({(i,): backend.parse_attr("D") for i in pointers}
                 if hasattr(backend, "parse_attr") else None)
        return ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    sig = {names.index(n): t for n, t in types.items()}
    consts = {names.index(k): v for k, v in variant.constexprs.items()}
    attrs = None
    try:
        from triton.compiler.compiler import AttrsDescriptor   # 3.0
    except ImportError:
        try:
            from triton.backends.compiler import AttrsDescriptor   # 3.1
        except ImportError:
            AttrsDescriptor = None
    if AttrsDescriptor is not None:
        try:
            attrs = AttrsDescriptor(divisible_by_16=set(pointers), equal_to_1=set())
        except TypeError:
            attrs = None
    return ASTSource(fn, sig, constants=consts, attrs=attrs)


def _ptxas_info(log: str) -> dict:
    info = {}
    for key, pattern in (("regs", r"Used (\d+) registers"), ("spill", r"(\d+) bytes spill stores"),
                         ("stack", r"(\d+) bytes stack frame")):
        found = re.findall(pattern, log)
        if found:
            info[key] = max(int(x) for x in found)
    return info


def _mma_kind(ptx) -> str | None:
    """Which matrix instructions the PTX uses: wgmma (sm_90 warpgroup MMA), mma (mma.sync), or
    None (no tensor-core product: FMA loops, or a kernel without dots)."""
    ptx = ptx.decode() if isinstance(ptx, bytes) else (ptx or "")
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma"
    return None


def compile_task(task: Task) -> dict:
    """Compiles one variant; returns {ok, error, regs, spill, smem, seconds}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    t0 = time.perf_counter()
    out = {"ok": False, "error": None}
    try:
        fn = getattr(importlib.import_module(task.spec.module), task.spec.kernel)
        target = GPUTarget("cuda", task.arch, 32)
        backend = make_backend(target)
        src = _ast_source(fn, task.spec, task.variant, backend)
        options = {"num_warps": task.variant.num_warps, "num_stages": task.variant.num_stages,
                   **task.variant.options}
        if _PTX_ONLY:
            from triton.backends.nvidia.compiler import CUDABackend

            CUDABackend.make_cubin = lambda *a, **k: b""   # noqa: E731 - stop after PTX
            options["ptx_version"] = 84
        log = io.StringIO()
        knobs = getattr(triton, "knobs", None)
        nv = getattr(knobs, "nvidia", None)
        if nv is not None and hasattr(nv, "dump_ptxas_log"):
            nv.dump_ptxas_log = True           # ptxas -v output, printed by triton: captured here
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kernel = triton.compile(src, target=target, options=options)
        md = kernel.metadata
        shared = md.get("shared") if isinstance(md, dict) else getattr(md, "shared", None)
        ptx = kernel.asm.get("ptx", "") if hasattr(kernel.asm, "get") else ""
        out.update(_ptxas_info(log.getvalue()), ok=True, smem=shared, mma=_mma_kind(ptx))
        if _PTX_DIR:
            Path(_PTX_DIR, _ptx_file_name(task)).write_text(ptx)
        problems = ptx_problems(task, ptx)
        if problems:
            out["ok"] = False
            out["ptx"] = "; ".join(problems)
        limit = SMEM_LIMIT.get(task.arch)
        if shared is not None and limit is not None and shared > limit:
            out["ok"] = task.variant.fallback_ok
            out["oor"] = f"shared memory {shared} B > {limit} B per block on sm_{task.arch}"
    except Exception as exc:  # noqa: BLE001 - every compiler error is a result here
        text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        out["error"] = text
        out["trace"] = traceback.format_exc()
    out["seconds"] = time.perf_counter() - t0
    return out


_TASKS: list[Task] = []


def _run_index(i: int) -> dict:
    return compile_task(_TASKS[i])


def _probe() -> dict:
    """A trivial kernel through the same path: tells an unusable API/toolchain from a kernel bug."""
    import triton
    import triton.language as tl

    globals()["tl"] = tl                    # the kernel resolves names through its globals

    @triton.jit
    def _aot_probe_kernel(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2.0, mask=offs < n)

    globals()["_aot_probe_kernel"] = _aot_probe_kernel
    spec = Spec("probe", __name__, "_aot_probe_kernel", {"x_ptr": "*fp32"}, None)
    return compile_task(Task("probe", spec, Variant("", dict(BLOCK=128)), 90))


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def _fmt(task: Task, r: dict, verbose: bool) -> str:
    head = f"sm_{task.arch}  {task.name:<44} {task.variant.label}"
    if r["error"]:
        first = r["error"].splitlines()
        msg = first[-1] if first else "?"
        detail = ("\n" + "\n".join("      " + line for line in
                                   (r["trace"] if verbose else r["error"]).splitlines()[-40:]))
        return f"FAIL  {head}\n      error: {msg[:400]}{detail}"
    bits = []
    for key, unit in (("regs", ""), ("spill", " B"), ("smem", " B"), ("mma", "")):
        if r.get(key) is not None:
            bits.append(f"{key}={r[key]}{unit}")
    status = "ok  " if r["ok"] and not r.get("oor") else ("oor " if r["ok"] else "FAIL")
    note = f"  [{r['oor']}{', launcher falls back' if r['ok'] else ''}]" if r.get("oor") else ""
    warn = "  [SPILLS]" if r.get("spill") else ""
    ptx = f"\n      ptx: {r['ptx']}" if r.get("ptx") else ""
    return f"{status}  {head}  {' '.join(bits)}  ({r['seconds']:.1f}s){warn}{note}{ptx}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="bounded variant set (the test's): sm_90, "
                    "plus sm_80 for the first variant of each kernel")
    ap.add_argument("--arch", type=int, action="append", help="compute capability (repeatable); "
                    "default 90 and 80")
    ap.add_argument("--only", action="append", help="kernel family or kernel name substring")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--ptx-only", action="store_true", help="stop at PTX (no ptxas)")
    ap.add_argument("--ptx-dir", help="write each variant's PTX into this directory")
    ap.add_argument("--list", action="store_true", help="list the variants, compile nothing")
    ap.add_argument("--first-config", action="store_true", help="attention: compile only the "
                    "configuration the launcher tries first (not its fall-backs)")
    ap.add_argument("--attention-sweep", action="store_true", help="attention: compile the "
                    "candidate block configurations (to choose the launcher's tables) instead "
                    "of the launcher's own")
    ap.add_argument("-v", "--verbose", action="store_true", help="full tracebacks of failures")
    args = ap.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        if "triton" in sys.modules:
            print("triton_aot_check: triton was imported with TRITON_INTERPRET set; run this "
                  "script as its own process", file=sys.stderr)
            return 2
        del os.environ["TRITON_INTERPRET"]          # the real compiler, not the interpreter
    sys.path.insert(0, str(REPO))
    cache = tempfile.mkdtemp(prefix="fused_lm_aot_")
    os.environ["TRITON_CACHE_DIR"] = cache          # really compile; leave nothing behind
    try:
        return _main(args)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _main(args) -> int:
    global _PTX_ONLY, _PTX_DIR, _FIRST_CONFIG
    t_start = time.perf_counter()
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401  (3.0+)
        from triton.compiler import ASTSource, make_backend  # noqa: F401
    except ImportError as exc:
        print(f"skipped: Triton AOT compile API not available ({exc})")
        return 0
    version = getattr(triton, "__version__", "?")
    archs = args.arch or [90, 80]
    _PTX_ONLY = args.ptx_only
    if args.ptx_dir:
        _PTX_DIR = os.path.abspath(args.ptx_dir)
        os.makedirs(_PTX_DIR, exist_ok=True)
    _FIRST_CONFIG = args.first_config

    for spec in SPECS:
        if args.only and not any(o in (spec.family, spec.kernel) or o in spec.module for o in args.only):
            continue
        mod = importlib.import_module(spec.module)
        short = spec.module.removeprefix("fused_lm.ops.")
        variants = spec.variants
        if args.attention_sweep:
            if spec.family != "attention":
                continue
            variants = _attention_sweep(_ATTN_KIND[spec.kernel])
        for i, variant in enumerate(variants(mod, args.quick)):
            for arch in archs:
                if args.quick and not args.arch and arch != 90 and i > 0:
                    continue
                _TASKS.append(Task(f"{short}.{spec.kernel}", spec, variant, arch))
    if args.list:
        for t in _TASKS:
            print(f"sm_{t.arch}  {t.name:<44} {t.variant.label}")
        print(f"{len(_TASKS)} variants")
        return 0

    # Workers are forked before anything is compiled in this process (no MLIR threads to fork).
    pool = None
    if args.jobs > 1 and len(_TASKS) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        try:
            pool = ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork"))
        except ValueError:
            pool = None
    probe = pool.submit(_probe).result() if pool else _probe()
    if probe["error"] and not _PTX_ONLY and "ptxas" in probe["error"].lower():
        system = shutil.which("ptxas") or "/usr/local/cuda/bin/ptxas"
        note = ""
        if os.path.exists(system):
            os.environ["TRITON_PTXAS_PATH"] = system
            os.environ["TRITON_PTXAS_BLACKWELL_PATH"] = system
            note = f"; retrying with {system}"
            if pool:
                pool.shutdown()
                pool = ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork"))
            probe = pool.submit(_probe).result() if pool else _probe()
        if probe["error"]:
            note += "; compiling to PTX only (no cubin, no register counts)"
            _PTX_ONLY = True
            if pool:
                pool.shutdown()
                pool = ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork"))
            probe = pool.submit(_probe).result() if pool else _probe()
        print(f"note: ptxas failed on a trivial kernel{note}")
    if probe["error"]:
        print(f"skipped: Triton {version} cannot compile a trivial kernel ahead of time for sm_90 "
              f"here, so kernel results would mean nothing: {probe['error'].splitlines()[-1]}")
        return 0
    print(f"Triton {version}: {len(_TASKS)} kernel variants for "
          f"{', '.join(f'sm_{a}' for a in archs)}{' (PTX only)' if _PTX_ONLY else ''}, "
          f"{args.jobs if pool else 1} jobs")
    if pool:
        results = pool.map(_run_index, range(len(_TASKS)))
    else:
        results = map(_run_index, range(len(_TASKS)))
    failed = spilled = 0
    for task, r in zip(_TASKS, results):
        print(_fmt(task, r, args.verbose), flush=True)
        failed += not r["ok"]
        spilled += bool(r.get("spill"))
    if pool:
        pool.shutdown()
    print(f"{len(_TASKS) - failed}/{len(_TASKS)} variants compiled, {failed} failed, "
          f"{spilled} spill registers (not a failure); {time.perf_counter() - t_start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
