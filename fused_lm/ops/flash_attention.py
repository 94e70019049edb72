"""Flash-style attention, forward and backward, in Triton: GQA, packed variable-length batches,
sliding windows, softcap and a per-key additive bias (key-padding masks).

Layouts (the last dimension must have stride 1; everything else goes through strides, so the
(B, H, N, D) tensors of the SDPA form are read through a transposed view without a copy):

* batched: q (B, Nq, Hq, D), k and v (B, Nk, Hkv, D); out like q; lse (B, Hq, Nq) float32.
* varlen:  q (Tq, Hq, D), k and v (Tk, Hkv, D) with ``cu_seqlens_q/k`` (S + 1,) int32 on the
           device: sequence s owns rows ``cu[s]:cu[s + 1]``; lse (Hq, Tq) float32 (flash-attn's).

Math (per batch row, query head h, its key/value head h // (Hq / Hkv)):

    x   = q k^T                                   (Nq, Nk)
    s   = scale * x                               or softcap * tanh(scale * x / softcap)
    s  += bias[key]                               (key-padding bias, 0 or -inf, optional)
    s   = -inf where the key is not visible       (causal / window / past the sequence end)
    P   = softmax(s),  O = P v,  lse = logsumexp(s)

Visibility, with query i and key j counted inside their sequence (lengths Lq, Lk) and the
bottom-right alignment offset ``off = Lk - Lq`` (flash-attn >= 2.1; causal == window (-1, 0)):

    j >= i + off - left   (when the window has a left bound)
    j <= i + off + right  (when it has a right bound; causal sets right = 0)

A query row that sees no key (possible with Nq > Nk causal, windows or an all-masked bias row)
outputs 0 and lse = -inf.

Forward (Dao, FlashAttention-2, 2023): one program per (batch x head, query block) on a 1-D
grid (see _locate), online softmax in base 2 (s is pre-multiplied by log2(e)), fp32
accumulators, lse saved in float32.

Backward, with dO given and delta = rowsum(dO * O) (preprocess kernel):

    P = exp(s - lse),  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta)
    dX = dS * scale                 or  dS * scale * (1 - tanh^2)   (softcap chain rule)
    dQ = dX K,  dK = dX^T Q

Two kernels, no atomics, so the backward is bitwise reproducible run to run (``deterministic``
costs nothing here): the dK/dV kernel owns a key block and loops over the query blocks of every
query head of its GQA group (the group sum happens in registers); the dQ kernel owns a query
block and loops over key blocks.

Cost: forward 4 * Nq * Nk * D FLOPs per (batch, head) (two matmuls), about half when causal;
backward 2.5x the forward (five matmuls, one of them the recomputation of q k^T).

Blocks: every loop visits masked blocks (boundaries of the sequence, the causal diagonal, the
window edges) with the mask and the fully visible blocks without it.

Head dims: any D in [1, 256]; tiles are BLOCK_D = the next power of two >= 16 wide, with
masked loads and stores on the head dim (EVEN_D skips that mask when D is a power of two).
Addressing: batch, head and sequence starts are int64; rows inside a sequence are int32 unless
a sequence spans more than 2**31 elements (ROW64). fp32 inputs: products at ``input_precision``
(see _mm; the interpreter emulates TF32 by rounding the operands).

Work without a GPU: the same kernels run under the Triton interpreter on CPU tensors (tests).
No libdevice: tanh is fused_lm/ops/_tl_math.py's, from core tl operations.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

import torch

from fused_lm import _backend

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux dependency
    triton = None

MIN_HEAD_DIM, MAX_HEAD_DIM = 1, 256
_LOG2E = 1.4426950408889634
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def checked_mode() -> bool:
    """FUSED_LM_CHECK=1 turns on the checks that read device values (a host synchronisation)."""
    return os.environ.get("FUSED_LM_CHECK", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if triton is not None:

    from fused_lm.ops._tl_math import tanh as _tanh

    # Set once at import: TRITON_INTERPRET must be set before triton is imported anyway.
    _INTERPRETED = tl.constexpr(_backend.interpreter_on())

    @triton.jit
    def _tf32(x):
        # fp32 -> the nearest TF32 value (10 explicit mantissa bits, ties away from zero, as the
        # hardware's cvt.rna.tf32.f32), kept in fp32; Inf and NaN pass unchanged. Interpreter only:
        # it gives fp32 dots the operand rounding that TF32 tensor cores apply on a GPU.
        bits = x.to(tl.int32, bitcast=True)
        rounded = ((bits + 0x1000) & -0x2000).to(tl.float32, bitcast=True)
        return tl.where((bits & 0x7F800000) == 0x7F800000, x, rounded)

    @triton.jit
    def _mm(a, b, acc, PRECISION: tl.constexpr):
        # acc + a @ b (acc None: a @ b) with fp32 accumulation. fp32 operands run at PRECISION:
        # "ieee" (exact fp32 products), "tf32" (operands rounded to 10-bit mantissas, ~1e-3
        # relative) or "tf32x3" (each operand split into two TF32 halves, three products: ~fp32
        # accuracy). fp16/bf16 operands ignore it. The interpreter ignores input_precision and
        # multiplies bfloat16 operands as their raw uint16 bits (Triton <= 3.9): there operands go
        # through fp32 (exact for 8/11-bit mantissas) and the TF32 rounding is applied here.
        if _INTERPRETED:
            if a.dtype == tl.float32:
                if PRECISION == "ieee":
                    acc = tl.dot(a, b, acc)
                else:
                    a_hi = _tf32(a)
                    b_hi = _tf32(b)
                    if PRECISION == "tf32x3":
                        acc = tl.dot(_tf32(a - a_hi), b_hi, acc)
                        acc = tl.dot(a_hi, _tf32(b - b_hi), acc)
                    acc = tl.dot(a_hi, b_hi, acc)
            else:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        elif a.dtype == tl.float32:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        else:
            acc = tl.dot(a, b, acc)
        return acc

    @triton.jit
    def _scores(x, qk_scale, softcap_log2, HAS_SOFTCAP: tl.constexpr):
        # x = q k^T (fp32). Returns s in log2 units and t = tanh(scale * x / softcap) (the
        # softcap derivative needs it; x itself when there is no softcap). tanh is _tl_math's,
        # accurate to 1.5e-7 relative at every |u| (2 sigmoid(2u) - 1 loses relative accuracy
        # as u -> 0, where most scaled scores lie).
        if HAS_SOFTCAP:
            t = _tanh(x * qk_scale)            # qk_scale = scale / softcap
            s = t * softcap_log2               # softcap * log2(e)
        else:
            t = x
            s = x * qk_scale                   # qk_scale = scale * log2(e)
        return s, t

    @triton.jit
    def _visible(qi, kj, off, q_len, k_len, win_left, win_right,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
        # qi, kj broadcast to the block: may query i see key j (bottom-right aligned)?
        mask = (kj < k_len) & (qi < q_len)
        if HAS_LEFT:
            mask = mask & (kj >= qi + off - win_left)
        if HAS_RIGHT:
            mask = mask & (kj <= qi + off + win_right)
        return mask

    @triton.jit
    def _locate(CU_Q, CU_K, n_blocks, n_heads, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr):
        # The grid is 1-D: program p -> (batch b, head h, block i), blocks fastest, so that
        # consecutive programs share one head's K/V (in L2). A 1-D grid takes 2**31 - 1 programs;
        # a (blocks, batch x heads) grid stops at 65535 on axis 1, which 4096 packed sequences x
        # 32 heads (131072) pass. Also returns sequence b's first token (int64) and length (int32)
        # in q and in k.
        pid = tl.program_id(0)
        bh = pid // n_blocks
        b = bh // n_heads
        if IS_VARLEN:
            q_start = tl.load(CU_Q + b).to(tl.int64)
            q_len = (tl.load(CU_Q + b + 1).to(tl.int64) - q_start).to(tl.int32)
            k_start = tl.load(CU_K + b).to(tl.int64)
            k_len = (tl.load(CU_K + b + 1).to(tl.int64) - k_start).to(tl.int32)
        else:
            q_start = b.to(tl.int64) * 0
            k_start = q_start
            q_len = b * 0 + seqlen_q
            k_len = b * 0 + seqlen_k
        return b, bh % n_heads, pid - bh * n_blocks, q_start, q_len, k_start, k_len

    @triton.jit
    def _key_blocks(m0, off, q_len, k_len, win_left, win_right, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
        # Key blocks for query rows [m0, m0 + BLOCK_M): [lo, u_lo) masked, [u_lo, u_hi) fully
        # visible to every row (no mask, no bounds check), [u_hi, hi) masked.
        m_last = m0 + BLOCK_M - 1
        lo = m0 * 0
        full_lo = m0 * 0
        hi = k_len + 0
        full_hi = k_len + 0
        if HAS_LEFT:
            lo = tl.maximum(m0 + off - win_left, 0)
            full_lo = tl.maximum(m_last + off - win_left, 0)
        if HAS_RIGHT:
            hi = tl.maximum(tl.minimum(m_last + off + win_right + 1, k_len), 0)
            full_hi = tl.maximum(tl.minimum(m0 + off + win_right + 1, k_len), 0)
        lo = (lo // BLOCK_N) * BLOCK_N                          # all operands >= 0 here
        u_lo = ((full_lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
        u_hi = (full_hi // BLOCK_N) * BLOCK_N
        u_lo = tl.minimum(tl.maximum(u_lo, lo), hi)
        u_hi = tl.maximum(u_hi, u_lo)
        return lo, u_lo, u_hi, hi

    @triton.jit
    def _query_blocks(n0, off, q_len, win_left, win_right, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
        # Query blocks that see keys [n0, n0 + BLOCK_N): row i sees key j iff
        # j - off - right <= i <= j - off + left. Same split as _key_blocks; the unmasked blocks
        # lie entirely inside [0, q_len).
        n_last = n0 + BLOCK_N - 1
        lo = n0 * 0
        full_lo = n0 * 0
        hi = q_len + 0
        full_hi = q_len + 0
        if HAS_RIGHT:
            lo = tl.maximum(n0 - off - win_right, 0)
            full_lo = tl.maximum(n_last - off - win_right, 0)
        if HAS_LEFT:
            hi = tl.maximum(tl.minimum(n_last - off + win_left + 1, q_len), 0)
            full_hi = tl.maximum(tl.minimum(n0 - off + win_left + 1, q_len), 0)
        lo = (lo // BLOCK_M) * BLOCK_M
        u_lo = ((full_lo + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
        u_hi = (full_hi // BLOCK_M) * BLOCK_M
        u_lo = tl.minimum(tl.maximum(u_lo, lo), hi)
        u_hi = tl.maximum(u_hi, u_lo)
        return lo, u_lo, u_hi, hi

    @triton.jit
    def _load_rows(a_base, b_base, row0, stride_a, stride_b, offs_r, offs_d, n_rows, mask_d,
                   MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr, ROW64: tl.constexpr):
        # Rows row0 + offs_r of two (rows, D) matrices (k and v, or q and dO; D contiguous) from
        # the start of one sequence, as (R, BLOCK_D) tiles. Rows at or past n_rows (MASK_ROWS) and
        # the padded head-dim columns (unless EVEN_D) read as 0. One call for both tiles: the
        # interpreter pays milliseconds per jit-function call.
        # Row offsets are int32 unless a sequence spans more than 2**31 elements (ROW64): an int64
        # tile base plus int32 in-tile offsets would be cheaper to compute, but the compiler then
        # hoists the loop-invariant (R, D) offset tensors out of the loops and keeps them in
        # registers (sm_90 builds: dK/dV at d=128 spilled 1036 bytes instead of 0).
        rows = row0 + offs_r
        if ROW64:
            rows = rows.to(tl.int64)
        a_ptrs = a_base + rows[:, None] * stride_a + offs_d[None, :]
        b_ptrs = b_base + rows[:, None] * stride_b + offs_d[None, :]
        if MASK_ROWS:
            mask = (rows[:, None] < n_rows) & mask_d[None, :]
            a = tl.load(a_ptrs, mask=mask, other=0.0)
            b = tl.load(b_ptrs, mask=mask, other=0.0)
        elif EVEN_D:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=mask_d[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=mask_d[None, :], other=0.0)
        return a, b

    @triton.jit
    def _store_tile(base, row0, stride_row, offs_r, offs_d, n_rows, mask_d, x):
        tile = base + tl.cast(row0, tl.int64) * stride_row
        tl.store(tile + offs_r[:, None] * stride_row + offs_d[None, :], x,
                 mask=((row0 + offs_r)[:, None] < n_rows) & mask_d[None, :])

    @triton.jit
    def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, bias_base, stride_kn, stride_vn,
                   offs_m, offs_n0, offs_d, mask_d, start, end, off, q_len, k_len,
                   win_left, win_right, qk_scale, softcap_log2,
                   BLOCK_N: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
                   HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, ROW64: tl.constexpr):
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + offs_n0
            k, v = _load_rows(k_base, v_base, n0, stride_kn, stride_vn, offs_n0, offs_d, k_len,
                              mask_d, MASKED, EVEN_D, ROW64)                               # (BN, D)
            s, t = _scores(_mm(q, tl.trans(k), None, PRECISION), qk_scale, softcap_log2,
                           HAS_SOFTCAP)                                             # (BM, BN)
            if HAS_BIAS:
                bias = tl.load(bias_base + offs_n, mask=offs_n < k_len, other=0.0)
                s = s + bias[None, :] * 1.4426950408889634
            if MASKED:
                vis = _visible(offs_m[:, None], offs_n[None, :], off, q_len, k_len,
                               win_left, win_right, HAS_LEFT, HAS_RIGHT)
                s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen only masked keys keeps m = -inf: shift by 0 instead (no NaN).
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = _mm(p.to(v.dtype), v, acc, PRECISION)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _fwd_kernel(Q, K, V, O, LSE, BIAS, CU_Q, CU_K,
                    qk_scale, softcap_log2, win_left, win_right,
                    stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
                    stride_vb, stride_vn, stride_vh, stride_ob, stride_on, stride_oh,
                    stride_lb, stride_lh, stride_bb,
                    seqlen_q, seqlen_k, n_heads, group,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr,
                    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, ROW64: tl.constexpr):
        n_m = tl.cdiv(seqlen_q, BLOCK_M)
        b, h, i, q_start, q_len, k_start, k_len = _locate(CU_Q, CU_K, n_m, n_heads, seqlen_q,
                                                          seqlen_k, IS_VARLEN)
        pid_m = n_m - 1 - i            # largest query blocks first: most work when causal
        h_kv = h // group
        m0 = pid_m * BLOCK_M
        if m0 >= q_len:          # varlen: this sequence is shorter than max_seqlen_q
            return
        b64, h64, hkv64 = b.to(tl.int64), h.to(tl.int64), h_kv.to(tl.int64)
        offs_r = tl.arange(0, BLOCK_M)
        offs_m = m0 + offs_r
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + (q_start + m0) * stride_qn
                    + offs_r[:, None] * stride_qn + offs_d[None, :],
                    mask=(offs_m < q_len)[:, None] & mask_d[None, :], other=0.0)   # (BM, D)
        k_base = K + b64 * stride_kb + hkv64 * stride_kh + k_start * stride_kn
        v_base = V + b64 * stride_vb + hkv64 * stride_vh + k_start * stride_vn
        bias_base = BIAS + b64 * stride_bb
        off = k_len - q_len
        lo, u_lo, u_hi, hi = _key_blocks(m0, off, q_len, k_len, win_left, win_right,
                                         BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, bias_base, stride_kn,
                                   stride_vn, offs_m, offs_n0, offs_d, mask_d, lo, u_lo, off,
                                   q_len, k_len, win_left, win_right, qk_scale, softcap_log2,
                                   BLOCK_N, True, EVEN_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
                                   HAS_BIAS, PRECISION, ROW64)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, bias_base, stride_kn,
                                   stride_vn, offs_m, offs_n0, offs_d, mask_d, u_lo, u_hi, off,
                                   q_len, k_len, win_left, win_right, qk_scale, softcap_log2,
                                   BLOCK_N, False, EVEN_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
                                   HAS_BIAS, PRECISION, ROW64)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, bias_base, stride_kn,
                                   stride_vn, offs_m, offs_n0, offs_d, mask_d, u_hi, hi, off,
                                   q_len, k_len, win_left, win_right, qk_scale, softcap_log2,
                                   BLOCK_N, True, EVEN_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
                                   HAS_BIAS, PRECISION, ROW64)
        empty = l_i == 0.0                                # rows that see no key: O = 0, lse = -inf
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
        _store_tile(O + b64 * stride_ob + h64 * stride_oh + q_start * stride_on, m0, stride_on,
                    offs_r, offs_d, q_len, mask_d, out.to(O.dtype.element_ty))
        tl.store(LSE + b64 * stride_lb + h64 * stride_lh + q_start + offs_m, lse,
                 mask=offs_m < q_len)

    @triton.jit
    def _bwd_preprocess_kernel(O, DO, DELTA, CU_Q, stride_ob, stride_on, stride_oh,
                               stride_dob, stride_don, stride_doh, stride_lb, stride_lh,
                               seqlen_q, n_heads, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                               BLOCK_M: tl.constexpr, IS_VARLEN: tl.constexpr,
                               ROW64: tl.constexpr):
        # delta_i = sum_d dO_id * O_id (fp32): the row term of dS = P * (dP - delta).
        b, h, pid_m, q_start, q_len, _, _ = _locate(CU_Q, CU_Q, tl.cdiv(seqlen_q, BLOCK_M),
                                                    n_heads, seqlen_q, seqlen_q, IS_VARLEN)
        m0 = pid_m * BLOCK_M
        if m0 >= q_len:
            return
        b64, h64 = b.to(tl.int64), h.to(tl.int64)
        offs_r = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        o, do = _load_rows(O + b64 * stride_ob + h64 * stride_oh + q_start * stride_on,
                           DO + b64 * stride_dob + h64 * stride_doh + q_start * stride_don, m0,
                           stride_on, stride_don, offs_r, offs_d, q_len, mask_d, True, False, ROW64)
        tl.store(DELTA + b64 * stride_lb + h64 * stride_lh + q_start + m0 + offs_r,
                 tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=m0 + offs_r < q_len)

    @triton.jit
    def _dkdv_inner(dk, dv, k, v, bias_log2, q_base, do_base, lse_base, delta_base,
                    stride_qn, stride_don, offs_n, offs_m0, offs_d, mask_d, start, end, off,
                    q_len, k_len, win_left, win_right, qk_scale, softcap_log2,
                    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
                    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, ROW64: tl.constexpr):
        # Scores are computed transposed, (BN, BM), so that dV += P^T dO and dK += dX^T Q are
        # plain dots with no transposed operand to materialise.
        for m0 in range(start, end, BLOCK_M):
            offs_m = m0 + offs_m0
            q, do = _load_rows(q_base, do_base, m0, stride_qn, stride_don, offs_m0, offs_d, q_len,
                               mask_d, MASKED, EVEN_D, ROW64)                              # (BM, D)
            if MASKED:
                row_mask = offs_m < q_len
                lse = tl.load(lse_base + offs_m, mask=row_mask, other=float("inf"))
                delta = tl.load(delta_base + offs_m, mask=row_mask, other=0.0)
            else:
                lse = tl.load(lse_base + offs_m)
                delta = tl.load(delta_base + offs_m)
            # Rows that saw no key have lse = -inf: use +inf so their P is 0, not NaN.
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            s_t, t_t = _scores(_mm(k, tl.trans(q), None, PRECISION), qk_scale, softcap_log2,
                               HAS_SOFTCAP)
            if HAS_BIAS:
                s_t = s_t + bias_log2[:, None]
            if MASKED:
                vis = _visible(offs_m[None, :], offs_n[:, None], off, q_len, k_len,
                               win_left, win_right, HAS_LEFT, HAS_RIGHT)
                s_t = tl.where(vis, s_t, float("-inf"))
            p_t = tl.exp2(s_t - lse2[None, :])                                      # (BN, BM)
            dv = _mm(p_t.to(do.dtype), do, dv, PRECISION)
            dp_t = _mm(v, tl.trans(do), None, PRECISION)                                 # (BN, BM)
            ds_t = p_t * (dp_t - delta[None, :])
            if HAS_SOFTCAP:
                ds_t = ds_t * (1.0 - t_t * t_t)
            dk = _mm(ds_t.to(q.dtype), q, dk, PRECISION)
        return dk, dv

    @triton.jit
    def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, BIAS, DK, DV, CU_Q, CU_K,
                         qk_scale, softcap_log2, sm_scale, win_left, win_right,
                         stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
                         stride_vb, stride_vn, stride_vh, stride_dob, stride_don, stride_doh,
                         stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
                         stride_lb, stride_lh, stride_bb,
                         seqlen_q, seqlen_k, n_kv_heads, group,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr,
                         HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                         HAS_SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr,
                         PRECISION: tl.constexpr, ROW64: tl.constexpr):
        # One program per (batch x kv head, key block); loops over the `group` query heads that
        # share this kv head, so the GQA sum of dK/dV stays in registers (no atomics). Key
        # blocks in order: with a causal mask the first ones have the most work.
        b, h_kv, pid_n, q_start, q_len, k_start, k_len = _locate(
            CU_Q, CU_K, tl.cdiv(seqlen_k, BLOCK_N), n_kv_heads, seqlen_q, seqlen_k, IS_VARLEN)
        n0 = pid_n * BLOCK_N
        if n0 >= k_len:
            return
        b64, hkv64 = b.to(tl.int64), h_kv.to(tl.int64)
        offs_r = tl.arange(0, BLOCK_N)
        offs_n = n0 + offs_r
        offs_m0 = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        k, v = _load_rows(K + b64 * stride_kb + hkv64 * stride_kh + k_start * stride_kn,
                          V + b64 * stride_vb + hkv64 * stride_vh + k_start * stride_vn, n0,
                          stride_kn, stride_vn, offs_r, offs_d, k_len, mask_d, True, EVEN_D, ROW64)
        bias_log2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        if HAS_BIAS:
            bias_log2 = tl.load(BIAS + b64 * stride_bb + offs_n, mask=offs_n < k_len,
                                other=0.0) * 1.4426950408889634
        off = k_len - q_len
        lo, u_lo, u_hi, hi = _query_blocks(n0, off, q_len, win_left, win_right, BLOCK_M, BLOCK_N,
                                           HAS_LEFT, HAS_RIGHT)
        dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for g in range(0, group):
            h64 = hkv64 * group + g
            q_base = Q + b64 * stride_qb + h64 * stride_qh + q_start * stride_qn
            do_base = DO + b64 * stride_dob + h64 * stride_doh + q_start * stride_don
            lse_base = LSE + b64 * stride_lb + h64 * stride_lh + q_start
            delta_base = DELTA + b64 * stride_lb + h64 * stride_lh + q_start
            dk, dv = _dkdv_inner(dk, dv, k, v, bias_log2, q_base, do_base, lse_base, delta_base,
                                 stride_qn, stride_don, offs_n, offs_m0, offs_d, mask_d, lo, u_lo,
                                 off, q_len, k_len, win_left, win_right, qk_scale, softcap_log2,
                                 BLOCK_M, True, EVEN_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
                                 HAS_BIAS, PRECISION, ROW64)
            dk, dv = _dkdv_inner(dk, dv, k, v, bias_log2, q_base, do_base, lse_base, delta_base,
                                 stride_qn, stride_don, offs_n, offs_m0, offs_d, mask_d, u_lo, u_hi,
                                 off, q_len, k_len, win_left, win_right, qk_scale, softcap_log2,
                                 BLOCK_M, False, EVEN_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
                                 HAS_BIAS, PRECISION, ROW64)
            dk, dv = _dkdv_inner(dk, dv, k, v, bias_log2, q_base, do_base, lse_base, delta_base,
                                 stride_qn, stride_don, offs_n, offs_m0, offs_d, mask_d, u_hi, hi,
                                 off, q_len, k_len, win_left, win_right, qk_scale, softcap_log2,
                                 BLOCK_M, True, EVEN_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
                                 HAS_BIAS, PRECISION, ROW64)
        dk = dk * sm_scale
        _store_tile(DK + b64 * stride_dkb + hkv64 * stride_dkh + k_start * stride_dkn, n0,
                    stride_dkn, offs_r, offs_d, k_len, mask_d, dk.to(DK.dtype.element_ty))
        _store_tile(DV + b64 * stride_dvb + hkv64 * stride_dvh + k_start * stride_dvn, n0,
                    stride_dvn, offs_r, offs_d, k_len, mask_d, dv.to(DV.dtype.element_ty))

    @triton.jit
    def _dq_inner(dq, q, do, lse2, delta, k_base, v_base, bias_base, stride_kn, stride_vn,
                  offs_m, offs_n0, offs_d, mask_d, start, end, off, q_len, k_len,
                  win_left, win_right, qk_scale, softcap_log2,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
                  HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                  HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, ROW64: tl.constexpr):
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + offs_n0
            k, v = _load_rows(k_base, v_base, n0, stride_kn, stride_vn, offs_n0, offs_d, k_len,
                              mask_d, MASKED, EVEN_D, ROW64)                               # (BN, D)
            s, t = _scores(_mm(q, tl.trans(k), None, PRECISION), qk_scale, softcap_log2, HAS_SOFTCAP)
            if HAS_BIAS:
                bias = tl.load(bias_base + offs_n, mask=offs_n < k_len, other=0.0)
                s = s + bias[None, :] * 1.4426950408889634
            if MASKED:
                vis = _visible(offs_m[:, None], offs_n[None, :], off, q_len, k_len,
                               win_left, win_right, HAS_LEFT, HAS_RIGHT)
                s = tl.where(vis, s, float("-inf"))
            p = tl.exp2(s - lse2[:, None])                                          # (BM, BN)
            dp = _mm(do, tl.trans(v), None, PRECISION)
            ds = p * (dp - delta[:, None])
            if HAS_SOFTCAP:
                ds = ds * (1.0 - t * t)
            dq = _mm(ds.to(k.dtype), k, dq, PRECISION)
        return dq

    @triton.jit
    def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, BIAS, DQ, CU_Q, CU_K,
                       qk_scale, softcap_log2, sm_scale, win_left, win_right,
                       stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
                       stride_vb, stride_vn, stride_vh, stride_dob, stride_don, stride_doh,
                       stride_dqb, stride_dqn, stride_dqh, stride_lb, stride_lh, stride_bb,
                       seqlen_q, seqlen_k, n_heads, group,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr,
                       HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                       HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, ROW64: tl.constexpr):
        n_m = tl.cdiv(seqlen_q, BLOCK_M)
        b, h, i, q_start, q_len, k_start, k_len = _locate(CU_Q, CU_K, n_m, n_heads, seqlen_q,
                                                          seqlen_k, IS_VARLEN)
        pid_m = n_m - 1 - i
        h_kv = h // group
        m0 = pid_m * BLOCK_M
        if m0 >= q_len:
            return
        b64, h64, hkv64 = b.to(tl.int64), h.to(tl.int64), h_kv.to(tl.int64)
        offs_r = tl.arange(0, BLOCK_M)
        offs_m = m0 + offs_r
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        row_mask = offs_m < q_len
        q, do = _load_rows(Q + b64 * stride_qb + h64 * stride_qh + q_start * stride_qn,
                           DO + b64 * stride_dob + h64 * stride_doh + q_start * stride_don, m0,
                           stride_qn, stride_don, offs_r, offs_d, q_len, mask_d, True, EVEN_D, ROW64)
        lse = tl.load(LSE + b64 * stride_lb + h64 * stride_lh + q_start + offs_m, mask=row_mask,
                      other=float("inf"))
        delta = tl.load(DELTA + b64 * stride_lb + h64 * stride_lh + q_start + offs_m,
                        mask=row_mask, other=0.0)
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        k_base = K + b64 * stride_kb + hkv64 * stride_kh + k_start * stride_kn
        v_base = V + b64 * stride_vb + hkv64 * stride_vh + k_start * stride_vn
        bias_base = BIAS + b64 * stride_bb
        off = k_len - q_len
        lo, u_lo, u_hi, hi = _key_blocks(m0, off, q_len, k_len, win_left, win_right,
                                         BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
        dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, bias_base, stride_kn, stride_vn,
                       offs_m, offs_n0, offs_d, mask_d, lo, u_lo, off, q_len, k_len, win_left,
                       win_right, qk_scale, softcap_log2, BLOCK_N, True, EVEN_D, HAS_LEFT,
                       HAS_RIGHT, HAS_SOFTCAP, HAS_BIAS, PRECISION, ROW64)
        dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, bias_base, stride_kn, stride_vn,
                       offs_m, offs_n0, offs_d, mask_d, u_lo, u_hi, off, q_len, k_len, win_left,
                       win_right, qk_scale, softcap_log2, BLOCK_N, False, EVEN_D, HAS_LEFT,
                       HAS_RIGHT, HAS_SOFTCAP, HAS_BIAS, PRECISION, ROW64)
        dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, bias_base, stride_kn, stride_vn,
                       offs_m, offs_n0, offs_d, mask_d, u_hi, hi, off, q_len, k_len, win_left,
                       win_right, qk_scale, softcap_log2, BLOCK_N, True, EVEN_D, HAS_LEFT,
                       HAS_RIGHT, HAS_SOFTCAP, HAS_BIAS, PRECISION, ROW64)
        dq = dq * sm_scale
        _store_tile(DQ + b64 * stride_dqb + h64 * stride_dqh + q_start * stride_dqn, m0,
                    stride_dqn, offs_r, offs_d, q_len, mask_d, dq.to(DQ.dtype.element_ty))


# ----------------------------------------------------------------------------------------------
# Launch metadata: constexprs, block configurations, grid (the launcher and
# tools/triton_aot_check.py read these; nothing else repeats them)
# ----------------------------------------------------------------------------------------------

try:  # where Triton reports "out of shared memory / registers" at launch (3.x)
    from triton.runtime.errors import OutOfResources as _OutOfResources
except Exception:  # pragma: no cover - older layouts
    _OutOfResources = ()

KINDS = ("fwd", "pre", "dkdv", "dq")
PRECISIONS = ("ieee", "tf32", "tf32x3")


class Config(NamedTuple):
    block_m: int          # query rows per block (every kernel)
    block_n: int          # key rows per block (0: the kernel has none)
    num_warps: int
    num_stages: int


def _c(*rows):
    return [Config(*r) for r in rows]


# Block configurations per Triton version (major, minor), kernel, head-dim bucket (BLOCK_D <= 64,
# 128, 256) and input width (False: fp16/bf16, True: fp32), preferred first; later entries are
# fall-backs tried on OutOfResources (GPUs with less shared memory per block than the H200's
# 227 KB: 163 KB on A100, 99 KB on consumer parts). NOT timed (no GPU session so far). Chosen
# from sm_90 builds without a GPU (tools/triton_aot_check.py --attention-sweep, strides
# specialised as the JIT does; ptxas registers and spills, shared memory, mma kind), by:
#   1. no register spills (regs <= 255) on the Triton the GPU runs (3.6) and on 3.9;
#   2. wgmma where possible: the M side of every product (BLOCK_M in fwd/dq, BLOCK_N in dK/dV)
#      >= 64 rows per warpgroup of 4 warps (mma.sync below that);
#   3. the largest BLOCK_M x BLOCK_N, then pipelining (2-3 stages) within 227 KB;
#   4. fall-backs: about 160 KB, then about 100 KB, then a small mma tile.
# Sweep numbers (3.6 | 3.9, bf16 causal): README "Attention". dK/dV holds two (BLOCK_N, D) fp32
# accumulators, so it cannot keep a 64-row wgmma tile spill-free at d=256 (or at d=128 on 3.9:
# 12 bytes) -- those use mma.sync tiles.
_CONFIG_TABLES: dict[tuple[int, int], dict[tuple[str, int, bool], list[Config]]] = {}


def _table(version: tuple[int, int]) -> dict[tuple[str, int, bool], list[Config]]:
    t = {
        ("fwd", 64, False): _c((128, 128, 8, 3), (128, 64, 8, 3), (32, 16, 4, 1)),
        ("fwd", 128, False): _c((128, 128, 8, 2), (128, 64, 8, 2), (32, 16, 4, 1)),
        ("fwd", 256, False): _c((128, 64, 8, 2), (128, 32, 8, 1), (32, 32, 4, 1)),
        ("fwd", 64, True): _c((128, 64, 8, 2), (64, 32, 4, 2), (32, 16, 4, 1)),
        ("fwd", 128, True): _c((128, 64, 8, 2), (128, 32, 8, 2), (32, 16, 4, 2)),
        ("fwd", 256, True): _c((32, 32, 4, 1), (16, 16, 4, 1)),
        ("dkdv", 64, False): _c((32, 128, 8, 2), (16, 64, 4, 2), (16, 16, 4, 2)),
        ("dkdv", 128, False): _c((16, 128, 8, 2), (16, 32, 4, 2), (16, 16, 4, 2)),
        ("dkdv", 256, False): _c((16, 32, 4, 1), (16, 16, 4, 1)),
        ("dkdv", 64, True): _c((16, 128, 8, 2), (16, 64, 4, 2), (16, 16, 4, 2)),
        ("dkdv", 128, True): _c((16, 32, 4, 2), (16, 16, 4, 1)),
        ("dkdv", 256, True): _c((16, 16, 4, 1),),
        ("dq", 64, False): _c((128, 64, 8, 3), (64, 32, 4, 3), (16, 16, 4, 2)),
        ("dq", 128, False): _c((128, 64, 8, 2), (64, 32, 4, 3), (16, 16, 4, 2)),
        ("dq", 256, False): _c((128, 32, 8, 2), (128, 16, 8, 2), (32, 16, 4, 1)),
        ("dq", 64, True): _c((128, 64, 8, 2), (64, 32, 4, 2), (16, 16, 4, 2)),
        ("dq", 128, True): _c((128, 32, 8, 2), (64, 16, 4, 2), (32, 16, 4, 2)),
        ("dq", 256, True): _c((32, 32, 4, 1), (32, 16, 4, 1)),
    }
    if version >= (3, 9):
        # 3.9 spills 12 bytes with the 3.6 wgmma tile here.
        t[("dkdv", 128, False)] = _c((16, 32, 4, 2), (16, 16, 4, 2))
    for d in (64, 128, 256):
        t[("pre", d, False)] = t[("pre", d, True)] = _c((64, 0, 4, 1))
    return t


_CONFIG_TABLES[(3, 6)] = _table((3, 6))
_CONFIG_TABLES[(3, 9)] = _table((3, 9))

# Under the interpreter one small config keeps CPU tests fast while still crossing block
# boundaries at N ~ 100.
_INTERPRETER_CONFIGS = {"fwd": _c((32, 32, 4, 1)), "dkdv": _c((32, 32, 4, 1)),
                        "dq": _c((32, 32, 4, 1)), "pre": _c((32, 0, 4, 1))}


def triton_version() -> tuple[int, int]:
    if triton is None:
        return (0, 0)
    major, minor = (triton.__version__.split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _table_for(version: Optional[tuple[int, int]] = None):
    """The table of ``version`` (default: the running Triton): its own, else the newest one not
    newer than it, else the oldest."""
    version = triton_version() if version is None else version
    keys = sorted(_CONFIG_TABLES)
    older = [k for k in keys if k <= version]
    return _CONFIG_TABLES[older[-1] if older else keys[0]]


def block_d(head_dim: int) -> int:
    """The head dim padded to a power of two, at least 16 (tl.dot's smallest K)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def launch_configs(kind: str, head_dim: int, dtype: torch.dtype,
                   version: Optional[tuple[int, int]] = None,
                   interpreted: Optional[bool] = None) -> list[Config]:
    """Block configurations for kernel ``kind`` (fwd | pre | dkdv | dq), preferred first."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if _backend.interpreter_on() if interpreted is None else interpreted:
        return _INTERPRETER_CONFIGS[kind]
    bd = block_d(head_dim)
    bucket = 64 if bd <= 64 else 128 if bd <= 128 else 256
    return _table_for(version)[(kind, bucket, dtype == torch.float32)]


def kernel_meta(kind: str, head_dim: int, dtype: torch.dtype, *, varlen: bool, has_left: bool,
                has_right: bool, softcap: bool, bias: bool, precision: str,
                row64: bool = False) -> dict:
    """The constexprs of kernel ``kind`` except BLOCK_M/BLOCK_N (they come with the config).
    ``row64``: some sequence spans more than 2**31 elements (row offsets in int64)."""
    bd = block_d(head_dim)
    if kind == "pre":
        return dict(HEAD_DIM=head_dim, BLOCK_D=bd, IS_VARLEN=varlen, ROW64=row64)
    return dict(HEAD_DIM=head_dim, BLOCK_D=bd, EVEN_D=head_dim == bd, IS_VARLEN=varlen,
                HAS_LEFT=has_left, HAS_RIGHT=has_right, HAS_SOFTCAP=softcap, HAS_BIAS=bias,
                # One compiled variant for fp16/bf16, where the operand precision is moot.
                PRECISION=precision if dtype == torch.float32 else "ieee", ROW64=row64)


def _row64(seqlen: int, *tensors: torch.Tensor) -> bool:
    """Whether row offsets within a sequence (rows up to seqlen plus one block) times the token
    stride of any of ``tensors`` pass int32."""
    return any((seqlen + _MAX_BLOCK_ROWS) * abs(t.stride(-3)) > _INT32_MAX for t in tensors)


def config_meta(kind: str, config: Config) -> dict:
    if kind == "pre":
        return dict(BLOCK_M=config.block_m)
    return dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n)


def grid_size(kind: str, config: Config, batch: int, heads: int, seqlen_q: int,
              seqlen_k: int) -> int:
    """Programs of the 1-D grid (see _locate): blocks x batch x heads (kv heads for dkdv)."""
    if kind == "dkdv":
        return triton.cdiv(seqlen_k, config.block_n) * batch * heads
    return triton.cdiv(seqlen_q, config.block_m) * batch * heads


_GRID_LIMITS = (2**31 - 1, 65535, 65535)      # CUDA's gridDim.x, .y, .z
_chosen: dict[tuple, int] = {}


def _check_grid(kind: str, grid: tuple) -> None:
    for axis, (n, limit) in enumerate(zip(grid, _GRID_LIMITS)):
        if n > limit:
            raise ValueError(f"flash attention {kind}: {n} programs on grid axis {axis} exceed "
                             f"CUDA's limit {limit} (batch x heads x blocks); split the batch")


def _launch(kernel, kind: str, head_dim: int, dtype: torch.dtype, sizes: tuple, args,
            meta: dict) -> None:
    """Launches ``kernel`` with the first config that fits; remembers the one that did.
    ``sizes`` = (batch, heads, seqlen_q, seqlen_k) for grid_size."""
    configs = launch_configs(kind, head_dim, dtype)
    key = (kind, head_dim, dtype, tuple(sorted(meta.items())))
    first = _chosen.get(key, 0)
    error = None
    for i in range(first, len(configs)):
        config = configs[i]
        grid = (grid_size(kind, config, *sizes),)
        _check_grid(kind, grid)
        try:
            kernel[grid](*args, **meta, **config_meta(kind, config),
                                num_warps=config.num_warps, num_stages=config.num_stages)
        except _OutOfResources as exc:  # type: ignore[misc]
            error = exc
            continue
        _chosen[key] = i
        return
    raise RuntimeError(f"flash attention {kind}: no block configuration fits this GPU "
                       f"(head dim {head_dim}, {dtype})") from error


def default_precision() -> str:
    """The fp32 operand precision torch uses for CUDA matmuls: "tf32" when TF32 is allowed
    (``torch.backends.cuda.matmul.fp32_precision = "tf32"``, ``allow_tf32 = True`` or
    ``torch.set_float32_matmul_precision("high" | "medium")``), else "ieee" (torch's default).
    torch >= 2.9 has ``fp32_precision`` (it also reflects the legacy settings and never raises on
    mixed use, where reading ``allow_tf32`` does); older torch has the float32 matmul precision."""
    matmul = torch.backends.cuda.matmul
    try:
        value = matmul.fp32_precision
    except (AttributeError, RuntimeError):
        value = None
    if value in ("ieee", "tf32"):
        return value
    if value == "none":                      # "inherit", and nothing set above: the default
        return "ieee"
    try:
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    except (AttributeError, RuntimeError):  # pragma: no cover - torch < 1.12
        return "tf32" if getattr(matmul, "allow_tf32", False) else "ieee"


def _precision(value: str) -> str:
    return default_precision() if value == "" else value


# ----------------------------------------------------------------------------------------------
# Host functions: check -> allocate -> grid -> launch
# ----------------------------------------------------------------------------------------------

_INT32_MAX = 2**31 - 1
_BOUND_CLAMP = 2**30          # window bounds beyond any sequence length are clamped to this
_MAX_BLOCK_ROWS = 256         # no config has more rows per tile


def _bsh(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(stride_batch, stride_token, stride_head) of a (B, N, H, D) or varlen (T, H, D) tensor."""
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int]:
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def _dims(q, k, cu_q, max_q, max_k):
    varlen = cu_q is not None
    if varlen:
        batch, n_heads, n_kv_heads = cu_q.shape[0] - 1, q.shape[1], k.shape[1]
        seqlen_q, seqlen_k = max_q, max_k
    else:
        batch, seqlen_q, n_heads = q.shape[0], q.shape[1], q.shape[2]
        seqlen_k, n_kv_heads = k.shape[1], k.shape[2]
    return varlen, batch, n_heads, n_kv_heads, seqlen_q, seqlen_k


def _scalars(scale: float, softcap: float, has_left, left, has_right, right):
    qk_scale = scale / softcap if softcap > 0 else scale * _LOG2E
    clamp = lambda x: max(-_BOUND_CLAMP, min(_BOUND_CLAMP, int(x)))  # noqa: E731
    return (qk_scale, softcap * _LOG2E, clamp(left) if has_left else 0,
            clamp(right) if has_right else 0)


def _forward_impl(q, k, v, bias, cu_q, cu_k, max_q, max_k, scale, has_left, left, has_right,
                  right, softcap, precision):
    varlen, batch, n_heads, n_kv_heads, seqlen_q, seqlen_k = _dims(q, k, cu_q, max_q, max_k)
    head_dim = q.shape[-1]
    out = torch.empty_like(q)
    if varlen:
        lse = torch.empty((n_heads, q.shape[0]), dtype=torch.float32, device=q.device)
    else:
        lse = torch.empty((batch, n_heads, seqlen_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or seqlen_q == 0:
        return out, lse
    qk_scale, softcap_log2, wl, wr = _scalars(scale, softcap, has_left, left, has_right, right)
    dummy = lse
    args = (q, k, v, out, lse, bias if bias is not None else dummy,
            cu_q if varlen else dummy, cu_k if varlen else dummy,
            qk_scale, softcap_log2, wl, wr,
            *_bsh(q, varlen), *_bsh(k, varlen), *_bsh(v, varlen), *_bsh(out, varlen),
            *_lse_strides(lse, varlen), bias.stride(0) if bias is not None else 0,
            seqlen_q, seqlen_k, n_heads, n_heads // n_kv_heads)
    meta = kernel_meta("fwd", head_dim, q.dtype, varlen=varlen, has_left=has_left,
                       has_right=has_right, softcap=softcap > 0, bias=bias is not None,
                       precision=_precision(precision),
                       row64=_row64(seqlen_q, q, out) or _row64(seqlen_k, k, v))
    _launch(_fwd_kernel, "fwd", head_dim, q.dtype, (batch, n_heads, seqlen_q, seqlen_k), args,
            meta)
    return out, lse


def _backward_impl(dout, q, k, v, out, lse, bias, cu_q, cu_k, max_q, max_k, scale, has_left,
                   left, has_right, right, softcap, precision):
    varlen, batch, n_heads, n_kv_heads, seqlen_q, seqlen_k = _dims(q, k, cu_q, max_q, max_k)
    head_dim = q.shape[-1]
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if dk.numel() == 0 and dq.numel() == 0:
        return dq, dk, dv
    if seqlen_q == 0 or dq.numel() == 0:      # no query: no gradient reaches k and v
        return dq, dk.zero_(), dv.zero_()
    qk_scale, softcap_log2, wl, wr = _scalars(scale, softcap, has_left, left, has_right, right)
    group = n_heads // n_kv_heads
    delta = torch.empty_like(lse)
    cu_q_arg = cu_q if varlen else lse
    cu_k_arg = cu_k if varlen else lse
    lse_strides = _lse_strides(lse, varlen)
    flags = dict(varlen=varlen, has_left=has_left, has_right=has_right, softcap=softcap > 0,
                 bias=bias is not None, precision=_precision(precision),
                 row64=_row64(seqlen_q, q, out, dout, dq) or _row64(seqlen_k, k, v, dk, dv))
    _launch(_bwd_preprocess_kernel, "pre", head_dim, q.dtype, (batch, n_heads, seqlen_q, seqlen_k),
            (out, dout, delta, cu_q_arg, *_bsh(out, varlen), *_bsh(dout, varlen), *lse_strides,
             seqlen_q, n_heads),
            kernel_meta("pre", head_dim, q.dtype, **flags))
    bias_arg = bias if bias is not None else lse
    bias_stride = bias.stride(0) if bias is not None else 0
    if seqlen_k > 0 and dk.numel() > 0:
        _launch(_bwd_dkdv_kernel, "dkdv", head_dim, q.dtype,
                (batch, n_kv_heads, seqlen_q, seqlen_k),
                (q, k, v, dout, lse, delta, bias_arg, dk, dv, cu_q_arg, cu_k_arg,
                 qk_scale, softcap_log2, scale, wl, wr,
                 *_bsh(q, varlen), *_bsh(k, varlen), *_bsh(v, varlen), *_bsh(dout, varlen),
                 *_bsh(dk, varlen), *_bsh(dv, varlen), *lse_strides, bias_stride,
                 seqlen_q, seqlen_k, n_kv_heads, group),
                kernel_meta("dkdv", head_dim, q.dtype, **flags))
    _launch(_bwd_dq_kernel, "dq", head_dim, q.dtype, (batch, n_heads, seqlen_q, seqlen_k),
            (q, k, v, dout, lse, delta, bias_arg, dq, cu_q_arg, cu_k_arg,
             qk_scale, softcap_log2, scale, wl, wr,
             *_bsh(q, varlen), *_bsh(k, varlen), *_bsh(v, varlen), *_bsh(dout, varlen),
             *_bsh(dq, varlen), *lse_strides, bias_stride,
             seqlen_q, seqlen_k, n_heads, group),
            kernel_meta("dq", head_dim, q.dtype, **flags))
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# torch.library registration (torch.compile(fullgraph=True) traces through these)
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("fused_lm::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                    cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
                    max_seqlen_q: int, max_seqlen_k: int, scale: float, has_left: bool, left: int,
                    has_right: bool, right: int, softcap: float, precision: str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_impl(q, k, v, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         scale, has_left, left, has_right, right, softcap, precision)


@_flash_attn_fwd.register_fake
def _flash_attn_fwd_fake(q, k, v, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         scale, has_left, left, has_right, right, softcap, precision):
    if cu_seqlens_q is not None:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    return torch.empty_like(q), lse


@torch.library.custom_op("fused_lm::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    out: torch.Tensor, lse: torch.Tensor, bias: Optional[torch.Tensor],
                    cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
                    max_seqlen_q: int, max_seqlen_k: int, scale: float, has_left: bool, left: int,
                    has_right: bool, right: int, softcap: float, precision: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_impl(dout, q, k, v, out, lse, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                          max_seqlen_k, scale, has_left, left, has_right, right, softcap, precision)


@_flash_attn_bwd.register_fake
def _flash_attn_bwd_fake(dout, q, k, v, out, lse, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                         max_seqlen_k, scale, has_left, left, has_right, right, softcap, precision):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    (q, k, v, bias, cu_q, cu_k, max_q, max_k, scale, has_left, left, has_right, right,
     softcap, precision) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, cu_q, cu_k)
    ctx.params = (max_q, max_k, scale, has_left, left, has_right, right, softcap, precision)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    # The lse output is not differentiable (as in flash-attn): its gradient is ignored.
    q, k, v, out, lse, bias, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = _flash_attn_bwd(dout, q, k, v, out, lse, bias, cu_q, cu_k, *ctx.params)
    return (dq, dk, dv) + (None,) * 12


_flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Checks and the entry point
# ----------------------------------------------------------------------------------------------

def _check_cu_seqlens(name: str, cu: torch.Tensor, total: int, max_seqlen: Optional[int],
                      device: torch.device) -> torch.Tensor:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(cu).__name__}")
    if cu.dim() != 1 or cu.shape[0] < 2:
        raise ValueError(f"{name} must be 1-D with batch + 1 >= 2 entries, got shape {tuple(cu.shape)}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 (or int64), got {cu.dtype}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    if cu.device.type == "cpu" or checked_mode():
        # Reads the values: a host synchronisation on GPU, so only in checked mode there.
        values = cu.detach().to("cpu", torch.int64)
        if values[0].item() != 0:
            raise ValueError(f"{name}[0] must be 0, got {values[0].item()}")
        lengths = values[1:] - values[:-1]
        if (lengths < 0).any():
            bad = int(torch.nonzero(lengths < 0)[0, 0]) + 1
            raise ValueError(f"{name} must be non-decreasing (cumulative sequence lengths); "
                             f"{name}[{bad}] = {values[bad].item()} < {name}[{bad - 1}] = "
                             f"{values[bad - 1].item()}")
        if values[-1].item() != total:
            raise ValueError(f"{name}[-1] = {values[-1].item()} does not match the token count "
                             f"{total} of the packed tensor")
        if max_seqlen is not None and lengths.max().item() > max_seqlen:
            raise ValueError(f"max_seqlen for {name} is {max_seqlen} but the longest sequence has "
                             f"{lengths.max().item()} tokens")
    return cu.to(torch.int32) if cu.dtype != torch.int32 else cu


def _max_seqlen(cu: torch.Tensor) -> int:
    # One host synchronisation (documented): pass max_seqlen_* to avoid it (and under compile).
    return int((cu[1:] - cu[:-1]).max().item())


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
              causal: bool = False, window: Optional[tuple[int, int]] = None,
              softcap: Optional[float] = None, key_bias: Optional[torch.Tensor] = None,
              cu_seqlens_q: Optional[torch.Tensor] = None,
              cu_seqlens_k: Optional[torch.Tensor] = None, max_seqlen_q: Optional[int] = None,
              max_seqlen_k: Optional[int] = None, causal_top_left: bool = False,
              input_precision: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton flash attention; returns ``(out, lse)``. Layout (B, N, H, D) or varlen (T, H, D)
    with ``cu_seqlens_*`` (see the module docstring). ``key_bias`` (B, Nk) float32 is added to
    the scores of every query (key-padding masks: 0 or -inf); it gets no gradient.
    ``causal_top_left`` aligns the causal mask top-left (torch SDPA's ``is_causal``) instead of
    bottom-right; it needs no window. ``input_precision`` (fp32 inputs only): "ieee", "tf32" or
    "tf32x3" for the products; None follows torch's CUDA matmul setting (default_precision(),
    read when the kernels run)."""
    if triton is None:
        raise RuntimeError("flash attention needs triton (pip install triton)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; the Triton kernel takes float16, bfloat16 "
                            "or float32 (other dtypes use the torch backend)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    want = 3 if varlen else 4
    layout = "(total_tokens, heads, head_dim)" if varlen else "(batch, seqlen, heads, head_dim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != want:
            raise ValueError(f"{name} must be {want}-D {layout}, got shape {tuple(t.shape)}")
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim or v.shape[-1] != head_dim:
        raise ValueError(f"q, k, v must share the head dim, got {q.shape[-1]}, {k.shape[-1]}, "
                         f"{v.shape[-1]}")
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {head_dim}")
    if input_precision is not None and input_precision not in PRECISIONS:
        raise ValueError(f"input_precision must be one of {', '.join(PRECISIONS)} or None, got "
                         f"{input_precision!r}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    n_heads, n_kv_heads = q.shape[-2], k.shape[-2]
    if n_kv_heads == 0 or n_heads % n_kv_heads != 0:
        raise ValueError(f"query heads ({n_heads}) must be a multiple of key/value heads ({n_kv_heads})")
    if not varlen and q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must share the batch size, got {q.shape[0]} and {k.shape[0]}")
    if varlen:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError("packed sequences need both cu_seqlens_q and cu_seqlens_k")
        if key_bias is not None:
            raise ValueError("key_bias is not supported with packed sequences (pack without padding)")
        cu_seqlens_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, q.device)
        cu_seqlens_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, q.device)
        if cu_seqlens_q.shape != cu_seqlens_k.shape:
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length, got "
                             f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}")
        max_q = _max_seqlen(cu_seqlens_q) if max_seqlen_q is None else int(max_seqlen_q)
        max_k = _max_seqlen(cu_seqlens_k) if max_seqlen_k is None else int(max_seqlen_k)
    else:
        if max_seqlen_q is not None or max_seqlen_k is not None:
            raise ValueError("max_seqlen_q/max_seqlen_k apply only to packed sequences (cu_seqlens)")
        max_q, max_k = q.shape[1], k.shape[1]
    if key_bias is not None:
        if key_bias.shape != (q.shape[0], k.shape[1]):
            raise ValueError(f"key_bias must have shape (batch, seqlen_k) = {(q.shape[0], k.shape[1])}, "
                             f"got {tuple(key_bias.shape)}")
        if key_bias.device != q.device:
            raise ValueError(f"key_bias is on {key_bias.device} but q is on {q.device}")
        key_bias = key_bias.to(torch.float32).contiguous()
    for name, t in (("q", q), ("k", k), ("v", v)):
        # Tile offsets (rows within one block x the token stride) are int32 in the kernels;
        # batch, head and block starts are int64.
        if abs(t.stride(-3)) * _MAX_BLOCK_ROWS > _INT32_MAX:
            raise ValueError(f"{name}: token stride {t.stride(-3)} is too large (at most "
                             f"{_INT32_MAX // _MAX_BLOCK_ROWS} elements between tokens)")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))

    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    softcap = 0.0 if softcap is None else float(softcap)
    if softcap < 0:
        raise ValueError(f"softcap must be > 0 (or None/0 for none), got {softcap}")
    left, right = (-1, -1) if window is None else window
    if not (isinstance(left, int) and isinstance(right, int)) or left < -1 or right < -1:
        raise ValueError(f"window must be (left, right) ints >= -1 (-1: unbounded), got {window}")
    has_left, has_right = left >= 0, right >= 0
    if causal:
        if causal_top_left:
            # torch SDPA: key j visible to query i iff j <= i, i.e. right = -(Nk - Nq).
            if window is not None:
                raise ValueError("causal_top_left takes no window")
            has_right, right = True, (max_q - max_k)
        else:
            has_right, right = True, (0 if right < 0 else min(right, 0))
    return _flash_attn_fwd(q, k, v, key_bias, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale,
                           has_left, max(left, 0), has_right, right, softcap,
                           input_precision or "")
