"""Linear cross-entropy: ``cross_entropy(x @ W.T + b, target)`` without the full logits (issue 6).

For an LM head the logits (N tokens x V classes, e.g. 8192 x 128256 = 2 GB in bf16) are the
largest tensor of the step. Here the tokens are processed in chunks of C rows, C sized from a
memory budget (``FUSED_LM_LCE_BUDGET_MB``, default 256 MiB of chunk logits) or forced
(``chunk_size=`` / ``FUSED_LM_LCE_CHUNK``). Per chunk c (shapes in comments):

    logits_c = x_c @ W.T + b                      (C, V)  one reusable buffer, x's dtype
    loss_c, g_c = CE kernel(logits_c)              g_c = d(loss)/d(logits_c) written over logits_c
    dx_c  = g_c @ W                                (C, H)  rows of dx are disjoint: no accumulation
    dW   += g_c.T @ x_c                            (V, H)  float32 accumulator unless W is float32/64
    db   += g_c.sum(0)                             (V,)    float32

FLOPs: 2NHV (logits) + 2NHV (dx) + 2NHV (dW) = 6*N*H*V for forward + backward, as eager.
Extra memory: C*V*itemsize for the chunk logits, plus the float32 dW accumulator (4*V*H bytes)
when W is bf16/fp16 — the price of a float32-accurate weight gradient (W.dtype accumulation over
chunks would round dW once per chunk).

The gradients are computed in the forward pass (for ``mean``/``sum`` the scalar grad_output only
scales them in backward, skipped when it is 1). For ``reduction="none"`` each token's gradient
needs its own grad_output before it enters dW, so the forward computes the losses only and the
backward runs the chunk loop again with the per-token scales (one extra logits matmul).

Backends: ``triton`` runs the CE kernel of ops/cross_entropy.py on each chunk; ``torch`` (CPU
tensors without the interpreter, float64, or forced) runs its PyTorch twin built on torch's fused
log-softmax, still chunked (its float32 temporaries are counted in the chunk budget; on CPU at
most _CPU_CHUNK_ROWS rows, measured below). The memory is the point of this op, so the CPU path
stays chunked; it runs at eager's speed or better (bench/bench_cross_entropy.py).

The signature is torch 2.13's F.linear_cross_entropy (``ignore_index=None``, ``options``) plus
ours; K-dimensional heads and probability targets materialise the logits, as torch's chunked path
falls back to its reference for them (linear_cross_entropy's docstring).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from fused_lm import _backend
from fused_lm.ops._spec import FamilySpec

SPEC = FamilySpec(
    name="linear_cross_entropy", backends=("triton", "torch"), gpu_default="triton",
    gpu_default_why="the only kernel backend (no C++ kernel); not yet measured on a GPU",
    reference="fused_lm.reference.linear_cross_entropy:linear_cross_entropy")
from fused_lm.ops import cross_entropy as _ce

_DEFAULT_BUDGET_MB = 256
_ACC_SLICE_BYTES = 32 << 20          # temporary per dW slice when out_dtype matmuls are missing


# CPU (torch backend): rows per chunk. Measured on this project's 2-core Xeon (torch 2.13, fp32,
# H=256, V=32000, forward+backward, median of 5-7 interleaved runs; machine shared, load 8-15,
# noise about +-10%), speed relative to eager matmul + F.cross_entropy:
#   N=2048: chunks of 128 / 256 / 512 / 1024 rows -> 1.15x / 1.21x / 1.25x / 1.10x
#   N=512:  chunks of  64 / 128 / 256 / 512 rows  -> 0.85x / 1.11x / 1.22x / 1.16x
# Eager pays for page-faulting its full (N, V) temporaries; a 256-row chunk keeps the logits
# buffer and the log-softmax temporary at 2 x 256 x V x 4 bytes (64 MiB at V=32000), and its
# matmuls stay compute-bound (2*256 FLOPs per 4-byte element of W read); below ~128 rows the
# matmuls lose efficiency.
_CPU_CHUNK_ROWS = 256


def chunk_rows(N: int, V: int, itemsize: int, which: str, chunk_size: int = 0,
               device_type: str = "cuda") -> int:
    """Tokens per chunk: forced by ``chunk_size`` or FUSED_LM_LCE_CHUNK, else from the budget
    (multiples of 128 rows once large, which keeps the matmuls on full tiles); on CPU tensors
    at most _CPU_CHUNK_ROWS, the chunks of equal size."""
    forced = chunk_size or int(os.environ.get("FUSED_LM_LCE_CHUNK", "0") or 0)
    if forced:
        return max(1, min(N, forced))
    budget = int(float(os.environ.get("FUSED_LM_LCE_BUDGET_MB", _DEFAULT_BUDGET_MB)) * (1 << 20))
    # torch path: the float32 log-softmax temporary, and a float32 copy of 16-bit logits
    per_row = V * itemsize + (0 if which == "triton" else 4 * V * (1 if itemsize == 4 else 2))
    rows = max(1, budget // max(per_row, 1))
    if device_type == "cpu" and which != "triton":
        rows = min(rows, _CPU_CHUNK_ROWS)
        n_chunks = -(-N // rows)
        return max(1, min(N, -(-N // max(n_chunks, 1))))
    if rows >= 256:
        rows = rows // 128 * 128
    return max(1, min(N, rows))


_out_dtype_ok: dict[str, bool] = {}


def _out_dtype_supported(device: torch.device) -> bool:
    """Whether ``torch.addmm(acc32, a16, b16, out_dtype=float32, out=acc32)`` works here (CUDA
    in recent torch), probed once per device type on a tiny problem and checked numerically."""
    key = device.type
    if key not in _out_dtype_ok:
        ok = False
        if device.type == "cuda":
            try:
                a = torch.randn(8, 16, device=device, dtype=torch.bfloat16)
                b = torch.randn(16, 4, device=device, dtype=torch.bfloat16)
                acc = torch.ones(8, 4, device=device)
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
                ok = bool(torch.allclose(acc, 1 + a.float() @ b.float(), rtol=1e-3, atol=1e-3))
            except (RuntimeError, TypeError):
                ok = False
        _out_dtype_ok[key] = ok
    return _out_dtype_ok[key]


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc possibly float32 and a, b bf16/fp16: one out_dtype matmul when
    supported, else in row slices of acc whose low-precision temporary stays small."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    if _out_dtype_supported(acc.device):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
        return
    step = max(1, _ACC_SLICE_BYTES // max(1, b.shape[1] * a.element_size()))
    for s in range(0, a.shape[0], step):
        acc[s:s + step] += torch.mm(a[s:s + step], b)


def _chunk_loop(x, W, b, target, weight, ignore_index, eps, z_loss, softcap, mean, den, cnt, rows,
                need_dx, need_dw, need_db, row_scale, chunk, which):
    """Runs every chunk: writes per-token losses into ``rows`` and returns (dx, dW, db) (None for
    those not needed), in the dtypes of x, W and b."""
    N, H = x.shape
    V = W.shape[0]
    need_grad = need_dx or need_dw or need_db
    acc_dtype = W.dtype if W.dtype in (torch.float32, torch.float64) else torch.float32
    dx = torch.empty_like(x) if need_dx else None
    # dW: the first chunk's product is written, later ones accumulated (no zero-fill pass over V*H)
    dW = (torch.empty if N > 0 and acc_dtype == W.dtype else torch.zeros)(
        V, H, dtype=acc_dtype, device=x.device) if need_dw else None
    db = torch.zeros(V, dtype=acc_dtype, device=x.device) if need_db else None
    logits_buf = torch.empty(min(chunk, N), V, dtype=x.dtype, device=x.device)   # (C, V)
    Wt = W.t()
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        xc = x[s:e]                                                      # (c, H)
        lc = logits_buf[: e - s]                                         # (c, V)
        if b is None:
            torch.mm(xc, Wt, out=lc)
        else:
            torch.addmm(b, xc, Wt, out=lc)
        _ce.ce_rows_(lc, target[s:e], weight, ignore_index, eps, z_loss, softcap, mean, den, cnt,
                     rows[s:e], lc if need_grad else None,
                     None if row_scale is None else row_scale[s:e], which)
        if need_dx:
            torch.mm(lc, W, out=dx[s:e])                                 # (c, V) @ (V, H)
        if need_dw:
            if s == 0 and dW.dtype == lc.dtype:
                torch.mm(lc.t(), xc, out=dW)                             # (V, c) @ (c, H)
            else:
                _accumulate_mm(dW, lc.t(), xc)
        if need_db:
            db += lc.sum(0, dtype=acc_dtype)
    if dW is not None and dW.dtype != W.dtype:
        dW = dW.to(W.dtype)
    if db is not None and db.dtype != b.dtype:
        db = db.to(b.dtype)
    return dx, dW, db


def _prepare(x, W, target, weight, ignore_index, reduction, chunk_size, backend):
    N, V = x.shape[0], W.shape[0]
    which = _backend.select("linear_cross_entropy", x.device, x.dtype, backend or None)
    _ce.check_targets(target, V, ignore_index)
    den, cnt = _ce.denominators(target, weight, ignore_index, V)
    chunk = chunk_rows(N, V, x.element_size(), which, chunk_size, x.device.type)
    return which, den, cnt, chunk


# ----------------------------------------------------------------------------- torch.library ops

@torch.library.custom_op("fused_lm::linear_cross_entropy", mutates_args=())
def _lce_op(x: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor], target: torch.Tensor,
            weight: Optional[torch.Tensor], ignore_index: int, reduction: str, label_smoothing: float,
            z_loss: float, softcap: float, need_dx: bool, need_dw: bool, need_db: bool,
            chunk_size: int, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dx, dW, db); a gradient not needed (or any, for reduction='none') is empty."""
    N = x.shape[0]
    which, den, cnt, chunk = _prepare(x, W, target, weight, ignore_index, reduction, chunk_size, backend)
    rows = torch.empty(N, dtype=torch.float32, device=x.device)
    grads = reduction != "none"
    dx, dW, db = _chunk_loop(x, W, b, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                             reduction == "mean", den, cnt, rows, need_dx and grads,
                             need_dw and grads, need_db and grads and b is not None, None, chunk, which)
    empty = x.new_empty                                  # a distinct tensor each: outputs may not alias
    return (_ce._reduce(rows, reduction, den), empty(0) if dx is None else dx,
            empty(0) if dW is None else dW, empty(0) if db is None else db)


@_lce_op.register_fake
def _(x, W, b, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, need_dx,
      need_dw, need_db, chunk_size, backend):
    grads = reduction != "none"
    loss = x.new_empty((x.shape[0],) if reduction == "none" else (), dtype=torch.float32)
    dx = torch.empty_like(x) if need_dx and grads else x.new_empty(0)
    dW = torch.empty_like(W) if need_dw and grads else x.new_empty(0)
    db = torch.empty_like(b) if need_db and grads and b is not None else x.new_empty(0)
    return loss, dx, dW, db


@torch.library.custom_op("fused_lm::linear_cross_entropy_backward_none", mutates_args=())
def _lce_backward_none_op(grad_rows: torch.Tensor, x: torch.Tensor, W: torch.Tensor,
                          b: Optional[torch.Tensor], target: torch.Tensor,
                          weight: Optional[torch.Tensor], ignore_index: int,
                          label_smoothing: float, z_loss: float, softcap: float, need_dx: bool,
                          need_dw: bool, need_db: bool, chunk_size: int,
                          backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of reduction='none': the chunk loop again, each token's gradient scaled by its
    grad_output before it is accumulated into dW and db."""
    which, den, cnt, chunk = _prepare(x, W, target, weight, ignore_index, "none", chunk_size, backend)
    rows = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    scale = grad_rows.reshape(-1).to(torch.float32).contiguous()
    dx, dW, db = _chunk_loop(x, W, b, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                             False, den, cnt, rows, need_dx, need_dw, need_db and b is not None,
                             scale, chunk, which)
    empty = x.new_empty
    return (empty(0) if dx is None else dx, empty(0) if dW is None else dW,
            empty(0) if db is None else db)


@_lce_backward_none_op.register_fake
def _(grad_rows, x, W, b, target, weight, ignore_index, label_smoothing, z_loss, softcap, need_dx,
      need_dw, need_db, chunk_size, backend):
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    dW = torch.empty_like(W) if need_dw else x.new_empty(0)
    db = torch.empty_like(b) if need_db and b is not None else x.new_empty(0)
    return dx, dW, db


def _lce_setup_context(ctx, inputs, output):
    (x, W, b, target, weight, ignore_index, reduction, eps, z_loss, softcap, need_dx, need_dw,
     need_db, chunk_size, backend) = inputs
    ctx.reduction = reduction
    ctx.flags = (need_dx, need_dw, need_db and b is not None)
    ctx.options = (ignore_index, eps, z_loss, softcap, chunk_size, backend)
    ctx.has_b = b is not None
    ctx.has_weight = weight is not None
    ctx.mark_non_differentiable(*output[1:])
    if reduction == "none":
        ctx.save_for_backward(x, W, b, target, weight)
    else:
        ctx.save_for_backward(*output[1:])


def _lce_backward(ctx, grad_loss, *_unused):
    need_dx, need_dw, need_db = ctx.flags
    backend = ctx.options[-1]
    if ctx.reduction == "none":
        x, W, b, target, weight = ctx.saved_tensors
        ignore_index, eps, z_loss, softcap, chunk_size, backend = ctx.options
        dx, dW, db = torch.ops.fused_lm.linear_cross_entropy_backward_none(
            grad_loss, x, W, b, target, weight, ignore_index, eps, z_loss, softcap, need_dx,
            need_dw, need_db, chunk_size, backend)
    else:
        dx, dW, db = ctx.saved_tensors
        dx = _ce.scale_grad(dx, grad_loss, False, backend) if need_dx else None
        dW = _ce.scale_grad(dW, grad_loss, False, backend) if need_dw else None
        db = _ce.scale_grad(db, grad_loss, False, backend) if need_db else None
    return ((dx if need_dx else None), (dW if need_dw else None), (db if need_db else None)) + (None,) * 12


_lce_op.register_autograd(_lce_backward, setup_context=_lce_setup_context)


# ----------------------------------------------------------------------------- public entry

def linear_cross_entropy(input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor, *,
                         linear_bias: Optional[torch.Tensor] = None,
                         weight: Optional[torch.Tensor] = None, reduction: str = "mean",
                         ignore_index: Optional[int] = None, label_smoothing: float = 0.0,
                         options=None, z_loss: float = 0.0, softcap: Optional[float] = None,
                         chunk_size: int = 0, backend: Optional[str] = None) -> torch.Tensor:
    """Chunked fused linear + cross-entropy, with torch 2.13's ``F.linear_cross_entropy``
    signature plus ``z_loss``, ``softcap``, ``chunk_size`` and ``backend``.

    input (..., H); linear_weight (V, H), or (V, d1..dK, H) for a K-dimensional loss (then the
    input must be batched, (N, H), and target is (N, d1..dK)); linear_bias (V,) or (V, d1..dK);
    target input.shape[:-1] class indices, or probabilities shaped like the logits
    (``(*input.shape[:-1], V, d1..dK)``). ``ignore_index=None`` (torch's default) means -100 for
    class indices and must stay None for probabilities. ``options`` (a
    ``torch.nn.LinearCrossEntropyOptions``, duck-typed: torch 2.11 has none) only lends its
    ``batch_chunk_size``; this op is always chunked. ``chunk_size`` forces the tokens per chunk
    (0: from the memory budget). Returns float32: a scalar, or shaped like target for ``none``.

    K-dimensional weights and probability targets materialise the logits (torch's chunked path
    falls back to its reference for them too) and run cross_entropy on them."""
    for name, t in (("input", input), ("linear_weight", linear_weight)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if input.dim() < 1 or linear_weight.dim() < 2 or linear_weight.shape[-1] != input.shape[-1]:
        raise ValueError(f"shapes do not match: input {tuple(input.shape)} (..., H) and "
                         f"linear_weight {tuple(linear_weight.shape)} (V, H) or (V, d1..dK, H)")
    V, H = linear_weight.shape[0], linear_weight.shape[-1]
    out_features = tuple(linear_weight.shape[1:-1])
    if V == 0:
        raise ValueError("linear_weight has 0 rows (classes): expected at least one")
    if linear_weight.dtype != input.dtype or linear_weight.device != input.device:
        raise TypeError(f"input ({input.dtype}, {input.device}) and linear_weight "
                        f"({linear_weight.dtype}, {linear_weight.device}) must share dtype and device")
    if linear_bias is not None and (tuple(linear_bias.shape) != (V, *out_features)
                                    or linear_bias.dtype != input.dtype
                                    or linear_bias.device != input.device):
        raise ValueError(f"linear_bias is {linear_bias.dtype} {tuple(linear_bias.shape)} on "
                         f"{linear_bias.device}: expected {(V, *out_features)} {input.dtype} on "
                         f"{input.device}")
    if out_features and input.dim() < 2:
        raise ValueError(f"a K-dimensional loss (linear_weight {tuple(linear_weight.shape)}) needs "
                         f"batched input (N, {H}), got {tuple(input.shape)}")
    _ce.validate_options(V, weight, reduction, label_smoothing, z_loss, softcap, input.device)
    batch = input.shape[:-1]
    probabilities = (isinstance(target, torch.Tensor) and target.is_floating_point()
                     and tuple(target.shape) == (*batch, V, *out_features))
    if probabilities and ignore_index is not None:
        raise ValueError("ignore_index must be None when target holds class probabilities "
                         f"(shaped like the logits, {tuple(target.shape)})")
    ignore_index = -100 if ignore_index is None else int(ignore_index)
    if not chunk_size and options is not None:
        chunk_size = int(getattr(options, "batch_chunk_size", None) or 0)
    if out_features or probabilities:
        return _materialised(input, linear_weight, target, linear_bias, weight, reduction,
                             ignore_index, label_smoothing, z_loss, softcap, out_features,
                             probabilities, backend)
    _ce._check_target(target, batch, input.device)
    x = input.reshape(-1, H).contiguous()
    W = linear_weight.contiguous()
    t = target.reshape(-1)
    t = (t if t.dtype in (torch.int32, torch.int64) else t.long()).contiguous()
    grad_on = torch.is_grad_enabled()
    loss, *_ = torch.ops.fused_lm.linear_cross_entropy(
        x, W, linear_bias, t, None if weight is None else weight.contiguous(), ignore_index,
        reduction, float(label_smoothing), float(z_loss), float(softcap or 0.0),
        grad_on and input.requires_grad, grad_on and linear_weight.requires_grad,
        grad_on and linear_bias is not None and linear_bias.requires_grad, int(chunk_size),
        backend or "")
    return loss.reshape(target.shape) if reduction == "none" else loss


def _materialised(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                  label_smoothing, z_loss, softcap, out_features, probabilities, backend):
    """Full logits, then cross_entropy with the classes moved last: logits (*batch, V, *out)
    in torch's layout -> (*batch, *out, V); probability targets moved the same way."""
    V, H = linear_weight.shape[0], linear_weight.shape[-1]
    P = 1
    for d in out_features:
        P *= d
    W2 = linear_weight.reshape(V * P, H)
    b2 = None if linear_bias is None else linear_bias.reshape(V * P)
    batch = input.shape[:-1]
    logits = torch.nn.functional.linear(input, W2, b2).reshape(*batch, V, *out_features)
    logits = logits.movedim(len(batch), -1)                          # (*batch, *out, V)
    if probabilities:
        target = target.movedim(len(batch), -1)
    else:
        _ce._check_target(target, logits.shape[:-1], input.device)
    return _ce.cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing,
                             z_loss=z_loss, softcap=softcap, backend=backend)


__all__ = ["linear_cross_entropy", "chunk_rows"]
