"""Attention (issue 7): fused_lm's Triton flash attention against torch SDPA per backend (flash,
memory-efficient, cuDNN), FlexAttention and flash-attn, in TFLOP/s.

FLOPs per call (the convention of the flash-attention papers; masked-out work is not counted):

    forward   F = 4 * B * H * N * N * D        (q k^T and P v: 2 * N * N * D multiply-adds each)
              F / 2 when causal
    backward  2.5 * F                          (five N x N x D products instead of two)
    fwd+bwd   3.5 * F
    varlen    F = sum over sequences of 4 * H * L_i^2 * D (halved when causal)

H counts query heads (GQA 32/8 does the same FLOPs as MHA with 32 heads). Ceiling: the bf16
matmul TFLOP/s measured in the same run.

Sizes (GPU): bf16, B * N = 16k tokens, H * D = 2048 (hd64: 32 heads, hd128: 16 heads), N from
512 to 16384; forward and backward for every N, fwd+bwd at N = 4096; GQA 32 query / 8 kv heads
(hd128, N = 4096, causal); varlen with a realistic length mix (log-uniform 128..4096 tokens
packed into 16k). Issue 7's target (H100, bf16, hd128, causal, 4k-16k): forward >= 1.3x SDPA's
flash backend, backward >= 1.1x; "torch-sdpa-flash" is the reference provider for the speed-ups.

CPU (issue 12; quick=True, the CPU default): what a laptop or CPU-CI user gets without the
interpreter -- fused_lm's default CPU path (flash_attention, and the SDPA drop-in) side by side
with torch's own SDPA computing the same thing (is_causal, enable_gqa, causal_lower_right for
bottom-right causal with Nq != Nk, a boolean mask for windows, padding + mask for packed
sequences), fp32 and bf16, B=2 N=512 H=8 D=64. Target: >= 0.95x torch on each row. The Triton
interpreter is a correctness tool, not a CPU backend: the fused rows are skipped under it.
quick=True on a GPU: tiny sizes, a smoke run.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from bench.harness import Case, Provider, Skip, peer, rotating
from fused_lm import _backend


def _flops_fwd(batch: int, heads: int, n_q: int, n_k: int, head_dim: int, causal: bool) -> float:
    flops = 4.0 * batch * heads * n_q * n_k * head_dim
    return flops / 2 if causal else flops


_MULT = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def varlen_mix(total: int, lo: int, hi: int, seed: int = 0) -> list[int]:
    """Sequence lengths log-uniform in [lo, hi] (a pretraining-like mix of short and long
    documents), the last one trimmed so they sum to ``total``."""
    g = torch.Generator().manual_seed(seed)
    lengths, left = [], total
    while left > 0:
        n = int(math.exp(math.log(lo) + torch.rand((), generator=g).item() * math.log(hi / lo)))
        n = min(n, left)
        lengths.append(n)
        left -= n
    return lengths


# ------------------------------------------------------------------------------------------------
# Timed functions: each returns fn() for the op ("fwd" | "bwd" | "fwd+bwd") on a producer of
# (q, k, v) in (B, N, H, D) layout (rotated so that inputs come from DRAM).
# ------------------------------------------------------------------------------------------------

def _timed(op: str, forward: Callable, make: Callable, footprint: int, device) -> Callable[[], object]:
    def make_with_grad():
        q, k, v = make()
        return tuple(t.requires_grad_(op != "fwd") for t in (q, k, v))

    nxt = rotating(make_with_grad, footprint, device)
    if op == "fwd":
        def fn():
            with torch.no_grad():
                return forward(*nxt())
        return fn
    if op == "fwd+bwd":
        def fn():
            q, k, v = nxt()
            out = forward(q, k, v)
            return torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        return fn
    # backward only: one graph per input set, kept; each call runs backward through it again.
    graphs = {}

    def fn():
        q, k, v = nxt()
        key = id(q)
        if key not in graphs:
            out = forward(q, k, v)
            graphs[key] = (out, torch.randn_like(out))
        out, dout = graphs[key]
        return torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    # build the graphs untimed
    for _ in range(8):
        fn()
    return fn


def _fused(op, causal, make, footprint, device, varlen=None):
    def setup():
        if device.type == "cpu" and _backend.interpreter_on():
            raise Skip("the Triton interpreter is a correctness tool, not a CPU backend")
        from fused_lm.nn.functional import flash_attention

        if varlen is None:
            forward = lambda q, k, v: flash_attention(q, k, v, causal=causal)  # noqa: E731
        else:
            cu, max_len = varlen(device)
            forward = lambda q, k, v: flash_attention(  # noqa: E731
                q, k, v, causal=causal, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                max_seqlen_k=max_len)
        return _timed(op, forward, make, footprint, device)
    return setup


def _sdpa(op, causal, make, footprint, device, backend: str, gqa: bool):
    def setup():
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError:
            raise Skip("torch.nn.attention.sdpa_kernel needs torch >= 2.3") from None
        which = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "cudnn": "CUDNN_ATTENTION", "math": "MATH"}[backend]
        if not hasattr(SDPBackend, which):
            raise Skip(f"this torch has no SDPA {backend} backend")
        sdp = getattr(SDPBackend, which)
        kwargs = {"enable_gqa": True} if gqa else {}

        def forward(q, k, v):
            with sdpa_kernel(sdp):
                return torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                    **kwargs).transpose(1, 2)
        try:  # probe: SDPA raises when the chosen backend cannot take these inputs
            with torch.no_grad():
                q, k, v = make()
                forward(q[:1, :64], k[:1, :64], v[:1, :64])
        except RuntimeError as exc:
            raise Skip(f"SDPA {backend} backend unavailable here: {str(exc).splitlines()[0][:120]}") from None
        return _timed(op, forward, make, footprint, device)
    return setup


def _sdpa_padded(op, causal, lengths, heads, kv_heads, head_dim, dtype, device):
    """The usual alternative to packing: pad every sequence to the longest, mask the padding."""
    def setup():
        batch, longest = len(lengths), max(lengths)
        keep = torch.zeros(batch, longest, dtype=torch.bool, device=device)
        for i, n in enumerate(lengths):
            keep[i, :n] = True
        mask = keep[:, None, None, :]
        if causal:
            mask = mask & torch.ones(longest, longest, dtype=torch.bool, device=device).tril()
        kwargs = {"enable_gqa": True} if heads != kv_heads else {}

        def make():
            q = torch.randn(batch, longest, heads, head_dim, device=device, dtype=dtype)
            k = torch.randn(batch, longest, kv_heads, head_dim, device=device, dtype=dtype)
            return q, k, torch.randn_like(k)

        def forward(q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                **kwargs).transpose(1, 2)
        footprint = 4 * batch * longest * heads * head_dim * dtype.itemsize
        return _timed(op, forward, make, footprint, device)
    return setup


def _flex(op, causal, make, footprint, device, gqa: bool, varlen=None):
    def setup():
        if device.type != "cuda":
            raise Skip("FlexAttention is compiled for GPUs here")
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError:
            raise Skip("torch has no FlexAttention (torch >= 2.5)") from None
        q, k, v = make()
        n_q, n_k = q.shape[1], k.shape[1]
        if varlen is not None:
            cu, _ = varlen(device)
            doc = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=device),
                                          (cu[1:] - cu[:-1]).long())
            n_q = n_k = q.shape[0]

            def mask_mod(b, h, qi, kj):
                same = doc[qi] == doc[kj]
                return same & (kj <= qi) if causal else same
        elif causal:
            def mask_mod(b, h, qi, kj):
                return kj <= qi
        else:
            mask_mod = None
        block_mask = None if mask_mod is None else create_block_mask(
            mask_mod, None, None, n_q, n_k, device=device)
        compiled = torch.compile(flex_attention)
        kwargs = {"enable_gqa": True} if gqa else {}

        def forward(q, k, v):
            if varlen is not None:
                q, k, v = q[None], k[None], v[None]
            out = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                           block_mask=block_mask, **kwargs).transpose(1, 2)
            return out[0] if varlen is not None else out
        return _timed(op, forward, make, footprint, device)
    return setup


def _flash_attn(op, causal, make, footprint, device, varlen=None):
    def setup():
        fa = peer("flash_attn", "flash-attn")
        if varlen is None:
            forward = lambda q, k, v: fa.flash_attn_func(q, k, v, causal=causal)  # noqa: E731
        else:
            cu, max_len = varlen(device)
            forward = lambda q, k, v: fa.flash_attn_varlen_func(  # noqa: E731
                q, k, v, cu, cu, max_len, max_len, causal=causal)
        return _timed(op, forward, make, footprint, device)
    return setup


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------

def _maker(shape_q, shape_kv, dtype, device):
    def make():
        q = torch.randn(*shape_q, device=device, dtype=dtype)
        k = torch.randn(*shape_kv, device=device, dtype=dtype)
        return q, k, torch.randn_like(k)
    return make


def _dense_case(device, dtype, batch, n, heads, kv_heads, head_dim, causal, op, quick):
    make = _maker((batch, n, heads, head_dim), (batch, n, kv_heads, head_dim), dtype, device)
    footprint = 2 * (batch * n * heads * head_dim + 2 * batch * n * kv_heads * head_dim) * dtype.itemsize
    gqa = heads != kv_heads
    args = (op, causal, make, footprint, device)
    providers = [Provider("fused_lm", _fused(*args))]
    if quick:
        providers.append(Provider("torch-sdpa-math", _sdpa(*args, "math", gqa), reference=True))
    else:
        providers += [Provider("torch-sdpa-flash", _sdpa(*args, "flash", gqa), reference=True),
                      Provider("torch-sdpa-efficient", _sdpa(*args, "efficient", gqa)),
                      Provider("torch-sdpa-cudnn", _sdpa(*args, "cudnn", gqa)),
                      Provider("flex-attention", _flex(*args, gqa)),
                      Provider("flash-attn", _flash_attn(*args))]
    flops = _flops_fwd(batch, heads, n, n, head_dim, causal) * _MULT[op]
    label = f"B={batch} N={n} H={heads}" + (f"/{kv_heads}" if gqa else "") + f" D={head_dim}"
    dname = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    return Case("attention", f"attn-{'causal' if causal else 'full'}-{op}", label, dname,
                providers, flops=flops, ceiling="matmul")


def _varlen_case(device, dtype, lengths, heads, kv_heads, head_dim, causal, op):
    total = sum(lengths)
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)

    def varlen(dev):
        return torch.tensor(offsets, dtype=torch.int32, device=dev), max(lengths)

    make = _maker((total, heads, head_dim), (total, kv_heads, head_dim), dtype, device)
    footprint = 2 * total * (heads + 2 * kv_heads) * head_dim * dtype.itemsize
    args = (op, causal, make, footprint, device)
    gqa = heads != kv_heads
    providers = [Provider("fused_lm", _fused(*args, varlen=varlen)),
                 Provider("torch-sdpa-padded", _sdpa_padded(op, causal, lengths, heads, kv_heads,
                                                            head_dim, dtype, device), reference=True),
                 Provider("flex-attention", _flex(*args, gqa, varlen=varlen)),
                 Provider("flash-attn", _flash_attn(*args, varlen=varlen))]
    flops = sum(_flops_fwd(1, heads, n, n, head_dim, causal) for n in lengths) * _MULT[op]
    dname = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    return Case("attention", f"varlen-{'causal' if causal else 'full'}-{op}",
                f"{len(lengths)} seqs, {total} tokens (max {max(lengths)}) H={heads}/{kv_heads} "
                f"D={head_dim}", dname, providers, flops=flops, ceiling="matmul")


# ------------------------------------------------------------------------------------------------
# CPU rows: the default CPU path against torch's SDPA doing the same math
# ------------------------------------------------------------------------------------------------

def _plain(op, forward, make, footprint, device, skip_interpreted=False):
    def setup():
        if skip_interpreted and device.type == "cpu" and _backend.interpreter_on():
            raise Skip("the Triton interpreter is a correctness tool, not a CPU backend")
        return _timed(op, forward, make, footprint, device)
    return setup


def _bhnd(fn):
    """Calls an SDPA-layout function on (B, N, H, D) tensors."""
    return lambda q, k, v: fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _cpu_case(device, dtype, name, n_q, n_k, heads, kv_heads, op, *, causal=False, window=None,
              batch=2, head_dim=64):
    """flash_attention (and, where the semantics are SDPA's, the SDPA drop-in) against torch
    SDPA expressing the same visibility."""
    from fused_lm.nn import functional as fnn
    from fused_lm.reference.attention import visibility

    F = torch.nn.functional
    make = _maker((batch, n_q, heads, head_dim), (batch, n_k, kv_heads, head_dim), dtype, device)
    footprint = 2 * batch * (n_q * heads + 2 * n_k * kv_heads) * head_dim * dtype.itemsize
    gqa = {"enable_gqa": True} if heads != kv_heads else {}
    args = (op, make, footprint, device)
    fused = lambda q, k, v: fnn.flash_attention(q, k, v, causal=causal, window=window)  # noqa: E731
    providers = [Provider("fused_lm", _plain(op, fused, *args[1:], skip_interpreted=True))]
    square_causal = causal and window is None and n_q == n_k
    if window is None and (not causal or square_causal):
        sdpa = _bhnd(lambda q, k, v: fnn.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                       **gqa))
        providers.append(Provider("fused_lm-sdpa", _plain(op, sdpa, *args[1:],
                                                          skip_interpreted=True)))
    if window is not None:
        mask = visibility(n_q, n_k, causal=causal, window=window, device=device)
        torch_fn = _bhnd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                         **gqa))
        ref_name = "torch-sdpa-mask"
    elif causal and n_q != n_k:
        from torch.nn.attention.bias import causal_lower_right

        bias = causal_lower_right(n_q, n_k)
        torch_fn = _bhnd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                                                         **gqa))
        ref_name = "torch-sdpa-lower-right"
    else:
        torch_fn = _bhnd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                         **gqa))
        ref_name = "torch-sdpa"
    providers.append(Provider(ref_name, _plain(op, torch_fn, *args[1:]), reference=True))
    flops = 4.0 * batch * heads * n_q * n_k * head_dim * (0.5 if causal else 1.0) * _MULT[op]
    label = f"B={batch} N={n_q}" + (f"/{n_k}" if n_k != n_q else "") + f" H={heads}" + \
        (f"/{kv_heads}" if kv_heads != heads else "") + f" D={head_dim}"
    dname = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    return Case("attention", f"cpu-{name}-{op}", label, dname, providers, flops=flops,
                ceiling="matmul")


def _cpu_cases(device) -> list[Case]:
    f32, bf16 = torch.float32, torch.bfloat16
    out = []
    for op in ("fwd", "fwd+bwd"):
        out.append(_cpu_case(device, f32, "causal", 512, 512, 8, 8, op, causal=True))
    out.append(_cpu_case(device, f32, "full", 512, 512, 8, 8, "fwd+bwd"))
    out.append(_cpu_case(device, f32, "gqa-causal", 512, 512, 8, 2, "fwd+bwd", causal=True))
    out.append(_cpu_case(device, f32, "causal-br", 256, 512, 8, 8, "fwd+bwd", causal=True))
    out.append(_cpu_case(device, f32, "window", 512, 512, 8, 8, "fwd+bwd", causal=True,
                         window=(128, 0)))
    out.append(_cpu_case(device, bf16, "causal", 512, 512, 8, 8, "fwd+bwd", causal=True))
    out.append(_varlen_case(device, f32, [100, 300, 512, 60], 8, 8, 64, True, "fwd+bwd"))
    return out


def cases(device: torch.device, quick: bool) -> list[Case]:
    out: list[Case] = []
    if quick and device.type == "cpu":
        return _cpu_cases(device)
    if quick:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        for n in (64, 128):
            for causal in (False, True):
                for op in ("fwd", "bwd"):
                    out.append(_dense_case(device, dtype, 1, n, 2, 2, 32, causal, op, quick))
        out.append(_dense_case(device, dtype, 1, 128, 4, 2, 32, True, "fwd+bwd", quick))
        out.append(_varlen_case(device, dtype, [40, 17, 100], 2, 2, 32, True, "fwd"))
        return out
    dtype, tokens, width = torch.bfloat16, 16384, 2048
    for head_dim, lengths in ((128, (512, 1024, 2048, 4096, 8192, 16384)), (64, (1024, 4096, 16384))):
        heads = width // head_dim
        for n in lengths:
            for causal in (True, False):
                ops = ("fwd", "bwd", "fwd+bwd") if n == 4096 else ("fwd", "bwd")
                for op in ops:
                    out.append(_dense_case(device, dtype, tokens // n, n, heads, heads, head_dim,
                                           causal, op, quick))
    for op in ("fwd", "bwd"):
        out.append(_dense_case(device, dtype, 4, 4096, 32, 8, 128, True, op, quick))
    mix = varlen_mix(tokens, 128, 4096)
    for op in ("fwd", "bwd"):
        out.append(_varlen_case(device, dtype, mix, 16, 16, 128, True, op))
    return out


__all__ = ["cases", "varlen_mix"]
