"""Flash attention (issue 7): forward and backward against the float64 reference, varlen against
the per-sequence loop, GQA, windows, softcap, determinism, the SDPA and MultiheadAttention
drop-ins against torch's, torch.compile tracing and input errors.

CPU runs go through the Triton interpreter with small shapes (N <= ~130, D in {16, 32, 64});
the `gpu` tests repeat the checks at realistic sizes on CUDA.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from fused_lm.reference import attention as ref
from tests._helpers import HAS_CUDA, assert_close, poison_allocations, randn, triton_devices

pytestmark = pytest.mark.skipif(not triton_devices(), reason="needs CUDA or the Triton interpreter")

DEVICE = "cuda" if HAS_CUDA else "cpu"


def _tol_dtype(dtype: torch.dtype, device) -> torch.dtype:
    # On a GPU, Triton multiplies fp32 operands on TF32 tensor cores (10-bit mantissa, like
    # fp16): fp32 inputs get fp16's tolerance there (documented in the README).
    if dtype == torch.float32 and torch.device(device).type == "cuda":
        return torch.float16
    return dtype


def _inputs(shape_q, shape_kv, dtype, device=DEVICE):
    q = randn(*shape_q, dtype=dtype, device=device).requires_grad_()
    k = randn(*shape_kv, dtype=dtype, device=device).requires_grad_()
    v = randn(*shape_kv, dtype=dtype, device=device).requires_grad_()
    return q, k, v


def _check_against_reference(q, k, v, grad_scale=2.0, **kw):
    """Runs flash_attention and the float64 reference, compares out, lse, dq, dk, dv."""
    from fused_lm.nn.functional import flash_attention

    out, lse = flash_attention(q, k, v, return_lse=True, **kw)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    kw64 = {key: val for key, val in kw.items() if not key.startswith("max_seqlen")}
    out64, lse64 = ref.attention(q64, k64, v64, return_lse=True, **kw64)
    dq64, dk64, dv64 = torch.autograd.grad(out64, (q64, k64, v64), dout.double())
    td = _tol_dtype(q.dtype, q.device)
    assert_close(out, out64, td, what="out")
    assert_close(lse, lse64, torch.float32 if td == torch.float32 else td, what="lse")
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
        assert_close(a, b, _tol_dtype(q.dtype, q.device), scale=2.0, what=name)


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
    q, k, v = _inputs((1, 2, 9, 12), (1, 2, 11, 12), torch.float32)
    with pytest.warns(UserWarning, match="head dim 12"):
        out = scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


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
    with pytest.raises(ValueError, match="multiple of 8"):
        flash_attention(*_inputs((1, 8, 2, 12), (1, 8, 2, 12), torch.float32))
    with pytest.raises(ValueError, match="multiple of 8"):
        flash_attention(*_inputs((1, 2, 1, 264), (1, 2, 1, 264), torch.float32))
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
        from fused_lm.ops.flash_attention import attention
        attention(q.double(), k.double(), v.double())


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
def test_gpu_mha_matches_torch():
    ours, theirs = _mha_pair(1024, 16, batch_first=True)
    ours, theirs = ours.cuda(), theirs.cuda()
    x = randn(4, 512, 1024, device="cuda")
    out, _ = ours(x, x, x, is_causal=True)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(512, device="cuda", dtype=torch.float64)
    expected, _ = theirs(x.double(), x.double(), x.double(), attn_mask=mask, is_causal=True,
                         need_weights=False)
    assert_close(out, expected, torch.float16, scale=3.0)       # TF32 matmuls on the GPU
