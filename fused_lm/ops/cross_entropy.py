"""Fused cross-entropy over the vocabulary: loss and d(loss)/d(logits) in one forward kernel (issue 6).

Math (per token i, logits x_i (V,), target t, class weights w, smoothing eps; reference/cross_entropy.py):

    z      = softcap * tanh(x / softcap)                 (optional; accurate tanh: ops/_tl_math.py)
    lse    = log sum_c exp(z_c)                          (online softmax: running max m, sum d)
    loss_i = (1-eps) w_t (lse - z_t) + eps/V (W lse - sum_c w_c z_c) + z_loss lse^2,   W = sum_c w_c

and its gradient, with p = softmax(z):

    dloss_i/dz_j = (1-eps) w_t (p_j - [j=t]) + eps/V (W p_j - w_j) + 2 z_loss lse p_j
                 = (a + b W + c) p_j - a [j=t] - b w_j       a = (1-eps) w_t, b = eps/V, c = 2 z_loss lse
    dloss_i/dx_j = dloss_i/dz_j * (1 - tanh^2(x_j / softcap))           (softcap chain rule)

For ``reduction="mean"`` a and b are divided by D = sum of w[t] over non-ignored tokens and c by
the count of non-ignored tokens (both device scalars: no host sync), so the stored gradient is
already d(mean)/d(logits) and backward only multiplies by grad_output. The scale kernel reads
grad_output on the device and skips the pass when it is exactly 1 (the usual ``loss.backward()``).

Kernel: a persistent grid, each program taking token rows in turn; two sweeps over a row in
BLOCK chunks (float32 math):
  1. online max / sum-exp (and sum w_c z_c, W for smoothing): lse;
  2. (when a gradient is wanted) re-read the row and write the gradient.
Traffic: 2 reads + 1 write of N*V elements; the floor is 1 read + 1 write = 4*N*V bytes in bf16.
The grid is capped (_programs) so the rows in flight fit in half the L2 and the second read
hits L2 (a 128k-vocab bf16 row is 256 KiB: ~100 rows per 25 MiB). Unmeasured so far: whether
that beats one program per row is the first thing to time on a GPU (FUSED_LM_CE_PROGRAMS).
Launch limits (issue 11): both grids are 1-D, on axis 0 (2**31 - 1 programs; axes 1 and 2 stop at
65535): _ce_kernel at most N programs, _scale_kernel numel / 2048. Row offsets are int64 (the
row index is widened before it multiplies the stride: N*V may exceed 2**31); column offsets stay
int32 (V < 2**31). tests/nn/test_cross_entropy_launch.py checks both.

Backends: ``triton`` (CUDA tensors; CPU tensors under the interpreter) runs this kernel through
the ``fused_lm::cross_entropy`` custom op. ``torch`` (CPU tensors without the interpreter,
float64, or forced) routes to torch's own F.cross_entropy (_cross_entropy_torch) for every
option torch has: on a CPU that is the fastest implementation there is, and a drop-in must not
be slower than what it replaces (issue 12; bench/bench_cross_entropy.py). With z-loss or
softcap (torch has neither) it runs the custom op with _ce_rows_torch, the kernel's math in
PyTorch ops around torch's log_softmax (gradient in the forward, as the kernel): measured ~1.5x
faster than autograd through tanh + F.cross_entropy + logsumexp on the CPU. _ce_rows_torch is
also the chunked linear CE's CE step on CPU.

Out-of-range targets (not ignore_index) raise on CPU tensors, and on CUDA tensors when
``FUSED_LM_CHECK=1`` (one host sync). Unchecked, the kernel masks the loads and writes NaN for
such rows instead of reading out of bounds.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from fused_lm import _backend
from fused_lm.ops._spec import FamilySpec

SPEC = FamilySpec(
    name="cross_entropy", backends=("triton", "torch"), gpu_default="triton",
    gpu_default_why="the only kernel backend (no C++ kernel); not yet measured on a GPU",
    reference="fused_lm.reference.cross_entropy:cross_entropy")

try:
    import triton
    import triton.language as tl

    from fused_lm.ops._tl_math import tanh as _tl_tanh
except ImportError:  # pragma: no cover - triton is a Linux dependency
    triton = None

REDUCTIONS = ("none", "sum", "mean")

if triton is not None:

    @triton.jit
    def _softcap(x, cap):
        # (cap * tanh(x / cap), tanh(x / cap)). _tl_math.tanh keeps ~1.5e-7 relative accuracy at
        # every |u|; 2*sigmoid(2u) - 1 lost it at small |u| (1e-4 relative at |u| = 1e-3, 5.6e-7
        # on the fp32 loss at softcap=30: issue 12, item 10). The second value feeds the chain
        # rule 1 - tanh^2, so forward and backward use the same accurate tanh.
        th = _tl_tanh(x / cap)
        return cap * th, th

    @triton.jit
    def _ce_kernel(x_ptr, stride_x, target_ptr, weight_ptr, loss_ptr, grad_ptr, stride_g,
                   den_ptr, cnt_ptr, row_scale_ptr, N, n_programs, V, ignore_index, eps, z_loss,
                   softcap, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                   HAS_Z: tl.constexpr, HAS_SOFTCAP: tl.constexpr, MEAN: tl.constexpr,
                   HAS_ROW_SCALE: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
        # Persistent grid: program p handles rows p, p + n_programs, ... (see _programs()).
        pid = tl.program_id(0)
        for i in range(0, tl.cdiv(N - pid, n_programs)):
            row = pid.to(tl.int64) + i * n_programs
            _ce_row(row, x_ptr, stride_x, target_ptr, weight_ptr, loss_ptr, grad_ptr, stride_g,
                    den_ptr, cnt_ptr, row_scale_ptr, V, ignore_index, eps, z_loss, softcap,
                    HAS_WEIGHT, HAS_SMOOTHING, HAS_Z, HAS_SOFTCAP, MEAN, HAS_ROW_SCALE,
                    COMPUTE_GRAD, BLOCK)

    @triton.jit
    def _ce_row(row, x_ptr, stride_x, target_ptr, weight_ptr, loss_ptr, grad_ptr, stride_g,
                den_ptr, cnt_ptr, row_scale_ptr, V, ignore_index, eps, z_loss, softcap,
                HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_Z: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, MEAN: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
                COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
        x_row = x_ptr + row * stride_x                  # row is int64: N*V may pass 2**31
        t = tl.load(target_ptr + row).to(tl.int64)
        valid = t != ignore_index
        bad = valid & ((t < 0) | (t >= V))
        ok = valid & (t >= 0) & (t < V)

        # Sweep 1: online softmax. m starts at a finite floor so rows of -inf logits give no NaN.
        m = -3.0e38
        d = 0.0
        s_z = 0.0                                   # sum_c w_c z_c (or sum_c z_c)
        s_w = 0.0                                   # W = sum_c w_c
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < V
            z = tl.load(x_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
            if HAS_SOFTCAP:
                z, _ = _softcap(z, softcap)
                z = tl.where(mask, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, 0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
            m = m_new
            if HAS_SMOOTHING:
                if HAS_WEIGHT:
                    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                    s_z += tl.sum(w * tl.where(mask, z, 0.0), 0)
                    s_w += tl.sum(w, 0)
                else:
                    s_z += tl.sum(tl.where(mask, z, 0.0), 0)
        lse = m + tl.log(d)
        if not HAS_WEIGHT:
            s_w = V * 1.0

        z_t = tl.load(x_row + t, mask=ok, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z_t, _ = _softcap(z_t, softcap)
        if HAS_WEIGHT:
            w_t = tl.load(weight_ptr + t, mask=ok, other=0.0).to(tl.float32)
        else:
            w_t = 1.0
        inv_den = 1.0
        inv_cnt = 1.0
        if MEAN:
            inv_den = 1.0 / tl.load(den_ptr)
            if HAS_Z:
                inv_cnt = 1.0 / tl.load(cnt_ptr)

        ce = (1.0 - eps) * w_t * (lse - z_t)
        if HAS_SMOOTHING:
            ce += eps / V * (s_w * lse - s_z)
        loss = ce * inv_den
        if HAS_Z:
            loss += z_loss * lse * lse * inv_cnt
        loss = tl.where(valid, loss, 0.0)
        loss = tl.where(bad, float("nan"), loss)
        tl.store(loss_ptr + row, loss)

        if COMPUTE_GRAD:
            # Sweep 2: g_j = (a + b W + c) p_j - a [j=t] - b w_j, times dz/dx with softcap.
            a = (1.0 - eps) * w_t * inv_den
            b = 0.0
            c = 0.0
            if HAS_SMOOTHING:
                b = eps / V * inv_den
            if HAS_Z:
                c = 2.0 * z_loss * lse * inv_cnt
            if HAS_ROW_SCALE:
                r = tl.load(row_scale_ptr + row)
                a = a * r
                b = b * r
                c = c * r
            a = tl.where(valid, a, 0.0)
            a = tl.where(bad, float("nan"), a)
            b = tl.where(valid, b, 0.0)
            c = tl.where(valid, c, 0.0)
            coef_p = a + b * s_w + c
            g_row = grad_ptr + row * stride_g
            for start in range(0, V, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                mask = offs < V
                z = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    z, th = _softcap(z, softcap)
                p = tl.exp(z - lse)
                g = coef_p * p - tl.where(offs == t, a, 0.0)
                if HAS_SMOOTHING:
                    if HAS_WEIGHT:
                        g -= b * tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                    else:
                        g -= b
                if HAS_SOFTCAP:
                    g = g * (1.0 - th * th)
                tl.store(g_row + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _scale_kernel(g_ptr, s_ptr, numel, row_len, PER_ROW: tl.constexpr, BLOCK: tl.constexpr):
        # g *= s, with s one scalar (skipped when exactly 1: no traffic) or one value per row.
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        if PER_ROW:
            s = tl.load(s_ptr + offs // row_len, mask=mask, other=1.0)
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(g_ptr + offs, (g * s).to(g_ptr.dtype.element_ty), mask=mask)
        else:
            s = tl.load(s_ptr)
            if s != 1.0:
                g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(g_ptr + offs, (g * s).to(g_ptr.dtype.element_ty), mask=mask)


def _config(V: int) -> tuple[int, int]:
    """(BLOCK, num_warps). Not yet measured on a GPU: 4096-element blocks (16 per thread at 8
    warps) keep enough loads in flight per program; the interpreter uses 512-element blocks so
    the small test vocabularies (1000-3000) still take several blocks per row."""
    if _backend.interpreter_on():
        return min(512, triton.next_power_of_2(V)), 4
    block = min(4096, triton.next_power_of_2(V))
    return block, (8 if block >= 2048 else 4)


_SCALE_BLOCK = 2048


@functools.lru_cache(maxsize=None)
def _device_caps(index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, int(getattr(props, "L2_cache_size", 50 << 20))


def _programs(N: int, V: int, itemsize: int, device: torch.device) -> int:
    """Programs of the persistent grid. Each program re-reads its row in the gradient sweep; the
    rows in flight (one per program) should fit in half the L2 so that re-read hits L2 instead
    of DRAM (2 DRAM passes instead of 3). At least 2 programs per SM keep loads in flight.
    Not yet measured on a GPU: ``FUSED_LM_CE_PROGRAMS`` overrides it (a large value gives one
    program per row). The interpreter uses 8, so the tests run the multi-row loop."""
    forced = int(os.environ.get("FUSED_LM_CE_PROGRAMS", "0") or 0)
    if forced > 0:
        return max(1, min(N, forced))
    if device.type != "cuda":
        return max(1, min(N, 8))
    sms, l2 = _device_caps(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(N, max(2 * sms, (l2 // 2) // max(1, V * itemsize))))


# ----------------------------------------------------------------------------- host functions

def checked_mode() -> bool:
    """``FUSED_LM_CHECK=1``: validate targets on CUDA tensors too (costs one host sync)."""
    return os.environ.get("FUSED_LM_CHECK", "0").strip() not in ("", "0")


def check_targets(target: torch.Tensor, V: int, ignore_index: int) -> None:
    """Raises IndexError for a target outside [0, V) that is not ignore_index. Always on CPU
    tensors (no device sync there); on other devices only in checked mode."""
    if target.device.type != "cpu" and not checked_mode():
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= V))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise IndexError(f"cross_entropy: target[{i}] = {int(target[i])} is out of range: expected a "
                         f"class index in [0, {V}) or ignore_index={ignore_index}")


def denominators(target: torch.Tensor, weight: Optional[torch.Tensor], ignore_index: int,
                 V: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(D, count) as float32 device scalars: D = sum of w[t] over non-ignored tokens (the count
    when there are no weights), count = number of non-ignored tokens. No host sync."""
    valid = target != ignore_index
    cnt = valid.sum(dtype=torch.float32)
    if weight is None:
        return cnt, cnt
    t_safe = torch.where(valid, target, 0).clamp(0, V - 1).long()
    den = (weight.float()[t_safe] * valid).sum()
    return den, cnt


def ce_rows_(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
             ignore_index: int, label_smoothing: float, z_loss: float, softcap: float,
             mean: bool, den: torch.Tensor, cnt: torch.Tensor, rows: torch.Tensor,
             grad: Optional[torch.Tensor], row_scale: Optional[torch.Tensor], which: str) -> None:
    """Writes the per-token losses (float32, scaled for the mean when ``mean``) into ``rows`` and,
    when ``grad`` is given, d(loss)/d(logits) into it (``grad`` may be ``logits`` itself: each row
    is read before it is overwritten). logits (N, V) with unit column stride; target (N,)."""
    N, V = logits.shape
    if N == 0:
        return
    if which == "triton":
        block, warps = _config(V)
        g = logits if grad is None else grad
        programs = _programs(N, V, logits.element_size(), logits.device)
        _ce_kernel[(programs,)](
            logits, logits.stride(0), target, logits if weight is None else weight, rows, g,
            g.stride(0), den, cnt, rows if row_scale is None else row_scale, N, programs, V,
            ignore_index,
            float(label_smoothing), float(z_loss), float(softcap or 1.0),
            HAS_WEIGHT=weight is not None, HAS_SMOOTHING=label_smoothing > 0.0,
            HAS_Z=z_loss != 0.0, HAS_SOFTCAP=softcap > 0.0, MEAN=mean,
            HAS_ROW_SCALE=row_scale is not None, COMPUTE_GRAD=grad is not None,
            BLOCK=block, num_warps=warps)
        return
    _ce_rows_torch(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, mean,
                   den, cnt, rows, grad, row_scale)


def _ce_rows_torch(logits, target, weight, ignore_index, eps, z_loss, softcap, mean, den, cnt,
                   rows, grad, row_scale) -> None:
    """The same math as _ce_kernel in PyTorch (float32; float64 for float64 logits): the CE step
    of the chunked linear CE on CPU tensors without the interpreter, and of dtypes the kernel
    does not take. Built on torch's fused log-softmax so a chunk costs about what torch's own
    cross-entropy costs on it (bench/bench_cross_entropy.py):

        logp = log_softmax(z)                  (N, V)   one native pass
        loss = -(1-eps) w_t logp_t - eps/V sum_c w_c logp_c + z_loss lse^2
               (sum_c w_c logp_c = s_z - W lse: one matrix-vector product)
        g    = (a + b W + c) exp(logp) - a [j=t] - b w_j      (exp written straight into grad)

    lse (z-loss only) is read off the row's largest logit, lse = z_max - logp_max, where
    logp_max lies in [-log V, 0]: no cancellation, one extra read-only pass."""
    N, V = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits if logits.dtype == acc else logits.to(acc)               # (N, V)
    th = None
    if softcap > 0.0:
        th = torch.tanh(z / softcap)
        z = th * softcap
    z_max = torch.max(z, dim=1) if z_loss != 0.0 else None
    logp = torch.log_softmax(z, dim=1)                                   # (N, V)
    t = target.long()
    valid = t != ignore_index
    bad = valid & ((t < 0) | (t >= V))
    t_safe = torch.where(valid & ~bad, t, 0)[:, None]                    # (N, 1)
    logp_t = logp.gather(1, t_safe)[:, 0]
    w = weight.to(acc) if weight is not None else None
    w_t = w[t_safe[:, 0]] if w is not None else 1.0
    inv_den = 1.0 / den.to(acc) if mean else 1.0
    inv_cnt = 1.0 / cnt.to(acc) if mean else 1.0
    ce = -(1.0 - eps) * w_t * logp_t
    if eps > 0.0:
        ce = ce - eps / V * (logp @ w if w is not None else logp.sum(1))
    loss = ce * inv_den
    lse = None
    if z_max is not None:
        lse = z_max.values - logp.gather(1, z_max.indices[:, None])[:, 0]
        loss = loss + z_loss * lse * lse * inv_cnt
    rows.copy_(torch.where(valid, loss, 0.0).masked_fill(bad, float("nan")))
    if grad is None:
        return
    a = (1.0 - eps) * w_t * inv_den * torch.ones_like(logp_t)
    b = eps / V * inv_den
    coef = a + b * (w.sum() if w is not None else V)
    if lse is not None:
        coef = coef + 2.0 * z_loss * lse * inv_cnt
    if row_scale is not None:
        r = row_scale.to(acc)
        a, coef, b = a * r, coef * r, b * r
    a = torch.where(valid, a, 0.0).masked_fill(bad, float("nan"))
    coef = torch.where(valid, coef, 0.0).masked_fill(bad, float("nan"))
    g = grad if grad.dtype == acc else logp                              # (N, V)
    torch.exp(logp, out=g)
    g.mul_(coef[:, None])
    g.scatter_add_(1, t_safe, -a[:, None])
    if eps > 0.0:
        bv = torch.where(valid, b * torch.ones_like(logp_t), 0.0)[:, None]
        g.sub_(bv * w[None, :] if w is not None else bv)
    if th is not None:
        g.mul_(1.0 - th * th)
    if g is not grad:
        grad.copy_(g)


def scale_(g: torch.Tensor, s: torch.Tensor, per_row: bool, which: str) -> None:
    """g *= s in place: s a float32 scalar tensor, or (N,) per row of g (N, ...)."""
    if g.numel() == 0:
        return
    if which != "triton":
        # On CPU tensors reading the scalar is no device synchronisation: skip the pass when
        # grad_output is exactly 1 (the usual loss.backward()), as the kernel does.
        if not per_row and g.device.type == "cpu" and bool(s == 1.0):
            return
        g.mul_(s.reshape(-1, *([1] * (g.dim() - 1))) if per_row else s)
        return
    numel = g.numel()
    row_len = numel // g.shape[0] if per_row else 1
    _scale_kernel[(triton.cdiv(numel, _SCALE_BLOCK),)](g, s, numel, row_len, PER_ROW=per_row,
                                                       BLOCK=_SCALE_BLOCK, num_warps=4)


def _reduce(rows: torch.Tensor, reduction: str, den: torch.Tensor) -> torch.Tensor:
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    # rows are already divided by D; D/D turns the all-ignored (D = 0) batch into nan, as torch.
    return rows.sum() * (den / den)


# ----------------------------------------------------------------------------- torch.library ops

@torch.library.custom_op("fused_lm::cross_entropy", mutates_args=())
def _cross_entropy_op(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                      ignore_index: int, reduction: str, label_smoothing: float, z_loss: float,
                      softcap: float, compute_grad: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss float32, d(loss)/d(logits) (N, V) or an empty tensor when not ``compute_grad``)."""
    N, V = logits.shape
    which = _backend.select("cross_entropy", logits.device, logits.dtype, backend or None)
    check_targets(target, V, ignore_index)
    den, cnt = denominators(target, weight, ignore_index, V)
    rows = torch.empty(N, dtype=torch.float32, device=logits.device)
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    ce_rows_(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap,
             reduction == "mean", den, cnt, rows, grad if compute_grad else None, None, which)
    return _reduce(rows, reduction, den), grad


@_cross_entropy_op.register_fake
def _(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
      compute_grad, backend):
    N = logits.shape[0]
    loss = logits.new_empty((N,) if reduction == "none" else (), dtype=torch.float32)
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    return loss, grad


@torch.library.custom_op("fused_lm::scale_grad_", mutates_args=("grad",))
def _scale_grad_op(grad: torch.Tensor, grad_output: torch.Tensor, per_row: bool, backend: str) -> None:
    """grad *= grad_output (a scalar, or one value per leading index of grad when per_row)."""
    which = _backend.select("cross_entropy", grad.device, grad.dtype, backend or None)
    scale_(grad, grad_output.detach().reshape(-1).to(torch.float32).contiguous(), per_row, which)


@_scale_grad_op.register_fake
def _(grad, grad_output, per_row, backend):
    return None


def scale_grad(grad: torch.Tensor, grad_output: torch.Tensor, per_row: bool, backend: str) -> torch.Tensor:
    """Backward helper: scales a gradient computed in the forward by grad_output. In place in
    eager mode (the stored buffer is used once); out of place while torch.compile traces, where
    Inductor fuses the multiply."""
    if torch.compiler.is_compiling():
        s = grad_output.to(torch.float32)
        s = s.reshape(-1, *([1] * (grad.dim() - 1))) if per_row else s
        return (grad * s).to(grad.dtype)
    torch.ops.fused_lm.scale_grad_(grad, grad_output, per_row, backend)
    return grad


def _ce_setup_context(ctx, inputs, output):
    ctx.per_row = inputs[4] == "none"
    ctx.backend = inputs[9]
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _ce_backward(ctx, grad_loss, _grad_grad):
    (grad,) = ctx.saved_tensors
    return (scale_grad(grad, grad_loss, ctx.per_row, ctx.backend),) + (None,) * 9


_cross_entropy_op.register_autograd(_ce_backward, setup_context=_ce_setup_context)


# ----------------------------------------------------------------------------- public entry

def validate_options(V: int, weight, reduction, label_smoothing, z_loss, softcap, device) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: expected one of {', '.join(map(repr, REDUCTIONS))}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing}: expected a value in [0, 1]")
    if not float(z_loss) >= 0.0:
        raise ValueError(f"z_loss={z_loss}: expected a non-negative number")
    if softcap is not None and not float(softcap) > 0.0:
        raise ValueError(f"softcap={softcap}: expected a positive number or None")
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.shape[0] != V:
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"weight has shape {shape}: expected a 1-D tensor of {V} class weights")
        if not weight.is_floating_point():
            raise TypeError(f"weight has dtype {weight.dtype}: expected a floating dtype")
        if weight.device != device:
            raise ValueError(f"weight is on {weight.device} but the logits are on {device}")


def _check_target(target: torch.Tensor, batch_shape: torch.Size, device) -> None:
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target is a {type(target).__name__}, expected a tensor of class indices")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target has dtype {target.dtype}: expected integer class indices "
                        f"(or probability targets shaped like the input)")
    if target.shape != batch_shape:
        raise ValueError(f"target has shape {tuple(target.shape)}: expected {tuple(batch_shape)} "
                         f"(the input's shape without its last, class, dimension)")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but the logits are on {device}")


def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                  ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                  *, z_loss: float = 0.0, softcap: Optional[float] = None,
                  backend: Optional[str] = None) -> torch.Tensor:
    """Cross-entropy of logits ``input`` (V,), (N, V) or (B, T, V) (class dimension last)
    against class indices ``target`` (input.shape[:-1]). Returns a float32 loss: a scalar for
    ``mean``/``sum``, shaped like ``target`` for ``none``. See the module docstring for the math.

    Backends: ``triton`` runs the fused kernel through the ``fused_lm::cross_entropy`` custom op;
    ``torch`` (the default on CPU tensors without the interpreter, and for float64) routes to
    torch's own ``F.cross_entropy`` (see _cross_entropy_torch), and with z-loss or softcap
    runs the custom op on _ce_rows_torch."""
    if not isinstance(input, torch.Tensor) or not input.is_floating_point() or input.dim() < 1:
        raise TypeError("input must be a floating tensor of logits with the classes in its last "
                        f"dimension, got {type(input).__name__}"
                        + (f" {input.dtype} {tuple(input.shape)}" if isinstance(input, torch.Tensor) else ""))
    V = input.shape[-1]
    validate_options(V, weight, reduction, label_smoothing, z_loss, softcap, input.device)
    if isinstance(target, torch.Tensor) and target.is_floating_point() and target.shape == input.shape:
        return _probability_targets(input, target, weight, reduction, label_smoothing, z_loss, softcap)
    _check_target(target, input.shape[:-1], input.device)
    if V == 0:
        raise ValueError("input has 0 classes: expected at least one")
    which = _backend.select("cross_entropy", input.device, input.dtype, backend or None)
    # (N, V) input is used as is: a reshape view would make autograd copy the (N, V) gradient
    # instead of handing it to x.grad (measured ~6% of a CPU fwd+bwd at N=2048, V=32000)
    logits = input if input.dim() == 2 else input.reshape(-1, V)
    t = target.reshape(-1)
    if which == "torch" and not z_loss and softcap is None:
        loss = _cross_entropy_torch(logits, t, weight, int(ignore_index), reduction,
                                    float(label_smoothing))
        return loss.reshape(target.shape) if reduction == "none" else loss
    # z-loss / softcap (torch has neither): the custom op, on the torch backend its analytic
    # gradient in PyTorch ops (_ce_rows_torch) -- faster on CPU than autograd through
    # F.cross_entropy + logsumexp + tanh (~1.5x at N=2048, V=32000: README "Losses")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if t.dtype not in (torch.int32, torch.int64):
        t = t.long()
    t = t.contiguous()
    w = None if weight is None else weight.contiguous()
    compute_grad = input.requires_grad and torch.is_grad_enabled()
    loss, _ = torch.ops.fused_lm.cross_entropy(logits, t, w, int(ignore_index), reduction,
                                               float(label_smoothing), float(z_loss),
                                               float(softcap or 0.0), compute_grad, which)
    return loss.reshape(target.shape) if reduction == "none" else loss


def _cross_entropy_torch(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                         ignore_index: int, reduction: str, eps: float) -> torch.Tensor:
    """The ``torch`` backend without z-loss/softcap: torch's own ``F.cross_entropy`` (its fused
    log-softmax + NLL kernels: the fastest CPU implementation there is for the options it has:
    class weights, ignore_index, label smoothing, every reduction), differentiated by autograd.
    logits (N, V), target (N,).

    What it keeps of our contract: the loss is float32 for every input dtype (bf16/fp16 logits
    are upcast first, so it is float32-accurate; float64 is computed in float64); an
    all-ignored ``mean`` is nan (torch's 0/0). Targets out of range raise on CPU
    (check_targets); on other devices they give a NaN loss instead of torch's device assert.

    Unlike the custom op it keeps no gradient buffer, so a second backward through a retained
    graph works, as with torch. Speed on CPU: bench/bench_cross_entropy.py, README "Losses"."""
    N, V = logits.shape
    if not torch.compiler.is_compiling():
        check_targets(target, V, ignore_index)
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()   # (N, V)
    t = target.long()                                   # nll_loss takes int64 class indices
    bad = None
    if logits.device.type != "cpu":
        bad = (t != ignore_index) & ((t < 0) | (t >= V))
        t = t.masked_fill(bad, ignore_index)
    w = None if weight is None else weight.to(x.dtype)
    loss = torch.nn.functional.cross_entropy(x, t, w, ignore_index=ignore_index, reduction=reduction,
                                             label_smoothing=eps)
    if bad is not None:
        nan = torch.where(bad if reduction == "none" else bad.any(), float("nan"), 0.0)
        loss = loss + nan
    return loss.float()


def _probability_targets(input, target, weight, reduction, label_smoothing, z_loss, softcap):
    """Probability (soft) targets fall back to torch.nn.functional.cross_entropy, with softcap
    and z-loss applied around it in PyTorch (the same definitions as the kernel)."""
    V = input.shape[-1]
    x = input.reshape(-1, V)
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    loss = torch.nn.functional.cross_entropy(x, target.reshape(-1, V).to(x.dtype),
                                             weight=None if weight is None else weight.to(x.dtype),
                                             reduction=reduction, label_smoothing=label_smoothing)
    if z_loss:
        zl = z_loss * torch.logsumexp(x, dim=-1) ** 2
        loss = loss + {"none": zl, "sum": zl.sum(), "mean": zl.mean()}[reduction]
    loss = loss.float()
    return loss.reshape(input.shape[:-1]) if reduction == "none" else loss


__all__ = ["cross_entropy", "ce_rows_", "denominators", "check_targets", "scale_grad"]
