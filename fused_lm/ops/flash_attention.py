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

Forward (Dao, FlashAttention-2, 2023): one program per (query block, batch x head), online
softmax in base 2 (s is pre-multiplied by log2(e)), fp32 accumulators, lse saved in float32.

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

Work without a GPU: the same kernels run under the Triton interpreter on CPU tensors (tests).
No libdevice: tanh(x) = 2 * sigmoid(2x) - 1.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch

from fused_lm import _backend
from fused_lm.ops._spec import FamilySpec

SPEC = FamilySpec(
    name="attention", backends=("triton", "torch"), gpu_default="triton",
    gpu_default_why="the only kernel backend (no C++ kernel); not yet measured on a GPU "
                    "(bench/bench_attention.py)",
    reference="fused_lm.reference.attention:attention")

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux dependency
    triton = None

MIN_HEAD_DIM, MAX_HEAD_DIM = 8, 256
_LOG2E = 1.4426950408889634
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def checked_mode() -> bool:
    """FUSED_LM_CHECK=1 turns on the checks that read device values (a host synchronisation)."""
    return os.environ.get("FUSED_LM_CHECK", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if triton is not None:

    # Set once at import: TRITON_INTERPRET must be set before triton is imported anyway.
    _INTERPRETED = tl.constexpr(_backend.interpreter_on())

    @triton.jit
    def _mm(a, b, acc):
        # acc + a @ b with fp32 accumulation. The interpreter (Triton <= 3.9) multiplies bfloat16
        # operands as their raw uint16 bits: there, and only there, operands go through fp32,
        # which is exact (products of 8-bit-mantissa values fit in fp32's 24 bits).
        if _INTERPRETED:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        else:
            acc = tl.dot(a, b, acc)
        return acc

    @triton.jit
    def _mm0(a, b):
        # a @ b in fp32 (see _mm).
        if _INTERPRETED:
            c = tl.dot(a.to(tl.float32), b.to(tl.float32))
        else:
            c = tl.dot(a, b)
        return c

    @triton.jit
    def _tanh(x):
        # The interpreter has no libdevice: tanh(x) = 2 sigmoid(2x) - 1 (absolute error ~1e-7).
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0

    @triton.jit
    def _scores(x, qk_scale, softcap_log2, HAS_SOFTCAP: tl.constexpr):
        # x = q k^T (fp32). Returns s in log2 units and t = tanh(scale * x / softcap) (the
        # softcap derivative needs it; x itself when there is no softcap).
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
    def _seq_bounds(CU, b, seqlen, IS_VARLEN: tl.constexpr):
        if IS_VARLEN:
            start = tl.load(CU + b).to(tl.int64)
            length = (tl.load(CU + b + 1).to(tl.int64) - start).to(tl.int32)
        else:
            start = b.to(tl.int64) * 0
            length = b * 0 + seqlen
        return start, length

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
    def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, bias_base, stride_kn, stride_vn,
                   offs_m, offs_n0, offs_d, mask_d, start, end, off, q_len, k_len,
                   win_left, win_right, qk_scale, softcap_log2,
                   BLOCK_N: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
                   HAS_LEFT: tl.constexpr,
                   HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr):
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + offs_n0
            k_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None]
            if MASKED:
                k_t = tl.load(k_ptrs, mask=(offs_n[None, :] < k_len) & mask_d[:, None], other=0.0)
            elif EVEN_D:
                k_t = tl.load(k_ptrs)                                               # (D, BN)
            else:
                k_t = tl.load(k_ptrs, mask=mask_d[:, None], other=0.0)
            s, t = _scores(_mm0(q, k_t), qk_scale, softcap_log2, HAS_SOFTCAP)     # (BM, BN)
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
            v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]
            if MASKED:
                v = tl.load(v_ptrs, mask=(offs_n[:, None] < k_len) & mask_d[None, :], other=0.0)
            elif EVEN_D:
                v = tl.load(v_ptrs)                                                 # (BN, D)
            else:
                v = tl.load(v_ptrs, mask=mask_d[None, :], other=0.0)
            acc = acc * alpha[:, None]
            acc = _mm(p.to(v.dtype), v, acc)
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
                    BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr,
                    HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr):
        # Largest query blocks first: with causal masks they have the most work (load balance).
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // n_heads
        h = pid_bh % n_heads
        h_kv = h // group
        q_start, q_len = _seq_bounds(CU_Q, b, seqlen_q, IS_VARLEN)
        k_start, k_len = _seq_bounds(CU_K, b, seqlen_k, IS_VARLEN)
        m0 = pid_m * BLOCK_M
        if m0 >= q_len:          # varlen: this sequence is shorter than max_seqlen_q
            return
        b64 = b.to(tl.int64)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        row_mask = offs_m < q_len
        q_base = Q + b64 * stride_qb + h * stride_qh + q_start * stride_qn
        q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :],
                    mask=row_mask[:, None] & mask_d[None, :], other=0.0)            # (BM, D)
        k_base = K + b64 * stride_kb + h_kv * stride_kh + k_start * stride_kn
        v_base = V + b64 * stride_vb + h_kv * stride_vh + k_start * stride_vn
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
                                   BLOCK_N, True, EVEN_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_BIAS)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, bias_base, stride_kn,
                                   stride_vn, offs_m, offs_n0, offs_d, mask_d, u_lo, u_hi, off,
                                   q_len, k_len, win_left, win_right, qk_scale, softcap_log2,
                                   BLOCK_N, False, EVEN_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_BIAS)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, bias_base, stride_kn,
                                   stride_vn, offs_m, offs_n0, offs_d, mask_d, u_hi, hi, off,
                                   q_len, k_len, win_left, win_right, qk_scale, softcap_log2,
                                   BLOCK_N, True, EVEN_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_BIAS)
        empty = l_i == 0.0                                # rows that see no key: O = 0, lse = -inf
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
        o_base = O + b64 * stride_ob + h * stride_oh + q_start * stride_on
        tl.store(o_base + offs_m[:, None] * stride_on + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=row_mask[:, None] & mask_d[None, :])
        tl.store(LSE + b64 * stride_lb + h * stride_lh + q_start + offs_m, lse, mask=row_mask)

    @triton.jit
    def _bwd_preprocess_kernel(O, DO, DELTA, CU_Q, stride_ob, stride_on, stride_oh,
                               stride_dob, stride_don, stride_doh, stride_lb, stride_lh,
                               seqlen_q, n_heads, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                               BLOCK_M: tl.constexpr, IS_VARLEN: tl.constexpr):
        # delta_i = sum_d dO_id * O_id (fp32): the row term of dS = P * (dP - delta).
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // n_heads
        h = pid_bh % n_heads
        q_start, q_len = _seq_bounds(CU_Q, b, seqlen_q, IS_VARLEN)
        m0 = pid_m * BLOCK_M
        if m0 >= q_len:
            return
        b64 = b.to(tl.int64)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)
        rows = (q_start + offs_m)[:, None]
        o = tl.load(O + b64 * stride_ob + h * stride_oh + rows * stride_on + offs_d[None, :],
                    mask=mask, other=0.0).to(tl.float32)
        do = tl.load(DO + b64 * stride_dob + h * stride_doh + rows * stride_don + offs_d[None, :],
                     mask=mask, other=0.0).to(tl.float32)
        tl.store(DELTA + b64 * stride_lb + h * stride_lh + q_start + offs_m, tl.sum(o * do, 1),
                 mask=offs_m < q_len)

    @triton.jit
    def _dkdv_inner(dk, dv, k, v, bias_log2, q_base, do_base, lse_base, delta_base,
                    stride_qn, stride_don, offs_n, offs_m0, offs_d, mask_d, start, end, off,
                    q_len, k_len, win_left, win_right, qk_scale, softcap_log2,
                    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
                   HAS_LEFT: tl.constexpr,
                    HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr):
        # Scores are computed transposed, (BN, BM), so that dV += P^T dO and dK += dX^T Q are
        # plain dots with no transposed operand to materialise.
        for m0 in range(start, end, BLOCK_M):
            offs_m = m0 + offs_m0
            q_ptrs = q_base + offs_m[:, None] * stride_qn + offs_d[None, :]
            do_ptrs = do_base + offs_m[:, None] * stride_don + offs_d[None, :]
            if MASKED:
                row_mask = offs_m < q_len
                mask = row_mask[:, None] & mask_d[None, :]
                q = tl.load(q_ptrs, mask=mask, other=0.0)
                do = tl.load(do_ptrs, mask=mask, other=0.0)
                lse = tl.load(lse_base + offs_m, mask=row_mask, other=float("inf"))
                delta = tl.load(delta_base + offs_m, mask=row_mask, other=0.0)
            else:
                if EVEN_D:
                    q = tl.load(q_ptrs)
                    do = tl.load(do_ptrs)
                else:
                    q = tl.load(q_ptrs, mask=mask_d[None, :], other=0.0)
                    do = tl.load(do_ptrs, mask=mask_d[None, :], other=0.0)
                lse = tl.load(lse_base + offs_m)
                delta = tl.load(delta_base + offs_m)
            # Rows that saw no key have lse = -inf: use +inf so their P is 0, not NaN.
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            s_t, t_t = _scores(_mm0(k, tl.trans(q)), qk_scale, softcap_log2, HAS_SOFTCAP)
            if HAS_BIAS:
                s_t = s_t + bias_log2[:, None]
            if MASKED:
                vis = _visible(offs_m[None, :], offs_n[:, None], off, q_len, k_len,
                               win_left, win_right, HAS_LEFT, HAS_RIGHT)
                s_t = tl.where(vis, s_t, float("-inf"))
            p_t = tl.exp2(s_t - lse2[None, :])                                      # (BN, BM)
            dv = _mm(p_t.to(do.dtype), do, dv)
            dp_t = _mm0(v, tl.trans(do))                                          # (BN, BM)
            ds_t = p_t * (dp_t - delta[None, :])
            if HAS_SOFTCAP:
                ds_t = ds_t * (1.0 - t_t * t_t)
            dk = _mm(ds_t.to(q.dtype), q, dk)
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
                    BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr,
                         HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                         HAS_BIAS: tl.constexpr):
        # One program per (key block, batch x kv head); loops over the `group` query heads that
        # share this kv head, so the GQA sum of dK/dV stays in registers (no atomics).
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // n_kv_heads
        h_kv = pid_bh % n_kv_heads
        q_start, q_len = _seq_bounds(CU_Q, b, seqlen_q, IS_VARLEN)
        k_start, k_len = _seq_bounds(CU_K, b, seqlen_k, IS_VARLEN)
        n0 = pid_n * BLOCK_N
        if n0 >= k_len:
            return
        b64 = b.to(tl.int64)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_m0 = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        kv_mask = (offs_n[:, None] < k_len) & mask_d[None, :]
        k = tl.load(K + b64 * stride_kb + h_kv * stride_kh + (k_start + offs_n)[:, None] * stride_kn
                    + offs_d[None, :], mask=kv_mask, other=0.0)                     # (BN, D)
        v = tl.load(V + b64 * stride_vb + h_kv * stride_vh + (k_start + offs_n)[:, None] * stride_vn
                    + offs_d[None, :], mask=kv_mask, other=0.0)
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
            h = h_kv * group + g
            q_base = Q + b64 * stride_qb + h * stride_qh + q_start * stride_qn
            do_base = DO + b64 * stride_dob + h * stride_doh + q_start * stride_don
            lse_base = LSE + b64 * stride_lb + h * stride_lh + q_start
            delta_base = DELTA + b64 * stride_lb + h * stride_lh + q_start
            dk, dv = _dkdv_inner(dk, dv, k, v, bias_log2, q_base, do_base, lse_base, delta_base,
                                 stride_qn, stride_don, offs_n, offs_m0, offs_d, mask_d, lo, u_lo,
                                 off, q_len, k_len, win_left, win_right, qk_scale, softcap_log2,
                                 BLOCK_M, True, EVEN_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_BIAS)
            dk, dv = _dkdv_inner(dk, dv, k, v, bias_log2, q_base, do_base, lse_base, delta_base,
                                 stride_qn, stride_don, offs_n, offs_m0, offs_d, mask_d, u_lo, u_hi,
                                 off, q_len, k_len, win_left, win_right, qk_scale, softcap_log2,
                                 BLOCK_M, False, EVEN_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_BIAS)
            dk, dv = _dkdv_inner(dk, dv, k, v, bias_log2, q_base, do_base, lse_base, delta_base,
                                 stride_qn, stride_don, offs_n, offs_m0, offs_d, mask_d, u_hi, hi,
                                 off, q_len, k_len, win_left, win_right, qk_scale, softcap_log2,
                                 BLOCK_M, True, EVEN_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_BIAS)
        dk = dk * sm_scale
        tl.store(DK + b64 * stride_dkb + h_kv * stride_dkh + (k_start + offs_n)[:, None] * stride_dkn
                 + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + b64 * stride_dvb + h_kv * stride_dvh + (k_start + offs_n)[:, None] * stride_dvn
                 + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _dq_inner(dq, q, do, lse2, delta, k_base, v_base, bias_base, stride_kn, stride_vn,
                  offs_m, offs_n0, offs_d, mask_d, start, end, off, q_len, k_len,
                  win_left, win_right, qk_scale, softcap_log2,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
                   HAS_LEFT: tl.constexpr,
                  HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr):
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + offs_n0
            k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :]
            v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]
            if MASKED:
                kv_mask = (offs_n[:, None] < k_len) & mask_d[None, :]
                k = tl.load(k_ptrs, mask=kv_mask, other=0.0)                        # (BN, D)
                v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
            elif EVEN_D:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            else:
                k = tl.load(k_ptrs, mask=mask_d[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=mask_d[None, :], other=0.0)
            s, t = _scores(_mm0(q, tl.trans(k)), qk_scale, softcap_log2, HAS_SOFTCAP)
            if HAS_BIAS:
                bias = tl.load(bias_base + offs_n, mask=offs_n < k_len, other=0.0)
                s = s + bias[None, :] * 1.4426950408889634
            if MASKED:
                vis = _visible(offs_m[:, None], offs_n[None, :], off, q_len, k_len,
                               win_left, win_right, HAS_LEFT, HAS_RIGHT)
                s = tl.where(vis, s, float("-inf"))
            p = tl.exp2(s - lse2[:, None])                                          # (BM, BN)
            dp = _mm0(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            if HAS_SOFTCAP:
                ds = ds * (1.0 - t * t)
            dq = _mm(ds.to(k.dtype), k, dq)
        return dq

    @triton.jit
    def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, BIAS, DQ, CU_Q, CU_K,
                       qk_scale, softcap_log2, sm_scale, win_left, win_right,
                       stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
                       stride_vb, stride_vn, stride_vh, stride_dob, stride_don, stride_doh,
                       stride_dqb, stride_dqn, stride_dqh, stride_lb, stride_lh, stride_bb,
                       seqlen_q, seqlen_k, n_heads, group,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                       BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr,
                       HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr):
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // n_heads
        h = pid_bh % n_heads
        h_kv = h // group
        q_start, q_len = _seq_bounds(CU_Q, b, seqlen_q, IS_VARLEN)
        k_start, k_len = _seq_bounds(CU_K, b, seqlen_k, IS_VARLEN)
        m0 = pid_m * BLOCK_M
        if m0 >= q_len:
            return
        b64 = b.to(tl.int64)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        row_mask = offs_m < q_len
        mask = row_mask[:, None] & mask_d[None, :]
        rows = (q_start + offs_m)[:, None]
        q = tl.load(Q + b64 * stride_qb + h * stride_qh + rows * stride_qn + offs_d[None, :],
                    mask=mask, other=0.0)
        do = tl.load(DO + b64 * stride_dob + h * stride_doh + rows * stride_don + offs_d[None, :],
                     mask=mask, other=0.0)
        lse = tl.load(LSE + b64 * stride_lb + h * stride_lh + q_start + offs_m, mask=row_mask,
                      other=float("inf"))
        delta = tl.load(DELTA + b64 * stride_lb + h * stride_lh + q_start + offs_m, mask=row_mask,
                        other=0.0)
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        k_base = K + b64 * stride_kb + h_kv * stride_kh + k_start * stride_kn
        v_base = V + b64 * stride_vb + h_kv * stride_vh + k_start * stride_vn
        bias_base = BIAS + b64 * stride_bb
        off = k_len - q_len
        lo, u_lo, u_hi, hi = _key_blocks(m0, off, q_len, k_len, win_left, win_right,
                                         BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
        dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, bias_base, stride_kn, stride_vn,
                       offs_m, offs_n0, offs_d, mask_d, lo, u_lo, off, q_len, k_len, win_left,
                       win_right, qk_scale, softcap_log2, BLOCK_N, True, EVEN_D, HAS_LEFT, HAS_RIGHT,
                       HAS_SOFTCAP, HAS_BIAS)
        dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, bias_base, stride_kn, stride_vn,
                       offs_m, offs_n0, offs_d, mask_d, u_lo, u_hi, off, q_len, k_len, win_left,
                       win_right, qk_scale, softcap_log2, BLOCK_N, False, EVEN_D, HAS_LEFT, HAS_RIGHT,
                       HAS_SOFTCAP, HAS_BIAS)
        dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, bias_base, stride_kn, stride_vn,
                       offs_m, offs_n0, offs_d, mask_d, u_hi, hi, off, q_len, k_len, win_left,
                       win_right, qk_scale, softcap_log2, BLOCK_N, True, EVEN_D, HAS_LEFT, HAS_RIGHT,
                       HAS_SOFTCAP, HAS_BIAS)
        dq = dq * sm_scale
        tl.store(DQ + b64 * stride_dqb + h * stride_dqh + rows * stride_dqn + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Block configurations
# ----------------------------------------------------------------------------------------------

try:  # where Triton reports "out of shared memory / registers" at launch (3.x)
    from triton.runtime.errors import OutOfResources as _OutOfResources
except Exception:  # pragma: no cover - older layouts
    _OutOfResources = ()


def _configs(kind: str, block_d: int, dtype: torch.dtype) -> list[tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for ``kind`` in fwd | dkdv | dq, preferred first;
    the later entries are the fall-backs tried when a launch runs out of shared memory.

    BLOCK_M is the query block, BLOCK_N the key block in every kernel (the dK/dV kernel owns a key
    block and loops over query blocks; the dQ kernel the opposite). NOT yet timed (no GPU session
    so far): each first choice is the largest tile of a small candidate set whose sm_90 build
    (Triton 3.9 compiling without a GPU, bf16, causal; ptxas resource usage) does not spill
    registers, or spills least (dK/dV at head dim 128 still spills ~56 bytes/thread: its fp32
    dK and dV tiles). Revisit with bench/bench_attention.py on a GPU. Fixed configs (no
    autotuning) also keep the backward bitwise reproducible across processes. Under the
    interpreter one small
    config keeps CPU tests fast while still crossing block boundaries at N ~ 100.
    """
    if _backend.interpreter_on():
        return [(32, 32, 4, 1)] if kind != "pre" else [(32, 0, 4, 1)]
    wide = dtype == torch.float32            # 4-byte tiles: start one step smaller
    if kind == "pre":
        return [(64, 0, 4, 1)]
    if kind == "fwd":
        table = {64: [(128, 64, 8, 3), (64, 32, 4, 3), (32, 16, 4, 1)],
                 128: [(128, 32, 8, 3), (64, 32, 4, 3), (32, 16, 4, 1)],
                 256: [(32, 32, 4, 2), (64, 16, 4, 2), (16, 16, 4, 1)]}
    elif kind == "dkdv":
        table = {64: [(32, 128, 8, 3), (16, 64, 4, 2), (16, 16, 4, 1)],
                 128: [(16, 32, 4, 2), (16, 16, 4, 1)],
                 256: [(16, 32, 8, 1), (16, 16, 4, 1)]}
    else:
        table = {64: [(128, 32, 8, 3), (64, 32, 4, 3), (16, 16, 4, 1)],
                 128: [(64, 64, 8, 3), (32, 32, 4, 2), (16, 16, 4, 1)],
                 256: [(32, 16, 4, 1), (16, 16, 4, 1)]}
    configs = table[64 if block_d <= 64 else 128 if block_d <= 128 else 256]
    return configs[1:] if wide and len(configs) > 2 else configs


_chosen: dict[tuple, int] = {}


def _launch(kernel, kind: str, block_d: int, dtype: torch.dtype, grid_fn, args, meta) -> None:
    """Launches with the first config of _configs that fits; remembers the one that did."""
    configs = _configs(kind, block_d, dtype)
    key = (kind, block_d, dtype, tuple(sorted(meta.items())))
    first = _chosen.get(key, 0)
    error = None
    for i in range(first, len(configs)):
        bm, bn, warps, stages = configs[i]
        extra = {"BLOCK_M": bm} if kind == "pre" else {"BLOCK_M": bm, "BLOCK_N": bn}
        try:
            kernel[grid_fn(bm, bn)](*args, **meta, **extra, num_warps=warps, num_stages=stages)
        except _OutOfResources as exc:  # type: ignore[misc]
            error = exc
            continue
        _chosen[key] = i
        return
    raise RuntimeError(f"flash attention {kind}: no block configuration fits this GPU "
                       f"(head dim block {block_d}, {dtype})") from error


# ----------------------------------------------------------------------------------------------
# Host functions: check -> allocate -> grid -> launch
# ----------------------------------------------------------------------------------------------

_INT32_MAX = 2**31 - 1
_BOUND_CLAMP = 2**30          # window bounds beyond any sequence length are clamped to this


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))     # tl.dot needs >= 16


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
                  right, softcap):
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
    block_d = _block_d(head_dim)
    args = (q, k, v, out, lse, bias if bias is not None else dummy,
            cu_q if varlen else dummy, cu_k if varlen else dummy,
            qk_scale, softcap_log2, wl, wr,
            *_bsh(q, varlen), *_bsh(k, varlen), *_bsh(v, varlen), *_bsh(out, varlen),
            *_lse_strides(lse, varlen), bias.stride(0) if bias is not None else 0,
            seqlen_q, seqlen_k, n_heads, n_heads // n_kv_heads)
    meta = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, EVEN_D=head_dim == block_d, IS_VARLEN=varlen, HAS_LEFT=has_left,
                HAS_RIGHT=has_right, HAS_SOFTCAP=softcap > 0, HAS_BIAS=bias is not None)
    _launch(_fwd_kernel, "fwd", block_d, q.dtype,
            lambda bm, bn: (triton.cdiv(seqlen_q, bm), batch * n_heads), args, meta)
    return out, lse


def _backward_impl(dout, q, k, v, out, lse, bias, cu_q, cu_k, max_q, max_k, scale, has_left,
                   left, has_right, right, softcap):
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
    block_d = _block_d(head_dim)
    group = n_heads // n_kv_heads
    delta = torch.empty_like(lse)
    cu_q_arg = cu_q if varlen else lse
    cu_k_arg = cu_k if varlen else lse
    lse_strides = _lse_strides(lse, varlen)
    _launch(_bwd_preprocess_kernel, "pre", block_d, q.dtype,
            lambda bm, bn: (triton.cdiv(seqlen_q, bm), batch * n_heads),
            (out, dout, delta, cu_q_arg, *_bsh(out, varlen), *_bsh(dout, varlen), *lse_strides,
             seqlen_q, n_heads),
            dict(HEAD_DIM=head_dim, BLOCK_D=block_d, IS_VARLEN=varlen))
    meta = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, EVEN_D=head_dim == block_d, IS_VARLEN=varlen, HAS_LEFT=has_left,
                HAS_RIGHT=has_right, HAS_SOFTCAP=softcap > 0, HAS_BIAS=bias is not None)
    bias_arg = bias if bias is not None else lse
    bias_stride = bias.stride(0) if bias is not None else 0
    if seqlen_k > 0 and dk.numel() > 0:
        _launch(_bwd_dkdv_kernel, "dkdv", block_d, q.dtype,
                lambda bm, bn: (triton.cdiv(seqlen_k, bn), batch * n_kv_heads),
                (q, k, v, dout, lse, delta, bias_arg, dk, dv, cu_q_arg, cu_k_arg,
                 qk_scale, softcap_log2, scale, wl, wr,
                 *_bsh(q, varlen), *_bsh(k, varlen), *_bsh(v, varlen), *_bsh(dout, varlen),
                 *_bsh(dk, varlen), *_bsh(dv, varlen), *lse_strides, bias_stride,
                 seqlen_q, seqlen_k, n_kv_heads, group), meta)
    _launch(_bwd_dq_kernel, "dq", block_d, q.dtype,
            lambda bm, bn: (triton.cdiv(seqlen_q, bm), batch * n_heads),
            (q, k, v, dout, lse, delta, bias_arg, dq, cu_q_arg, cu_k_arg,
             qk_scale, softcap_log2, scale, wl, wr,
             *_bsh(q, varlen), *_bsh(k, varlen), *_bsh(v, varlen), *_bsh(dout, varlen),
             *_bsh(dq, varlen), *lse_strides, bias_stride,
             seqlen_q, seqlen_k, n_heads, group), meta)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# torch.library registration (torch.compile(fullgraph=True) traces through these)
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("fused_lm::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                    cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
                    max_seqlen_q: int, max_seqlen_k: int, scale: float, has_left: bool, left: int,
                    has_right: bool, right: int, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_impl(q, k, v, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         scale, has_left, left, has_right, right, softcap)


@_flash_attn_fwd.register_fake
def _flash_attn_fwd_fake(q, k, v, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         scale, has_left, left, has_right, right, softcap):
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
                    has_right: bool, right: int, softcap: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_impl(dout, q, k, v, out, lse, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                          max_seqlen_k, scale, has_left, left, has_right, right, softcap)


@_flash_attn_bwd.register_fake
def _flash_attn_bwd_fake(dout, q, k, v, out, lse, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                         max_seqlen_k, scale, has_left, left, has_right, right, softcap):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    (q, k, v, bias, cu_q, cu_k, max_q, max_k, scale, has_left, left, has_right, right,
     softcap) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, cu_q, cu_k)
    ctx.params = (max_q, max_k, scale, has_left, left, has_right, right, softcap)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    # The lse output is not differentiable (as in flash-attn): its gradient is ignored.
    q, k, v, out, lse, bias, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = _flash_attn_bwd(dout, q, k, v, out, lse, bias, cu_q, cu_k, *ctx.params)
    return (dq, dk, dv) + (None,) * 11


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
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton flash attention; returns ``(out, lse)``. Layout (B, N, H, D) or varlen (T, H, D)
    with ``cu_seqlens_*`` (see the module docstring). ``key_bias`` (B, Nk) float32 is added to
    the scores of every query (key-padding masks: 0 or -inf); it gets no gradient.
    ``causal_top_left`` aligns the causal mask top-left (torch SDPA's ``is_causal``) instead of
    bottom-right; it needs no window."""
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
    if head_dim % 8 != 0 or not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be a multiple of 8 in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], "
                         f"got {head_dim}")
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
        # In-sequence offsets are int32 in the kernels (batch and sequence starts are int64).
        if (max_q if name == "q" else max_k) * abs(t.stride(-3)) > _INT32_MAX or \
                t.shape[-2] * abs(t.stride(-2)) > _INT32_MAX:
            raise ValueError(f"{name}: one sequence spans more than 2**31 elements; not supported")
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
                           has_left, max(left, 0), has_right, right, softcap)
