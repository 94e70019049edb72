"""Multi-tensor Lion: one launch updates every tensor of a bucket (same device and dtypes).

Math (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"; reference in
fused_lm/reference/lion.py), float32 with exactly these roundings on every backend (fma: one
rounding; 1 - lr * wd computed in float64 and rounded once, see ops/_optim_common.py):

    g = grad * grad_mult * grad_sign
    c = fma(1 - b1, g, b1 * m)                 b1 * m + (1 - b1) * g
    p = fma(-lr, sign(c), p * (1 - lr * wd))   (lr * sign(c) is exact)
    m = fma(1 - b2, g, b2 * m)                 b2 * m + (1 - b2) * g

Tensor table lists, in the order ``SPEC`` below gives: [param, grad, exp_avg, (master_param)]; hyperparameters from the device table
``hp`` (eps unused), step counts through ``step_table`` (Lion has no bias correction; the count is
kept for torch's state layout and keys the random bits of stochastic rounding).

Bytes per fp32 element: read p, g, m (12) + write p, m (8) = 20.
"""

from __future__ import annotations

import torch

from fused_lm import _ext
from fused_lm.ops import _multi_tensor as mt
from fused_lm.ops import _optim_common as oc
from fused_lm.ops._spec import FamilySpec, TensorList

SPEC = FamilySpec(
    name="lion", backends=("cuda", "triton", "cpu", "torch"), gpu_default="cuda",
    gpu_default_why="not yet measured on a GPU: as AdamW (fused_lm/ops/adamw.py SPEC)",
    reference="fused_lm.reference.lion:lion_step",
    lists=(TensorList("params", "param"), TensorList("grads", "param"),
           TensorList("exp_avgs", "state"), TensorList("masters", "float32", "master")),
    flags=("master",))

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

if triton is not None:

    # seed: never specialised (Triton would make an int equal to 1 a constexpr).
    @triton.jit(do_not_specialize=["seed"])
    def _lion_kernel(table_ptr, chunks_ptr, step_table_ptr, hp_ptr, mult_ptr, skip_ptr, seed,
                     P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, MASTER: tl.constexpr,
                     SR: tl.constexpr, ALIGNED: tl.constexpr, LISTS: tl.constexpr,
                     MASTERS_ROW: tl.constexpr,
                     HP_COLS: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        tensor, row, begin, end = mt.chunk_of(table_ptr, chunks_ptr, LISTS, CHUNK)
        p_ptr = mt.list_ptr(row, 0, P_DTYPE, ALIGNED)
        g_ptr = mt.list_ptr(row, 1, P_DTYPE, ALIGNED)
        m_ptr = mt.list_ptr(row, 2, S_DTYPE, ALIGNED)
        if MASTER:
            w_ptr = mt.list_ptr(row, MASTERS_ROW, tl.float32, ALIGNED)
        group = tl.load(row + LISTS + 1)

        hp = hp_ptr + group * HP_COLS
        lr = tl.load(hp)
        b1 = tl.load(hp + 1)
        b2 = tl.load(hp + 2)
        mult = tl.load(mult_ptr) * tl.load(hp + 5)
        decay = oc.one_minus_product(lr, tl.load(hp + 4))
        c1 = 1.0 - b1
        c2 = 1.0 - b2
        end = tl.where(tl.load(skip_ptr) != 0, begin, end)
        if SR:
            t = tl.load(tl.load(step_table_ptr + tensor).to(tl.pointer_type(tl.float32)))
            key = oc.chunk_key(seed, t, tensor)

        # Runtime trip counts (a small tensor or a skipped step costs no masked iterations): full
        # blocks unmasked, then the masked tail (vector access: ops/_multi_tensor.py).
        n_full = (end - begin) // BLOCK * BLOCK
        for phase in tl.static_range(2):
            for i in range(0 if phase == 0 else n_full, n_full if phase == 0 else end - begin, BLOCK):
                offs = begin + i + tl.arange(0, BLOCK)
                mask = offs < end
                g = mt.load(g_ptr + offs, mask, phase == 1).to(tl.float32) * mult
                m = mt.load(m_ptr + offs, mask, phase == 1).to(tl.float32)
                if MASTER:
                    p = mt.load(w_ptr + offs, mask, phase == 1)
                else:
                    p = mt.load(p_ptr + offs, mask, phase == 1).to(tl.float32)
                c = tl.fma(c1, g, b1 * m)
                sign = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))    # torch.sign: NaN -> 0
                p = tl.fma(-lr, sign, p * decay)
                m = tl.fma(c2, g, b2 * m)
                if S_DTYPE == tl.bfloat16:
                    m = oc.rne_bf16(m)
                mt.store(m_ptr + offs, m.to(S_DTYPE), mask, phase == 1)
                if MASTER:
                    mt.store(w_ptr + offs, p, mask, phase == 1)
                if SR:
                    p = oc.stochastic_round_bf16(p, key, offs)
                elif P_DTYPE == tl.bfloat16:
                    p = oc.rne_bf16(p)
                mt.store(p_ptr + offs, p.to(P_DTYPE), mask, phase == 1)


_BLOCK = 1024


def lion_triton(table: mt.TensorTable, step_table: torch.Tensor, hp: torch.Tensor,
                grad_mult: torch.Tensor, skip: torch.Tensor, *, param_dtype: torch.dtype,
                state_dtype: torch.dtype, master: bool, sr: bool, seed: int, **_) -> None:
    oc.increment_steps_triton(step_table, skip)
    if table.n_chunks == 0:
        return
    sr = bool(sr and param_dtype == torch.bfloat16)
    offsets = SPEC.launch_offsets(table.lists, master=master)
    _lion_kernel[mt.launch_grid(table)](
        table.table, table.chunks, step_table, hp, grad_mult, skip, seed,
        P_DTYPE=mt.tl_dtype(param_dtype), S_DTYPE=mt.tl_dtype(state_dtype), MASTER=master, SR=sr,
        ALIGNED=table.aligned, HP_COLS=oc.HP_COLS, CHUNK=table.chunk_size,
        **offsets,
        BLOCK=_BLOCK, **mt.LAUNCH_OPTIONS)


def lion_compiled(backend: str, table: mt.TensorTable, step_table: torch.Tensor,
                  hp: torch.Tensor, grad_mult: torch.Tensor, skip: torch.Tensor, *,
                  param_dtype: torch.dtype, state_dtype: torch.dtype, master: bool, sr: bool,
                  seed: int, **_) -> None:
    """CPU C++ or CUDA C++ over the tables only (see adamw_compiled)."""
    if backend == "cuda":
        _ext.cuda_ext()
    else:
        _ext.cpu_ext()
    torch.ops.fused_lm.multi_tensor_lion_(
        table.table, table.chunks, table.chunk_size, step_table, hp, grad_mult, skip, table.lists,
        param_dtype, state_dtype, bool(master), bool(sr), int(seed),
        _ext.cuda_stream(table.table.device))


@torch.no_grad()
def lion_torch(lists: dict, hps: list[tuple], grad_mult: torch.Tensor, skip: torch.Tensor, *,
               sr: bool, seed: int, indices: list[int], **_) -> None:
    """The PyTorch path, one tensor at a time (any dtype, layout or device; no host sync)."""
    oc.increment_steps_torch(lists["steps"], skip)
    for i, p in enumerate(lists["params"]):
        lr, b1, b2, _eps, wd, maximize = hps[i]
        cd = torch.float64 if p.dtype == torch.float64 else torch.float32
        keep = skip.to(p.device) != 0
        master = lists["masters"][i] if lists["masters"] else None
        m_s = lists["exp_avgs"][i]
        g = lists["grads"][i].to(cd) * grad_mult.to(p.device, cd)
        if maximize:
            g = -g
        if isinstance(lr, torch.Tensor):
            lr = lr.to(p.device, cd)
        w = (master if master is not None else p).to(cd)
        m = m_s.to(cd)
        w = w * (1 - lr * wd) - lr * torch.sign(b1 * m + (1 - b1) * g)
        m = b2 * m + (1 - b2) * g
        m_s.copy_(torch.where(keep, m_s, m.to(m_s.dtype)))
        if master is not None:
            master.copy_(torch.where(keep, master, w.to(master.dtype)))
        key = oc.chunk_key_torch(seed, lists["steps"][i], indices[i]) if sr else None
        p.copy_(torch.where(keep, p, oc.round_param_torch(w.float() if sr else w, p.dtype, sr, key)))
