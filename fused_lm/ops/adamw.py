"""Multi-tensor AdamW: one launch updates every tensor of a bucket (same device and dtypes).

Math (float32 throughout; torch.optim.AdamW, reference in fused_lm/reference/optim.py):

    g  = grad * grad_mult * grad_sign          grad_mult = 1/loss_scale (x clip coefficient)
    p  = p * (1 - lr * wd)
    m  = m + (1 - b1) * (g - m)
    v  = b2 * v + (1 - b2) * g^2
    v_hat = max(v_max, v) if amsgrad else v
    p  = p - (lr / (1 - b1^t)) * m / (sqrt(v_hat) / sqrt(1 - b2^t) + eps)

Tensor table lists (ops/_multi_tensor.py): [param, grad, exp_avg, exp_avg_sq, (max_exp_avg_sq),
(master_param)]. Per-group hyperparameters come from the device table ``hp``
(ops/_optim_common.py), each tensor's step count through ``step_table``; ``grad_mult`` and ``skip``
are float32 scalars in device memory (skip != 0: found_inf, leave everything untouched).

Bytes per element, fp32 params and state: read p, g, m, v (16) + write p, m, v (12) = 28;
+8 with amsgrad; bf16 params with fp32 master and fp32 state: 2+2+4+4+4 read, 2+4+4+4 write = 30
(the Triton kernel does not read p when a master copy exists: 28).

Backends: Triton (below), CUDA C++ (csrc/cuda/optim.cu) and CPU C++ (csrc/cpu/optim.cpp) over
the AdamWOp functor of csrc/include/fused_lm/optim_functors.h, and a torch path (any dtype or
layout; float64 parameters compute in float64).
"""

from __future__ import annotations

import torch

from fused_lm import _ext
from fused_lm.ops import _multi_tensor as mt
from fused_lm.ops import _optim_common as oc

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
                      MASTER: tl.constexpr, SR: tl.constexpr, LISTS: tl.constexpr,
                      HP_COLS: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        # One program per chunk of CHUNK elements of one tensor.
        pid = tl.program_id(0)
        tensor = tl.load(chunks_ptr + 2 * pid)
        begin = tl.load(chunks_ptr + 2 * pid + 1)
        row = table_ptr + tensor * (LISTS + 2)
        p_ptr = tl.load(row).to(tl.pointer_type(P_DTYPE))
        g_ptr = tl.load(row + 1).to(tl.pointer_type(P_DTYPE))
        m_ptr = tl.load(row + 2).to(tl.pointer_type(S_DTYPE))
        v_ptr = tl.load(row + 3).to(tl.pointer_type(S_DTYPE))
        numel = tl.load(row + LISTS)
        group = tl.load(row + LISTS + 1)

        hp = hp_ptr + group * HP_COLS
        lr = tl.load(hp)
        b1 = tl.load(hp + 1)
        b2 = tl.load(hp + 2)
        eps = tl.load(hp + 3)
        wd = tl.load(hp + 4)
        mult = tl.load(mult_ptr) * tl.load(hp + 5)          # 1/loss_scale * (-1 if maximize)
        t = tl.load(tl.load(step_table_ptr + tensor).to(tl.pointer_type(tl.float32)))
        decay = 1.0 - lr * wd
        step_size = lr / (1.0 - oc.pow_f32(b1, t))
        sqrt_bc2 = tl.sqrt(1.0 - oc.pow_f32(b2, t))
        # found_inf: an empty range, so no element is loaded or stored.
        end = tl.where(tl.load(skip_ptr) != 0, begin, tl.minimum(begin + CHUNK, numel))
        if SR:
            key = oc.chunk_key(seed, t, tensor)

        # Runtime trip count: a small tensor (or a skipped step) costs no masked iterations.
        for i in range(0, end - begin, BLOCK):
            offs = begin + i + tl.arange(0, BLOCK)                    # int64 (begin is int64)
            mask = offs < end
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * mult
            m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if MASTER:
                w_ptr = tl.load(row + 4 + AMSGRAD).to(tl.pointer_type(tl.float32))
                p = tl.load(w_ptr + offs, mask=mask, other=0.0)
            else:
                p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            p = p * decay
            m = m + (1.0 - b1) * (g - m)
            v = b2 * v + (1.0 - b2) * g * g
            if AMSGRAD:
                vmax_ptr = tl.load(row + 4).to(tl.pointer_type(S_DTYPE))
                vmax = tl.maximum(tl.load(vmax_ptr + offs, mask=mask, other=0.0).to(tl.float32), v)
                if S_DTYPE == tl.bfloat16:
                    tl.store(vmax_ptr + offs, oc.rne_bf16(vmax).to(S_DTYPE), mask=mask)
                else:
                    tl.store(vmax_ptr + offs, vmax.to(S_DTYPE), mask=mask)
                denom = tl.sqrt(vmax) / sqrt_bc2 + eps
            else:
                denom = tl.sqrt(v) / sqrt_bc2 + eps
            p = p - step_size * (m / denom)
            if S_DTYPE == tl.bfloat16:
                tl.store(m_ptr + offs, oc.rne_bf16(m).to(S_DTYPE), mask=mask)
                tl.store(v_ptr + offs, oc.rne_bf16(v).to(S_DTYPE), mask=mask)
            else:
                tl.store(m_ptr + offs, m.to(S_DTYPE), mask=mask)
                tl.store(v_ptr + offs, v.to(S_DTYPE), mask=mask)
            if MASTER:
                tl.store(w_ptr + offs, p, mask=mask)
            if SR:
                p = oc.stochastic_round_bf16(p, key, offs)
            elif P_DTYPE == tl.bfloat16:
                p = oc.rne_bf16(p)
            tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)


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
    _adamw_kernel[(table.n_chunks,)](
        table.table, table.chunks, step_table, hp, grad_mult, skip, seed,
        P_DTYPE=mt.tl_dtype(param_dtype), S_DTYPE=mt.tl_dtype(state_dtype), AMSGRAD=amsgrad,
        MASTER=master, SR=sr, LISTS=table.lists, HP_COLS=oc.HP_COLS, CHUNK=table.chunk_size,
        BLOCK=_BLOCK)


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
