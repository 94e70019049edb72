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
grid (see kernels._locate), online softmax in base 2 (s is pre-multiplied by log2(e)), fp32
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
(see kernels._mm; the interpreter emulates TF32 by rounding the operands).

Files: kernels.py (the Triton kernels), launch.py (Problem: each kernel's arguments, constexprs,
block configurations per Triton version and grid; the launcher), op.py (validation, the
torch.library custom ops, ``attention``).

Work without a GPU: the same kernels run under the Triton interpreter on CPU tensors (tests).
No libdevice: tanh is fused_lm/ops/_tl_math.py's, from core tl operations.
"""

from fused_lm.ops.attention.launch import (KINDS, MAX_HEAD_DIM, MIN_HEAD_DIM, OP_PARAMS,
                                           PRECISIONS, Config, Problem, block_d, config_meta,
                                           default_precision, launch_configs, triton_version)
from fused_lm.ops.attention.op import (KERNEL_DTYPES, SPEC, Call, attention, checked_mode,
                                       validate)

__all__ = ["KINDS", "MAX_HEAD_DIM", "MIN_HEAD_DIM", "OP_PARAMS", "PRECISIONS", "KERNEL_DTYPES", "SPEC",
           "Config", "Problem", "Call", "attention", "block_d", "checked_mode", "config_meta",
           "default_precision", "launch_configs", "triton_version", "validate"]
