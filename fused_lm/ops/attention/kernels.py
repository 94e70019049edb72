"""The Triton kernels of flash attention (the math is in the package docstring).

Four kernels, launched on 1-D grids (see _locate): _fwd_kernel (out, lse), and the backward's
_bwd_preprocess_kernel (delta = rowsum(dO * O)), _bwd_dkdv_kernel and _bwd_dq_kernel. Their
arguments are flat (pointers, strides, sizes) and come from launch.Problem; the device helpers
take small tuples instead, so each loop has one call site and a short signature:

    seq   = (q_len, k_len, off, win_left, win_right)   the sequence and its visibility bounds
    sc    = (qk_scale, softcap_log2)                    score scaling (see _scores)

The loops visit three spans of blocks -- masked, fully visible, masked: spans = (lo, u_lo, u_hi,
hi) -- as the three unrolled iterations of a static_range (phase 1 runs without masks).
"""

from __future__ import annotations

from fused_lm import _backend

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux dependency
    triton = None

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
    def _scores(x, sc, HAS_SOFTCAP: tl.constexpr):
        # x = q k^T (fp32). Returns s in log2 units and t = tanh(scale * x / softcap) (the
        # softcap derivative needs it; x itself when there is no softcap). tanh is _tl_math's,
        # accurate to 1.5e-7 relative at every |u| (2 sigmoid(2u) - 1 loses relative accuracy
        # as u -> 0, where most scaled scores lie).
        qk_scale, softcap_log2 = sc
        if HAS_SOFTCAP:
            t = _tanh(x * qk_scale)            # qk_scale = scale / softcap
            s = t * softcap_log2               # softcap * log2(e)
        else:
            t = x
            s = x * qk_scale                   # qk_scale = scale * log2(e)
        return s, t

    @triton.jit
    def _visible(qi, kj, seq, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
        # qi, kj broadcast to the block: may query i see key j (bottom-right aligned)?
        q_len, k_len, off, win_left, win_right = seq
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
    def _key_blocks(m0, seq, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
        # Key blocks for query rows [m0, m0 + BLOCK_M), as (lo, u_lo, u_hi, hi): [lo, u_lo)
        # masked, [u_lo, u_hi) fully visible to every row (no mask, no bounds check), [u_hi, hi)
        # masked.
        q_len, k_len, off, win_left, win_right = seq
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
        return lo, u_lo, tl.maximum(u_hi, u_lo), hi

    @triton.jit
    def _query_blocks(n0, seq, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
        # Query blocks that see keys [n0, n0 + BLOCK_N): row i sees key j iff
        # j - off - right <= i <= j - off + left. Same split as _key_blocks; the unmasked blocks
        # lie entirely inside [0, q_len).
        q_len, k_len, off, win_left, win_right = seq
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
        return lo, u_lo, tl.maximum(u_hi, u_lo), hi

    @triton.jit
    def _load_rows(pair, row0, offs_r, offs_d, n_rows, mask_d, MASK_ROWS: tl.constexpr,
                   EVEN_D: tl.constexpr, ROW64: tl.constexpr):
        # Rows row0 + offs_r of two (rows, D) matrices, pair = (a_base, b_base, stride_a,
        # stride_b) (k and v, or q and dO; D contiguous) from the start of one sequence, as
        # (R, BLOCK_D) tiles. Rows at or past n_rows (MASK_ROWS) and the padded head-dim columns
        # (unless EVEN_D) read as 0. One call for both tiles: the interpreter pays milliseconds
        # per jit-function call.
        # Row offsets are int32 unless a sequence spans more than 2**31 elements (ROW64): an int64
        # tile base plus int32 in-tile offsets would be cheaper to compute, but the compiler then
        # hoists the loop-invariant (R, D) offset tensors out of the loops and keeps them in
        # registers (sm_90 builds: dK/dV at d=128 spilled 1036 bytes instead of 0).
        a_base, b_base, stride_a, stride_b = pair
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
    def _store_rows(base, row0, stride_row, offs_r, offs_d, n_rows, mask_d, x):
        tile = base + tl.cast(row0, tl.int64) * stride_row
        tl.store(tile + offs_r[:, None] * stride_row + offs_d[None, :], x,
                 mask=((row0 + offs_r)[:, None] < n_rows) & mask_d[None, :])

    # ------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------

    @triton.jit
    def _fwd_inner(acc, l_i, m_i, q, kv, bias_base, offs_m, offs_d, mask_d, start, end, seq, sc,
                   BLOCK_N: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
                   HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, ROW64: tl.constexpr):
        # Online softmax over key blocks [start, end): acc (BM, D), l_i and m_i (BM,) in base 2.
        k_len = seq[1]
        offs_n0 = tl.arange(0, BLOCK_N)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + offs_n0
            k, v = _load_rows(kv, n0, offs_n0, offs_d, k_len, mask_d, MASKED, EVEN_D,
                              ROW64)                                                # (BN, D)
            s, t = _scores(_mm(q, tl.trans(k), None, PRECISION), sc, HAS_SOFTCAP)   # (BM, BN)
            if HAS_BIAS:
                bias = tl.load(bias_base + offs_n, mask=offs_n < k_len, other=0.0)
                s = s + bias[None, :] * 1.4426950408889634
            if MASKED:
                vis = _visible(offs_m[:, None], offs_n[None, :], seq, HAS_LEFT, HAS_RIGHT)
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
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + (q_start + m0) * stride_qn
                    + offs_r[:, None] * stride_qn + offs_d[None, :],
                    mask=(offs_m < q_len)[:, None] & mask_d[None, :], other=0.0)   # (BM, D)
        kv = (K + b64 * stride_kb + hkv64 * stride_kh + k_start * stride_kn,
              V + b64 * stride_vb + hkv64 * stride_vh + k_start * stride_vn, stride_kn, stride_vn)
        seq = (q_len, k_len, k_len - q_len, win_left, win_right)
        sc = (qk_scale, softcap_log2)
        spans = _key_blocks(m0, seq, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for phase in tl.static_range(3):
            start, end = spans[phase], spans[phase + 1]
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, kv, BIAS + b64 * stride_bb, offs_m,
                                       offs_d, mask_d, start, end, seq, sc, BLOCK_N, phase != 1,
                                       EVEN_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_BIAS,
                                       PRECISION, ROW64)
        empty = l_i == 0.0                                # rows that see no key: O = 0, lse = -inf
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
        _store_rows(O + b64 * stride_ob + h64 * stride_oh + q_start * stride_on, m0, stride_on,
                    offs_r, offs_d, q_len, mask_d, out.to(O.dtype.element_ty))
        tl.store(LSE + b64 * stride_lb + h64 * stride_lh + q_start + offs_m, lse,
                 mask=offs_m < q_len)

    # ------------------------------------------------------------------------------------------
    # Backward
    # ------------------------------------------------------------------------------------------

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
        pair = (O + b64 * stride_ob + h64 * stride_oh + q_start * stride_on,
                DO + b64 * stride_dob + h64 * stride_doh + q_start * stride_don,
                stride_on, stride_don)
        o, do = _load_rows(pair, m0, offs_r, offs_d, q_len, mask_d, True, False, ROW64)
        tl.store(DELTA + b64 * stride_lb + h64 * stride_lh + q_start + m0 + offs_r,
                 tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=m0 + offs_r < q_len)

    @triton.jit
    def _dkdv_inner(dk, dv, k, v, bias_log2, qdo, lse_base, delta_base, offs_n, offs_d, mask_d,
                    start, end, seq, sc,
                    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
                    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, ROW64: tl.constexpr):
        # dK, dV of one key block over query blocks [start, end). Scores are computed
        # transposed, (BN, BM), so that dV += P^T dO and dK += dX^T Q are plain dots with no
        # transposed operand to materialise.
        q_len = seq[0]
        offs_m0 = tl.arange(0, BLOCK_M)
        for m0 in range(start, end, BLOCK_M):
            offs_m = m0 + offs_m0
            q, do = _load_rows(qdo, m0, offs_m0, offs_d, q_len, mask_d, MASKED, EVEN_D,
                               ROW64)                                               # (BM, D)
            if MASKED:
                row_mask = offs_m < q_len
                lse = tl.load(lse_base + offs_m, mask=row_mask, other=float("inf"))
                delta = tl.load(delta_base + offs_m, mask=row_mask, other=0.0)
            else:
                lse = tl.load(lse_base + offs_m)
                delta = tl.load(delta_base + offs_m)
            # Rows that saw no key have lse = -inf: use +inf so their P is 0, not NaN.
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            s_t, t_t = _scores(_mm(k, tl.trans(q), None, PRECISION), sc, HAS_SOFTCAP)
            if HAS_BIAS:
                s_t = s_t + bias_log2[:, None]
            if MASKED:
                vis = _visible(offs_m[None, :], offs_n[:, None], seq, HAS_LEFT, HAS_RIGHT)
                s_t = tl.where(vis, s_t, float("-inf"))
            p_t = tl.exp2(s_t - lse2[None, :])                                      # (BN, BM)
            dv = _mm(p_t.to(do.dtype), do, dv, PRECISION)
            dp_t = _mm(v, tl.trans(do), None, PRECISION)                            # (BN, BM)
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
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        kv = (K + b64 * stride_kb + hkv64 * stride_kh + k_start * stride_kn,
              V + b64 * stride_vb + hkv64 * stride_vh + k_start * stride_vn, stride_kn, stride_vn)
        k, v = _load_rows(kv, n0, offs_r, offs_d, k_len, mask_d, True, EVEN_D, ROW64)  # (BN, D)
        bias_log2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        if HAS_BIAS:
            bias_log2 = tl.load(BIAS + b64 * stride_bb + offs_n, mask=offs_n < k_len,
                                other=0.0) * 1.4426950408889634
        seq = (q_len, k_len, k_len - q_len, win_left, win_right)
        sc = (qk_scale, softcap_log2)
        spans = _query_blocks(n0, seq, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
        dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for g in range(0, group):
            h64 = hkv64 * group + g
            qdo = (Q + b64 * stride_qb + h64 * stride_qh + q_start * stride_qn,
                   DO + b64 * stride_dob + h64 * stride_doh + q_start * stride_don,
                   stride_qn, stride_don)
            lse_base = LSE + b64 * stride_lb + h64 * stride_lh + q_start
            delta_base = DELTA + b64 * stride_lb + h64 * stride_lh + q_start
            for phase in tl.static_range(3):
                start, end = spans[phase], spans[phase + 1]
                dk, dv = _dkdv_inner(dk, dv, k, v, bias_log2, qdo, lse_base, delta_base, offs_n,
                                     offs_d, mask_d, start, end, seq, sc, BLOCK_M, phase != 1,
                                     EVEN_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_BIAS,
                                     PRECISION, ROW64)
        dk = dk * sm_scale
        _store_rows(DK + b64 * stride_dkb + hkv64 * stride_dkh + k_start * stride_dkn, n0,
                    stride_dkn, offs_r, offs_d, k_len, mask_d, dk.to(DK.dtype.element_ty))
        _store_rows(DV + b64 * stride_dvb + hkv64 * stride_dvh + k_start * stride_dvn, n0,
                    stride_dvn, offs_r, offs_d, k_len, mask_d, dv.to(DV.dtype.element_ty))

    @triton.jit
    def _dq_inner(dq, q, do, lse2, delta, kv, bias_base, offs_m, offs_d, mask_d, start, end, seq,
                  sc, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
                  HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                  HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, ROW64: tl.constexpr):
        # dQ of one query block over key blocks [start, end).
        k_len = seq[1]
        offs_n0 = tl.arange(0, BLOCK_N)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + offs_n0
            k, v = _load_rows(kv, n0, offs_n0, offs_d, k_len, mask_d, MASKED, EVEN_D,
                              ROW64)                                                # (BN, D)
            s, t = _scores(_mm(q, tl.trans(k), None, PRECISION), sc, HAS_SOFTCAP)
            if HAS_BIAS:
                bias = tl.load(bias_base + offs_n, mask=offs_n < k_len, other=0.0)
                s = s + bias[None, :] * 1.4426950408889634
            if MASKED:
                vis = _visible(offs_m[:, None], offs_n[None, :], seq, HAS_LEFT, HAS_RIGHT)
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
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        row_mask = offs_m < q_len
        qdo = (Q + b64 * stride_qb + h64 * stride_qh + q_start * stride_qn,
               DO + b64 * stride_dob + h64 * stride_doh + q_start * stride_don,
               stride_qn, stride_don)
        q, do = _load_rows(qdo, m0, offs_r, offs_d, q_len, mask_d, True, EVEN_D, ROW64)
        lse = tl.load(LSE + b64 * stride_lb + h64 * stride_lh + q_start + offs_m, mask=row_mask,
                      other=float("inf"))
        delta = tl.load(DELTA + b64 * stride_lb + h64 * stride_lh + q_start + offs_m,
                        mask=row_mask, other=0.0)
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        kv = (K + b64 * stride_kb + hkv64 * stride_kh + k_start * stride_kn,
              V + b64 * stride_vb + hkv64 * stride_vh + k_start * stride_vn, stride_kn, stride_vn)
        seq = (q_len, k_len, k_len - q_len, win_left, win_right)
        sc = (qk_scale, softcap_log2)
        spans = _key_blocks(m0, seq, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
        dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for phase in tl.static_range(3):
            start, end = spans[phase], spans[phase + 1]
            dq = _dq_inner(dq, q, do, lse2, delta, kv, BIAS + b64 * stride_bb, offs_m, offs_d,
                           mask_d, start, end, seq, sc, BLOCK_N, phase != 1, EVEN_D, HAS_LEFT,
                           HAS_RIGHT, HAS_SOFTCAP, HAS_BIAS, PRECISION, ROW64)
        dq = dq * sm_scale
        _store_rows(DQ + b64 * stride_dqb + h64 * stride_dqh + q_start * stride_dqn, m0,
                    stride_dqn, offs_r, offs_d, q_len, mask_d, dq.to(DQ.dtype.element_ty))


KERNELS = {"fwd": "_fwd_kernel", "pre": "_bwd_preprocess_kernel", "dkdv": "_bwd_dkdv_kernel",
           "dq": "_bwd_dq_kernel"}
