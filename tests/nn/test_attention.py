"""Flash attention (issue 7): forward and backward against the float64 reference, varlen against
the per-sequence loop, GQA, windows, softcap, determinism, the SDPA and MultiheadAttention
drop-ins against torch's, torch.compile tracing and input errors.

CPU runs go through the Triton interpreter with small shapes (N <= ~130, D in {16, 32, 64});
the `gpu` tests repeat the checks at realistic sizes on CUDA.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from fused_lm.reference import attention as ref
from tests._helpers import HAS_CUDA, assert_close, poison_allocations, randn, triton_devices

pytestmark = pytest.mark.skipif(not triton_devices(), reason="needs CUDA or the Triton interpreter")

DEVICE = "cuda" if HAS_CUDA else "cpu"


def _tol_dtype(dtype: torch.dtype, precision: Optional[str] = None) -> torch.dtype:
    """The tolerance row for inputs of ``dtype`` at fp32 product ``precision`` (None: what the
    kernel resolves, torch's matmul setting): TF32 rounds operands to 10 explicit mantissa bits,
    fp16's, so fp32 inputs get fp16's tolerance then, on a GPU and under the interpreter alike
    (it rounds the operands the same way)."""
    from fused_lm.ops.attention import default_precision

    if dtype == torch.float32 and (precision or default_precision()) == "tf32":
        return torch.float16
    return dtype


def _inputs(shape_q, shape_kv, dtype, device=DEVICE):
    q = randn(*shape_q, dtype=dtype, device=device).requires_grad_()
    k = randn(*shape_kv, dtype=dtype, device=device).requires_grad_()
    v = randn(*shape_kv, dtype=dtype, device=device).requires_grad_()
    return q, k, v


def _check_against_reference(q, k, v, grad_scale=2.0, out_scale=1.0, **kw):
    """Runs flash_attention and the float64 reference, compares out, lse, dq, dk, dv."""
    from fused_lm.nn.functional import flash_attention

    out, lse = flash_attention(q, k, v, return_lse=True, **kw)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    kw64 = {key: val for key, val in kw.items()
            if not key.startswith("max_seqlen") and key != "input_precision"}
    out64, lse64 = ref.attention(q64, k64, v64, return_lse=True, **kw64)
    dq64, dk64, dv64 = torch.autograd.grad(out64, (q64, k64, v64), dout.double())
    td = _tol_dtype(q.dtype, kw.get("input_precision"))
    assert_close(out, out64, td, scale=out_scale, what="out")
    assert_close(lse, lse64, torch.float32 if td == torch.float32 else td, scale=out_scale,
                 what="lse")
    assert_close(dq, dq64, td, scale=grad_scale, what="dq")
    assert_close(dk, dk64, td, scale=grad_scale, what="dk")
    assert_close(dv, dv64, td, scale=grad_scale, what="dv")
    return out, (dq, dk, dv)


# (B, Nq, Nk, Hq, Hkv, D, options, dtype): odd lengths, Nq != Nk both ways, padded head dims.
CASES = [
    (2, 64, 64, 2, 2, 32, {}, torch.float32),
    (1, 67, 67, 2, 2, 16, {"causal": True}, torch.float16),
    (1, 45, 130, 2, 2, 64, {"causal": True}, torch.bfloat16),
    (1, 130, 45, 2, 2, 32, {"causal": True}, torch.float32),        # rows that see no key
    (1, 100, 77, 2, 2, 24, {}, torch.float32),                      # D padded to 32
    (1, 1, 1, 1, 1, 16, {}, torch.float32),                         # single element
    (1, 1, 50, 2, 1, 16, {"causal": True}, torch.float16),          # decode-like
    (1, 40, 40, 1, 1, 8, {"causal": True}, torch.float32),          # smallest head dim
    (1, 20, 33, 1, 1, 256, {}, torch.bfloat16),                     # largest head dim
    (1, 50, 50, 2, 2, 32, {"scale": 0.3}, torch.float16),
]


@pytest.mark.parametrize("b,nq,nk,hq,hkv,d,opts,dtype", CASES,
                         ids=[f"{c[1]}x{c[2]}-h{c[3]}/{c[4]}-d{c[5]}-{'-'.join(c[6]) or 'full'}-"
                              f"{str(c[7])[6:]}" for c in CASES])
def test_forward_backward(b, nq, nk, hq, hkv, d, opts, dtype):
    q, k, v = _inputs((b, nq, hq, d), (b, nk, hkv, d), dtype)
    _check_against_reference(q, k, v, **opts)


@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_gqa_ratios(group):
    q, k, v = _inputs((1, 70, 8, 16), (1, 70, 8 // group, 16), torch.float16)
    _check_against_reference(q, k, v, causal=True)


@pytest.mark.parametrize("window,causal", [((16, 8), False), ((20, -1), True), ((-1, 10), False),
                                           ((0, 0), False), ((5, 3), True)])
def test_sliding_window(window, causal):
    q, k, v = _inputs((1, 100, 2, 32), (1, 90, 1, 32), torch.float32)
    _check_against_reference(q, k, v, window=window, causal=causal)


@pytest.mark.parametrize("dtype,causal", [(torch.float32, False), (torch.bfloat16, True)])
def test_softcap(dtype, causal):
    q, k, v = _inputs((1, 90, 2, 32), (1, 90, 2, 32), dtype)
    q.data.mul_(3.0)        # large scores so that the cap bends them
    _check_against_reference(q, k, v, softcap=2.0, causal=causal)


def _packed(lengths_q, lengths_k, hq, hkv, d, dtype):
    cu_q = torch.tensor([0] + lengths_q, device=DEVICE).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lengths_k, device=DEVICE).cumsum(0).to(torch.int32)
    q, k, v = _inputs((sum(lengths_q), hq, d), (sum(lengths_k), hkv, d), dtype)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("opts", [{"causal": True}, {"window": (12, 0)}, {}],
                         ids=["causal", "window", "full"])
def test_varlen_against_per_sequence_loop(opts):
    """Packed sequences (one empty, Nq != Nk per sequence) against the reference's per-sequence
    loop, and against the kernel run on each sequence alone."""
    from fused_lm.nn.functional import flash_attention

    lens_q, lens_k = [17, 0, 63, 51], [20, 0, 63, 40]
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k, 4, 2, 32, torch.float16)
    out, _ = _check_against_reference(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                      max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k), **opts)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for s in range(len(lens_q)):
        if lens_q[s] == 0:
            continue
        alone = flash_attention(q[None, cq[s]:cq[s + 1]], k[None, ck[s]:ck[s + 1]],
                                v[None, ck[s]:ck[s + 1]], **opts)[0]
        torch.testing.assert_close(out[cq[s]:cq[s + 1]], alone, rtol=0, atol=0)


def test_varlen_max_seqlen_computed_and_lse_layout():
    from fused_lm.nn.functional import flash_attention

    q, k, v, cu_q, cu_k = _packed([5, 33], [5, 33], 2, 2, 16, torch.float32)
    out, lse = flash_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True,
                               return_lse=True)
    assert lse.shape == (2, q.shape[0]) and lse.dtype == torch.float32
    expected = ref.attention(q.double(), k.double(), v.double(), cu_seqlens_q=cu_q,
                             cu_seqlens_k=cu_k, causal=True)
    assert_close(out, expected, torch.float32)


def test_deterministic_backward_is_bitwise_reproducible():
    from fused_lm.nn.functional import flash_attention

    q, k, v = _inputs((1, 70, 4, 32), (1, 70, 2, 32), torch.bfloat16)
    dout = torch.randn(1, 70, 4, 32, dtype=torch.bfloat16, device=DEVICE)
    grads = []
    for _ in range(2):
        out = flash_attention(q, k, v, causal=True, deterministic=True)
        grads.append(torch.autograd.grad(out, (q, k, v), dout))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_every_output_element_written():
    from fused_lm.nn.functional import flash_attention

    q, k, v = _inputs((1, 37, 2, 16), (1, 5, 1, 16), torch.float32)
    with poison_allocations():
        out, lse = flash_attention(q, k, v, causal=True, return_lse=True)
        grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.isneginf(lse[0, :, :32]).all()          # 32 rows see no key (bottom-right)
    assert (out[0, :32] == 0).all()
    for g in grads:
        assert not g.isnan().any()


def test_empty_inputs():
    from fused_lm.nn.functional import flash_attention

    q, k, v = _inputs((0, 10, 2, 16), (0, 10, 2, 16), torch.float32)
    out = flash_attention(q, k, v)
    assert out.shape == q.shape
    q, k, v = _inputs((1, 0, 2, 16), (1, 7, 2, 16), torch.float32)
    out = flash_attention(q, k, v)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert out.shape == q.shape and (dk == 0).all() and (dv == 0).all()


def test_torch_backend_matches(monkeypatch):
    from fused_lm.nn.functional import flash_attention

    q, k, v = _inputs((1, 30, 2, 16), (1, 30, 1, 16), torch.float32)
    fused = flash_attention(q, k, v, causal=True, window=(7, 0), softcap=5.0)
    monkeypatch.setenv("FUSED_LM_BACKEND", "torch")
    eager = flash_attention(q, k, v, causal=True, window=(7, 0), softcap=5.0)
    assert_close(fused, eager.double(), torch.float32)


# ------------------------------------------------------------------------------------------------
# scaled_dot_product_attention against torch's
# ------------------------------------------------------------------------------------------------

def _grads(fn, *tensors):
    out = fn(*tensors)
    dout = torch.ones_like(out) + torch.arange(out.numel(), device=out.device).reshape(out.shape) % 3
    return (out, *torch.autograd.grad(out, tensors, dout.to(out.dtype)))


def _compare_sdpa(q, k, v, **kw):
    from fused_lm.nn.functional import scaled_dot_product_attention

    ours = _grads(lambda *t: scaled_dot_product_attention(*t, **kw), q, k, v)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    kw64 = dict(kw)
    if kw64.get("attn_mask") is not None and kw64["attn_mask"].is_floating_point():
        kw64["attn_mask"] = kw64["attn_mask"].double()
    theirs = _grads(lambda *t: F.scaled_dot_product_attention(*t, **kw64), q64, k64, v64)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, theirs):
        assert_close(a, b, _tol_dtype(q.dtype), scale=2.0, what=name)


@pytest.mark.parametrize("nq,nk,causal", [(37, 37, True), (30, 45, True), (45, 30, False)])
def test_sdpa_matches_torch(nq, nk, causal):
    q, k, v = _inputs((2, 2, nq, 16), (2, 2, nk, 16), torch.float32)
    _compare_sdpa(q, k, v, is_causal=causal)       # torch aligns is_causal top-left


@pytest.mark.parametrize("kind", ["bool", "additive", "2d-broadcast"])
def test_sdpa_key_padding_mask_in_kernel(kind):
    q, k, v = _inputs((2, 2, 33, 16), (2, 2, 41, 16), torch.float32)
    keep = torch.rand(2, 41, device=DEVICE) > 0.3
    keep[:, 0] = True
    if kind == "bool":
        mask = keep[:, None, None, :]
    elif kind == "additive":
        mask = torch.zeros(2, 1, 1, 41, device=DEVICE).masked_fill(~keep[:, None, None], float("-inf"))
        mask = mask + torch.randn(2, 1, 1, 41, device=DEVICE) * keep[:, None, None]
    else:
        mask = keep[:1]                                  # (1, Nk): same for every batch row
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # no fallback warning: the kernel ran
        _compare_sdpa(q, k, v, attn_mask=mask)


def test_sdpa_gqa_and_3d():
    q, k, v = _inputs((1, 4, 29, 32), (1, 2, 29, 32), torch.float16)
    _compare_sdpa(q, k, v, is_causal=True, enable_gqa=True)
    q, k, v = _inputs((3, 29, 16), (3, 20, 16), torch.float32)
    _compare_sdpa(q, k, v)


def test_sdpa_fallback_warns_once():
    from fused_lm.nn import _functional_attention as fa
    from fused_lm.nn.functional import scaled_dot_product_attention

    q, k, v = _inputs((1, 2, 9, 16), (1, 2, 11, 16), torch.float32)
    general = torch.rand(9, 11, device=DEVICE) > 0.2
    general[:, 0] = True
    fa._warned.clear()
    with pytest.warns(UserWarning, match="not a key-padding mask"):
        out = scaled_dot_product_attention(q, k, v, attn_mask=general)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=general))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaled_dot_product_attention(q, k, v, attn_mask=general)      # once only
    with pytest.warns(UserWarning, match="dropout_p"):
        scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    q, k, v = _inputs((1, 2, 9, 264), (1, 2, 11, 264), torch.float32)
    with pytest.warns(UserWarning, match="head dim 264"):
        out = scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    q, k, v = _inputs((1, 2, 9, 12), (1, 2, 11, 12), torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # head dim 12 runs in the kernel now
        _compare_sdpa(q, k, v)


# ------------------------------------------------------------------------------------------------
# MultiheadAttention against torch's
# ------------------------------------------------------------------------------------------------

def _mha_pair(embed, heads, **kw):
    from fused_lm.nn import MultiheadAttention

    theirs = torch.nn.MultiheadAttention(embed, heads, **kw, device=DEVICE, dtype=torch.float64)
    ours = MultiheadAttention(embed, heads, **kw, device=DEVICE)
    ours.load_state_dict({k: v.float() for k, v in theirs.state_dict().items()})
    return ours, theirs


@pytest.mark.parametrize("case", ["self", "self-causal", "cross-kdim", "padding", "bias-kv-zero-attn",
                                  "seq-first", "unbatched"])
def test_mha_matches_torch(case):
    embed, heads = 32, 4
    kw = {"batch_first": case != "seq-first"}
    if case == "cross-kdim":
        kw.update(kdim=24, vdim=40)
    if case == "bias-kv-zero-attn":
        kw.update(add_bias_kv=True, add_zero_attn=True)
    ours, theirs = _mha_pair(embed, heads, **kw)
    x = randn(2, 21, embed, device=DEVICE).requires_grad_()
    key = randn(2, 17, kw.get("kdim", embed), device=DEVICE)
    value = randn(2, 17, kw.get("vdim", embed), device=DEVICE)
    args_ours, args_theirs = {}, {"need_weights": False}
    if case == "cross-kdim":
        inputs = (x, key, value)
    elif case == "seq-first":
        inputs = (x.transpose(0, 1),) * 3
    elif case == "unbatched":
        inputs = (x[0],) * 3
    else:
        inputs = (x, x, x)
    if case == "self-causal":
        args_ours["is_causal"] = True
        args_theirs.update(is_causal=True, attn_mask=torch.nn.Transformer.generate_square_subsequent_mask(
            21, device=DEVICE, dtype=torch.float64))
    if case in ("padding", "bias-kv-zero-attn"):
        pad = torch.rand(2, 21, device=DEVICE) > 0.7
        pad[:, 0] = False
        args_ours["key_padding_mask"] = args_theirs["key_padding_mask"] = pad
    out, weights = ours(*inputs, **args_ours)
    assert weights is None
    expected, _ = theirs(*(t.double() for t in inputs), **args_theirs)
    assert_close(out, expected, torch.float32, scale=3.0)
    (dx,) = torch.autograd.grad(out.sum(), x)
    x64 = x.detach().double().requires_grad_()
    inputs64 = {"cross-kdim": (x64, key.double(), value.double()), "seq-first": (x64.transpose(0, 1),) * 3,
                "unbatched": (x64[0],) * 3}.get(case, (x64, x64, x64))
    (dx64,) = torch.autograd.grad(theirs(*inputs64, **args_theirs)[0].sum(), x64)
    assert_close(dx, dx64, torch.float32, scale=3.0)


def test_mha_gqa_equals_expanded_torch_module():
    """num_kv_heads=2 of 8 equals torch's module with the K/V projections repeated per group."""
    from fused_lm.nn import MultiheadAttention

    embed, heads, kv_heads = 64, 8, 2
    ours = MultiheadAttention(embed, heads, num_kv_heads=kv_heads, device=DEVICE)
    sd = ours.state_dict()
    assert sd["k_proj_weight"].shape == (16, 64) and sd["in_proj_bias"].shape == (64 + 2 * 16,)
    with torch.no_grad():
        ours.in_proj_bias.normal_()
    group, hd = heads // kv_heads, embed // heads
    expand = lambda w: w.reshape(kv_heads, hd, -1).repeat_interleave(group, 0).reshape(embed, -1)  # noqa: E731
    b_q, b_k, b_v = ours.in_proj_bias.detach().split([embed, 16, 16])
    theirs = torch.nn.MultiheadAttention(embed, heads, batch_first=True, device=DEVICE, dtype=torch.float64)
    theirs.load_state_dict({
        "in_proj_weight": torch.cat([ours.q_proj_weight, expand(ours.k_proj_weight),
                                     expand(ours.v_proj_weight)]).double(),
        "in_proj_bias": torch.cat([b_q, expand(b_k[:, None])[:, 0], expand(b_v[:, None])[:, 0]]).double(),
        "out_proj.weight": ours.out_proj.weight.double(), "out_proj.bias": ours.out_proj.bias.double()})
    x = randn(2, 19, embed, device=DEVICE)
    out, _ = ours(x, x, x, is_causal=True)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(19, device=DEVICE, dtype=torch.float64)
    expected, _ = theirs(x.double(), x.double(), x.double(), need_weights=False, attn_mask=mask,
                         is_causal=True)
    assert_close(out, expected, torch.float32, scale=3.0)


def test_mha_need_weights_and_general_mask():
    from fused_lm.nn import MultiheadAttention
    from fused_lm.nn import _functional_attention as fa

    mha = MultiheadAttention(16, 2, device=DEVICE)
    x = randn(1, 5, 16, device=DEVICE)
    with pytest.raises(ValueError, match="torch.nn.MultiheadAttention"):
        mha(x, x, x, need_weights=True)
    ours, theirs = _mha_pair(16, 2, batch_first=True)
    mask = torch.rand(5, 5, device=DEVICE) > 0.6
    mask.fill_diagonal_(False)
    fa._warned.clear()
    with pytest.warns(UserWarning, match="not a key-padding mask"):
        out, _ = ours(x, x, x, attn_mask=mask)
    expected, _ = theirs(x.double(), x.double(), x.double(), attn_mask=mask, need_weights=False)
    assert_close(out, expected, torch.float32, scale=3.0)


# ------------------------------------------------------------------------------------------------
# torch.compile and errors
# ------------------------------------------------------------------------------------------------

def test_torch_compile_fullgraph_traces_forward_and_backward():
    from fused_lm.nn.functional import flash_attention

    q, k, v = _inputs((1, 20, 2, 16), (1, 20, 1, 16), torch.float32)

    def step(q, k, v):
        return flash_attention(q, k, v, causal=True, softcap=10.0).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    eager_grads = torch.autograd.grad(step(q, k, v), (q, k, v))
    torch.testing.assert_close(loss, step(q, k, v))
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_bad_inputs_raise_clear_errors(monkeypatch):
    from fused_lm.nn.functional import flash_attention

    monkeypatch.setenv("FUSED_LM_CHECK", "1")     # cu_seqlens values are read on CUDA only then

    q, k, v = _inputs((1, 8, 2, 16), (1, 8, 2, 16), torch.float32)
    with pytest.raises(TypeError, match="share a dtype"):
        flash_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="one device"):
        flash_attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match=r"head dim must be in \[1, 256\], got 264"):
        flash_attention(*_inputs((1, 2, 1, 264), (1, 2, 1, 264), torch.float32))
    with pytest.raises(ValueError, match=r"head dim must be in \[1, 256\], got 0"):
        flash_attention(*_inputs((1, 2, 1, 0), (1, 2, 1, 0), torch.float32))
    with pytest.raises(ValueError, match="input_precision must be one of ieee, tf32, tf32x3"):
        flash_attention(q, k, v, input_precision="bf16")
    with pytest.raises(ValueError, match="token stride"):
        big = torch.empty(2**23 * 8 + 16, device=DEVICE).as_strided((1, 8, 1, 16), (0, 2**23, 16, 1))
        flash_attention(big, big, big)
    with pytest.raises(ValueError, match="4-D"):
        flash_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        flash_attention(*_inputs((1, 8, 3, 16), (1, 8, 2, 16), torch.float32))
    with pytest.raises(ValueError, match="head dim"):
        flash_attention(q, k, v[..., :8])
    with pytest.raises(ValueError, match="window"):
        flash_attention(q, k, v, window=(-2, 0))
    qp, kp, vp = q[0], k[0], v[0]                                       # (8, 2, 16) packed
    good = torch.tensor([0, 3, 8], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="non-decreasing"):
        flash_attention(qp, kp, vp, cu_seqlens_q=torch.tensor([0, 5, 3, 8], dtype=torch.int32,
                                                              device=DEVICE), cu_seqlens_k=good)
    with pytest.raises(ValueError, match="token count"):
        flash_attention(qp, kp, vp, cu_seqlens_q=torch.tensor([0, 3, 7], dtype=torch.int32,
                                                              device=DEVICE), cu_seqlens_k=good)
    with pytest.raises(ValueError, match="both cu_seqlens"):
        flash_attention(qp, kp, vp, cu_seqlens_q=good)
    with pytest.raises(TypeError, match="int32"):
        flash_attention(qp, kp, vp, cu_seqlens_q=good.float(), cu_seqlens_k=good)
    with pytest.raises(ValueError, match="longest sequence"):
        flash_attention(qp, kp, vp, cu_seqlens_q=good, cu_seqlens_k=good, max_seqlen_q=4,
                        max_seqlen_k=5)
    with pytest.raises(TypeError, match="dtype"):
        from fused_lm.ops.attention import attention
        attention(q.double(), k.double(), v.double())


# ------------------------------------------------------------------------------------------------
# Any head dim (issue 12), softcap precision (issue 12), fp32 product precision (issue 11),
# launch limits and 64-bit offsets (issue 11)
# ------------------------------------------------------------------------------------------------

HEAD_DIMS = [1, 3, 59, 100, 129, 200, 255, 256]


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_any_head_dim_gqa_causal(d):
    """Head dims padded to a power of two inside the kernel (masked loads and stores on the head
    dim; 256 takes the unmasked EVEN_D path): forward and backward for q, k, v, with GQA and
    bottom-right causal, Nq != Nk, every kernel dtype in turn."""
    dtype = (torch.float32, torch.float16, torch.bfloat16)[HEAD_DIMS.index(d) % 3]
    q, k, v = _inputs((1, 37, 4, d), (1, 45, 2, d), dtype)
    _check_against_reference(q, k, v, causal=True)


@pytest.mark.parametrize("d", [3, 100, 255])
def test_any_head_dim_varlen(d):
    q, k, v, cu_q, cu_k = _packed([9, 0, 40], [12, 0, 33], 4, 2, d, torch.float16)
    _check_against_reference(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True,
                             max_seqlen_q=40, max_seqlen_k=33)


def test_odd_head_dim_writes_every_element_and_nothing_else():
    """D = 59 in an SDPA layout view ((B, H, N, D) transposed, row stride H * D): every output
    and gradient element written (NaN-poisoned allocations), and the masked head-dim stores
    leave the neighbouring columns of a wider buffer untouched."""
    from fused_lm.nn.functional import flash_attention

    wide = torch.full((1, 33, 2, 64), 7.0, device=DEVICE)
    q = wide[..., :59]
    q.copy_(randn(1, 33, 2, 59, device=DEVICE))
    q.requires_grad_()
    k, v = (randn(1, 21, 1, 59, device=DEVICE).requires_grad_() for _ in range(2))
    with poison_allocations():
        out = flash_attention(q, k, v, causal=True)
        grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert not out[:, 12:].isnan().any() and (out[:, :12] == 0).all()    # 12 rows see no key
    for g in grads:
        assert not g.isnan().any()
    assert (wide[..., 59:] == 7.0).all()


def test_softcap_fp32_matches_float64_tightly():
    """fp32 softcap at Gemma's cap (30): the scaled scores are small (|u| = |s| / 30 ~ 0.03),
    where 2 sigmoid(2u) - 1 loses relative accuracy (it measured out 1.0e-6, grads 1.2e-6
    here); _tl_math.tanh keeps out/lse within 4e-7 and grads within 6e-7 of float64 (measured
    1.4e-7 and 2.7e-7), about torch's own fp32 attention."""
    q, k, v = _inputs((1, 50, 2, 32), (1, 50, 2, 32), torch.float32)
    _check_against_reference(q, k, v, softcap=30.0, causal=True, input_precision="ieee",
                             out_scale=0.04, grad_scale=0.06)


@pytest.mark.parametrize("precision", ["ieee", "tf32", "tf32x3"])
def test_fp32_input_precision(precision):
    """fp32 inputs at each product precision, against float64 with that precision's tolerance
    (TF32: fp16's). Under the interpreter the operands are rounded to TF32 as on the GPU, so
    "tf32" must show an error above fp32's tolerance (the rounding really runs) and "tf32x3"
    must recover fp32 accuracy."""
    from fused_lm.nn.functional import flash_attention

    q, k, v = _inputs((1, 70, 2, 32), (1, 60, 1, 32), torch.float32)
    _check_against_reference(q, k, v, causal=True, input_precision=precision)
    out = flash_attention(q, k, v, causal=True, input_precision=precision)
    expected = ref.attention(q.double(), k.double(), v.double(), causal=True)
    from tests._helpers import TOL, rel_error

    err = rel_error(out, expected)
    if precision == "tf32":
        assert TOL[torch.float32] < err <= TOL[torch.float16], err
    else:
        assert err <= TOL[torch.float32], err


def test_tf32_rounding_matches_the_reference_bitwise():
    """The interpreter's operand rounding (_tf32: bit arithmetic) against the reference's
    (frexp arithmetic in float64): ties away from zero, signed zeros, subnormals, overflow to
    inf, inf and NaN, and random values over the whole exponent range."""
    import triton
    import triton.language as tl

    from fused_lm.ops.attention.kernels import _tf32

    globals().update(tl=tl, _tf32=_tf32)          # a jit function resolves names in its globals

    @triton.jit
    def probe(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(y_ptr + offs, _tf32(tl.load(x_ptr + offs, mask=mask, other=0.0)), mask=mask)

    special = torch.tensor([1.0, 1 + 2**-11, 1 + 3 * 2**-11, -(1 + 2**-11), 1 + 2**-12,
                            3.4028235e38, -3.4028235e38, 1e-40, 2**-149, 0.0, -0.0,
                            float("inf"), float("-inf"), float("nan")])
    x = torch.cat([special, torch.randn(2000) * torch.exp2(torch.randint(-140, 120, (2000,)).float())])
    x = x.to(DEVICE)
    y = torch.empty_like(x)
    probe[(1,)](x, y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    assert torch.equal(y.view(torch.int32), ref.round_to_tf32(x).view(torch.int32))


@contextlib.contextmanager
def _torch_fp32_precision(value: str):
    """Sets torch's CUDA matmul fp32 precision ("ieee" | "tf32") and restores it."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        old = matmul.fp32_precision
        matmul.fp32_precision = value
        try:
            yield
        finally:
            matmul.fp32_precision = old
    else:
        old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high" if value == "tf32" else "highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(old)


def test_default_precision_follows_torch():
    """input_precision=None follows torch's CUDA matmul setting, read when the kernels run."""
    from fused_lm.nn.functional import flash_attention
    from fused_lm.ops.attention import default_precision

    q, k, v = _inputs((1, 40, 2, 16), (1, 40, 2, 16), torch.float32)
    explicit = {p: flash_attention(q, k, v, input_precision=p) for p in ("ieee", "tf32")}
    assert not torch.equal(explicit["ieee"], explicit["tf32"])
    for value in ("tf32", "ieee"):
        with _torch_fp32_precision(value):
            assert default_precision() == value
            assert torch.equal(flash_attention(q, k, v), explicit[value])
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")          # the legacy switch
        assert default_precision() == "tf32"
    finally:
        with _torch_fp32_precision("ieee"):
            pass
        torch.set_float32_matmul_precision(old)


def test_grid_past_65535_batch_x_heads(monkeypatch):
    """4096 packed sequences x 32 heads = 131072 (batch x head) programs per query block: past
    the 65535 that grid axis 1 allows. Every kernel launches on a 1-D grid (up to 2**31 - 1
    programs, decoded in _locate into batch, head, block) that stays within CUDA's limits, which
    the launcher checks. The launches are recorded, not run: the interpreter costs milliseconds
    per program (the decoding itself runs in every other test; test_gpu_grid_past_65535 runs
    this size on a GPU)."""
    from fused_lm.ops import attention as fa
    from fused_lm.ops.attention import kernels, launch

    launched = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            launch.check_grid(self.name, grid)
            launched.append((self.name, grid))
            return lambda *args, **kwargs: None

    for name in ("_fwd_kernel", "_bwd_preprocess_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"):
        monkeypatch.setattr(kernels, name, Recorder(name))
    lens = [1 + i % 2 for i in range(4096)]
    q, k, v, cu_q, cu_k = _packed(lens, lens, 32, 8, 16, torch.bfloat16)
    out = fa.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=2,
                       max_seqlen_k=2, causal=True)[0]
    torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert [name for name, _ in launched] == ["_fwd_kernel", "_bwd_preprocess_kernel",
                                              "_bwd_dkdv_kernel", "_bwd_dq_kernel"]
    sizes = {name: grid for name, grid in launched}
    assert sizes["_fwd_kernel"] == sizes["_bwd_dq_kernel"] == (4096 * 32,)    # one query block
    assert sizes["_bwd_dkdv_kernel"] == (4096 * 8,)                            # per kv head
    with pytest.raises(ValueError, match="grid axis 1 exceed CUDA's limit 65535"):
        launch.check_grid("fwd", (1, 4096 * 32))


def test_int64_offsets_past_2_31_elements():
    """Head offsets (h * stride_h) and token-block offsets (m0 * stride_n) past 2**31 elements,
    in views of buffers that large (allocated lazily on CPU: only the touched pages are backed):
    the kernels form every base offset in int64."""
    big = 2**30 + 16
    heads = torch.empty(3 * big, dtype=torch.float16, device=DEVICE)
    q = heads.as_strided((1, 9, 3, 16), (0, 16, big, 1))          # head 2 starts at 2**31 + 32
    q.copy_(randn(1, 9, 3, 16, dtype=torch.float16, device=DEVICE))
    k, v = (randn(1, 11, 1, 16, dtype=torch.float16, device=DEVICE) for _ in range(2))
    _check_against_reference(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(),
                             causal=True)
    stride = 2**23 - 1                                  # the largest token stride accepted
    rows = torch.empty(300 * stride, dtype=torch.float16, device=DEVICE)
    q, k, v = (rows[i * 16:].as_strided((1, 300, 1, 16), (0, stride, 16, 1)) for i in range(3))
    for t in (q, k, v):
        t.copy_(randn(1, 300, 1, 16, dtype=torch.float16, device=DEVICE))   # rows up to 2.5e9
    _check_against_reference(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(),
                             causal=True)


# ------------------------------------------------------------------------------------------------
# GPU: realistic sizes
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_realistic_against_reference(d, causal):
    q, k, v = _inputs((2, 1024, 8, d), (2, 1024, 2, d), torch.bfloat16, device="cuda")
    _check_against_reference(q, k, v, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_sdpa_matches_torch(dtype):
    q, k, v = _inputs((4, 16, 2048, 128), (4, 16, 2048, 128), dtype, device="cuda")
    _compare_sdpa(q, k, v, is_causal=True)


@pytest.mark.gpu
def test_gpu_varlen_window_softcap_deterministic():
    from fused_lm.nn.functional import flash_attention

    lens = [1000, 1, 3000, 517, 2048]
    q, k, v, cu_q, cu_k = _packed(lens, lens, 16, 4, 128, torch.bfloat16)
    _check_against_reference(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True,
                             window=(256, 0), softcap=30.0, max_seqlen_q=3000, max_seqlen_k=3000)
    dout = torch.randn_like(q)
    grads = [torch.autograd.grad(flash_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                                 max_seqlen_q=3000, max_seqlen_k=3000, causal=True,
                                                 deterministic=True), (q, k, v), dout)
             for _ in range(2)]
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_grid_past_65535():
    """4096 packed sequences of 1-2 tokens x 32 heads (131072 batch x heads) on the GPU."""
    lens = [1 + i % 2 for i in range(4096)]
    q, k, v, cu_q, cu_k = _packed(lens, lens, 32, 8, 64, torch.bfloat16)
    _check_against_reference(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True,
                             max_seqlen_q=2, max_seqlen_k=2)


@pytest.mark.gpu
def test_gpu_mha_matches_torch():
    ours, theirs = _mha_pair(1024, 16, batch_first=True)
    ours, theirs = ours.cuda(), theirs.cuda()
    x = randn(4, 512, 1024, device="cuda")
    out, _ = ours(x, x, x, is_causal=True)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(512, device="cuda", dtype=torch.float64)
    expected, _ = theirs(x.double(), x.double(), x.double(), attn_mask=mask, is_causal=True,
                         need_weights=False)
    assert_close(out, expected, torch.float16, scale=3.0)       # TF32 matmuls on the GPU
