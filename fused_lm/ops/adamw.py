"""Multi-tensor AdamW: one launch updates every tensor of a bucket (same device and dtypes).

Math (torch.optim.AdamW, reference in fused_lm/reference/adamw.py), float32 per element with
exactly these roundings on every backend (fma: one rounding; /, sqrt: IEEE-rounded; the per-chunk
scalars in float64, rounded once to float32: ops/_optim_common.py):

    g  = grad * grad_mult * grad_sign          grad_mult = 1/loss_scale (x clip coefficient)
    p  = p * (1 - lr * wd)
    m  = fma(1 - b1, g - m, m)                 torch's lerp(m, g, 1 - b1)
    v  = fma((1 - b2) * g, g, b2 * v)          b2 * v + (1 - b2) * g^2
    v_hat = max(v_max, v) if amsgrad else v    NaN-propagating, as torch.maximum
    p  = fma(-lr / (1 - b1^t), m / (sqrt(v_hat) / sqrt(1 - b2^t) + eps), p)

Tensor table lists (ops/_multi_tensor.py), in the order ``SPEC`` below gives: [param, grad,
exp_avg, exp_avg_sq, (max_exp_avg_sq), (master_param)]. Per-group hyperparameters come from the device table ``hp``
(ops/_optim_common.py), each tensor's step count through ``step_table``; ``grad_mult`` and ``skip``
are float32 scalars in device memory (skip != 0: found_inf, leave everything untouched).

Bytes per element, fp32 params and state: read p, g, m, v (16) + write p, m, v (12) = 28;
+8 with amsgrad; bf16 params with fp32 master and fp32 state: 2+2+4+4+4 read, 2+4+4+4 write = 30
(the Triton kernel does not read p when a master copy exists: 28).

Backends: Triton (below), CUDA C++ (csrc/cuda/adamw.cu) and CPU C++ (csrc/cpu/adamw.cpp) over
the AdamWOp functor of csrc/include/fused_lm/adamw.h, and a torch path (any dtype or layout;
float64 parameters compute in float64).
"""

from __future__ import annotations

import torch

from fused_lm import _ext
from fused_lm.ops import _multi_tensor as mt
from fused_lm.ops import _optim_common as oc
from fused_lm.ops._spec import MULTI_TENSOR_GPU_DEFAULT_WHY, FamilySpec, TensorList

SPEC = FamilySpec(
    name="adamw", backends=("cuda", "triton", "cpu", "torch"), gpu_default="cuda",
    gpu_default_why=MULTI_TENSOR_GPU_DEFAULT_WHY,
    reference="fused_lm.reference.adamw:adamw_step",
    lists=(TensorList("params", "param"), TensorList("grads", "param"),
           TensorList("exp_avgs", "state"), TensorList("exp_avg_sqs", "state"),
           TensorList("max_exp_avg_sqs", "state", "amsgrad"),
           TensorList("masters", "float32", "master")),
    flags=("amsgrad", "master"))

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

if triton is not None:

    # seed: never specialised (Triton would make an int equal to 1 a constexpr).
    @triton.jit(do_not_specialize=["seed"])
    def _adamw_kernel(table_ptr, chunks_ptr, step_table_ptr, hp_ptr, mult_ptr, skip_ptr, seed,
                      P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, AMSGRAD: tl.constexpr,
                      MASTER: tl.constexpr, SR: tl.constexpr, ALIGNED: tl.constexpr,
                      LISTS: tl.constexpr, MAX_EXP_AVG_SQS_ROW: tl.constexpr,
                      MASTERS_ROW: tl.constexpr, HP_COLS: tl.constexpr, CHUNK: tl.constexpr,
                      BLOCK: tl.constexpr):
        # One program per chunk of CHUNK elements of one tensor.
        tensor, row, begin, end = mt.chunk_of(table_ptr, chunks_ptr, LISTS, CHUNK)
        p_ptr = mt.list_ptr(row, 0, P_DTYPE, ALIGNED)
        g_ptr = mt.list_ptr(row, 1, P_DTYPE, ALIGNED)
        m_ptr = mt.list_ptr(row, 2, S_DTYPE, ALIGNED)
        v_ptr = mt.list_ptr(row, 3, S_DTYPE, ALIGNED)
        if AMSGRAD:
            vmax_ptr = mt.list_ptr(row, MAX_EXP_AVG_SQS_ROW, S_DTYPE, ALIGNED)
        if MASTER:
            w_ptr = mt.list_ptr(row, MASTERS_ROW, tl.float32, ALIGNED)
        group = tl.load(row + LISTS + 1)

        hp = hp_ptr + group * HP_COLS
        lr = tl.load(hp)
        b1 = tl.load(hp + 1)
        b2 = tl.load(hp + 2)
        eps = tl.load(hp + 3)
        mult = tl.load(mult_ptr) * tl.load(hp + 5)          # 1/loss_scale * (-1 if maximize)
        t = tl.load(tl.load(step_table_ptr + tensor).to(tl.pointer_type(tl.float32)))
        decay = oc.one_minus_product(lr, tl.load(hp + 4))
        neg_step_size = (-lr.to(tl.float64) / (1.0 - oc.pow_count(b1, t))).to(tl.float32)
        sqrt_bc2 = tl.sqrt(1.0 - oc.pow_count(b2, t)).to(tl.float32)   # float64: sqrt.rn.f64
        c1 = 1.0 - b1
        c2 = 1.0 - b2
        # found_inf: an empty range, so no element is loaded or stored.
        end = tl.where(tl.load(skip_ptr) != 0, begin, end)
        if SR:
            key = oc.chunk_key(seed, t, tensor)

        # Runtime trip counts (a small tensor or a skipped step costs no masked iterations): full
        # blocks unmasked, then the masked tail (vector access: ops/_multi_tensor.py).
        n_full = (end - begin) // BLOCK * BLOCK
        for phase in tl.static_range(2):
            for i in range(0 if phase == 0 else n_full, n_full if phase == 0 else end - begin, BLOCK):
                offs = begin + i + tl.arange(0, BLOCK)                # int64 (begin is int64)
                mask = offs < end
                g = mt.load(g_ptr + offs, mask, phase == 1).to(tl.float32) * mult
                m = mt.load(m_ptr + offs, mask, phase == 1).to(tl.float32)
                v = mt.load(v_ptr + offs, mask, phase == 1).to(tl.float32)
                if MASTER:
                    p = mt.load(w_ptr + offs, mask, phase == 1)
                else:
                    p = mt.load(p_ptr + offs, mask, phase == 1).to(tl.float32)
                p = p * decay
                m = tl.fma(c1, g - m, m)
                v = tl.fma(c2 * g, g, b2 * v)
                if AMSGRAD:
                    vmax = mt.load(vmax_ptr + offs, mask, phase == 1).to(tl.float32)
                    # torch.maximum: NaN if either is NaN (tl.maximum drops NaN on a GPU).
                    vmax = tl.where((v != v) | (v > vmax), v, vmax)
                    if S_DTYPE == tl.bfloat16:
                        mt.store(vmax_ptr + offs, oc.rne_bf16(vmax).to(S_DTYPE), mask, phase == 1)
                    else:
                        mt.store(vmax_ptr + offs, vmax.to(S_DTYPE), mask, phase == 1)
                    v_hat = vmax
                else:
                    v_hat = v
                denom = tl.math.div_rn(tl.math.sqrt_rn(v_hat), sqrt_bc2) + eps
                p = tl.fma(neg_step_size, tl.math.div_rn(m, denom), p)
                if S_DTYPE == tl.bfloat16:
                    mt.store(m_ptr + offs, oc.rne_bf16(m).to(S_DTYPE), mask, phase == 1)
                    mt.store(v_ptr + offs, oc.rne_bf16(v).to(S_DTYPE), mask, phase == 1)
                else:
                    mt.store(m_ptr + offs, m.to(S_DTYPE), mask, phase == 1)
                    mt.store(v_ptr + offs, v.to(S_DTYPE), mask, phase == 1)
                if MASTER:
                    mt.store(w_ptr + offs, p, mask, phase == 1)
                if SR:
                    p = oc.stochastic_round_bf16(p, key, offs)
                elif P_DTYPE == tl.bfloat16:
                    p = oc.rne_bf16(p)
                mt.store(p_ptr + offs, p.to(P_DTYPE), mask, phase == 1)


# BLOCK 1024 x 16 iterations = one CHUNK (16384) per program; not yet tuned on a GPU.
_BLOCK = 1024


def adamw_triton(table: mt.TensorTable, step_table: torch.Tensor, hp: torch.Tensor,
                 grad_mult: torch.Tensor, skip: torch.Tensor, *, param_dtype: torch.dtype,
                 state_dtype: torch.dtype, amsgrad: bool, master: bool, sr: bool,
                 seed: int) -> None:
    """Step increment + update over ``table`` (see the module docstring): two launches."""
    oc.increment_steps_triton(step_table, skip)
    if table.n_chunks == 0:
        return
    sr = bool(sr and param_dtype == torch.bfloat16)
    offsets = SPEC.launch_offsets(table.lists, amsgrad=amsgrad, master=master)
    _adamw_kernel[mt.launch_grid(table)](
        table.table, table.chunks, step_table, hp, grad_mult, skip, seed,
        P_DTYPE=mt.tl_dtype(param_dtype), S_DTYPE=mt.tl_dtype(state_dtype), AMSGRAD=amsgrad,
        MASTER=master, SR=sr, ALIGNED=table.aligned, HP_COLS=oc.HP_COLS,
        **offsets,
        CHUNK=table.chunk_size, BLOCK=_BLOCK, **mt.LAUNCH_OPTIONS)


def adamw_compiled(backend: str, table: mt.TensorTable, step_table: torch.Tensor,
                   hp: torch.Tensor, grad_mult: torch.Tensor, skip: torch.Tensor, *,
                   param_dtype: torch.dtype, state_dtype: torch.dtype, amsgrad: bool,
                   master: bool, sr: bool, seed: int) -> None:
    """CPU C++ or CUDA C++: one op call = step increment + update (two launches on CUDA). The op
    takes the tables only (no tensor lists: nothing to convert per tensor), so ``table`` must
    have been built from lists checked by ``mt.check_lists`` whose dtypes are ``param_dtype``
    (params, grads), ``state_dtype`` (moments) and float32 (master weights)."""
    if backend == "cuda":
        _ext.cuda_ext()
    else:
        _ext.cpu_ext()
    torch.ops.fused_lm.multi_tensor_adamw_(
        table.table, table.chunks, table.chunk_size, step_table, hp, grad_mult, skip, table.lists,
        param_dtype, state_dtype, bool(amsgrad), bool(master), bool(sr), int(seed),
        _ext.cuda_stream(table.table.device))


@torch.no_grad()
def adamw_torch(lists: dict, hps: list[tuple], grad_mult: torch.Tensor, skip: torch.Tensor, *,
                amsgrad: bool, sr: bool, seed: int, indices: list[int]) -> None:
    """The PyTorch path, one tensor at a time (any dtype, layout or device; no host sync).
    ``hps[i]`` = (lr, beta1, beta2, eps, weight_decay, maximize) of tensor i; ``indices[i]`` its
    index for the random bits of stochastic rounding."""
    oc.increment_steps_torch(lists["steps"], skip)
    for i, p in enumerate(lists["params"]):
        lr, b1, b2, eps, wd, maximize = hps[i]
        cd = torch.float64 if p.dtype == torch.float64 else torch.float32
        keep = skip.to(p.device) != 0
        master = lists["masters"][i] if lists["masters"] else None
        m_s, v_s = lists["exp_avgs"][i], lists["exp_avg_sqs"][i]
        t = lists["steps"][i].to(cd)
        g = lists["grads"][i].to(cd) * grad_mult.to(p.device, cd)
        if maximize:
            g = -g
        w = (master if master is not None else p).to(cd)
        if isinstance(lr, torch.Tensor):
            lr = lr.to(p.device, cd)
        m = m_s.to(cd)
        v = v_s.to(cd)
        w = w * (1 - lr * wd)
        m = m + (1 - b1) * (g - m)
        v = b2 * v + (1 - b2) * g * g
        if amsgrad:
            vmax_s = lists["max_exp_avg_sqs"][i]
            vmax = torch.maximum(vmax_s.to(cd), v)
            vmax_s.copy_(torch.where(keep, vmax_s, vmax.to(vmax_s.dtype)))
            vh = vmax
        else:
            vh = v
        w = w - (lr / (1 - b1 ** t)) * (m / (vh.sqrt() / (1 - b2 ** t).sqrt() + eps))
        m_s.copy_(torch.where(keep, m_s, m.to(m_s.dtype)))
        v_s.copy_(torch.where(keep, v_s, v.to(v_s.dtype)))
        if master is not None:
            master.copy_(torch.where(keep, master, w.to(master.dtype)))
        key = oc.chunk_key_torch(seed, lists["steps"][i], indices[i]) if sr else None
        p.copy_(torch.where(keep, p, oc.round_param_torch(w.float() if sr else w, p.dtype, sr, key)))
