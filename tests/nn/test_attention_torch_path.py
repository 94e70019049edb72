"""flash_attention's torch path (issue 12): what CPU tensors get without the Triton interpreter
(and float64, and FUSED_LM_BACKEND=torch). It routes to torch's own SDPA wherever the semantics
allow -- bottom-right causal, windows, GQA, packed sequences, the LSE -- and keeps the
materialising reference only for softcap. Checked here against the float64 reference (out, lse,
dq, dk, dv), plus the routing itself. No Triton needed: these run in every environment.
"""

from __future__ import annotations

import pytest
import torch

from fused_lm.nn.functional import flash_attention
from fused_lm.reference import attention as ref
from tests._helpers import assert_close, randn


def _inputs(shape_q, shape_kv, dtype):
    return tuple(randn(*s, dtype=dtype).requires_grad_() for s in (shape_q, shape_kv, shape_kv))


def _check(q, k, v, **kw):
    out, lse = flash_attention(q, k, v, return_lse=True, backend="torch", **kw)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64, lse64 = ref.attention(q64, k64, v64, return_lse=True, **kw)
    grads64 = torch.autograd.grad(out64, (q64, k64, v64), dout.double())
    td = q.dtype if q.dtype != torch.float64 else torch.float32
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert_close(out, out64, td, what="out")
    assert_close(lse, lse64, torch.float32 if td == torch.float32 else td, what="lse")
    for name, g, g64 in zip(("dq", "dk", "dv"), grads, grads64):
        assert_close(g, g64, td, scale=2.0, what=name)
    return out, lse


# (Nq, Nk, Hq, Hkv, options): each row is one way torch's SDPA expresses flash_attention's
# bottom-right visibility.
CASES = [
    (33, 33, 4, 4, {"causal": True}),                     # square: is_causal
    (20, 45, 4, 2, {"causal": True}),                     # Nq < Nk: boolean mask, GQA
    (45, 20, 4, 1, {"causal": True}),                     # Nq > Nk: 25 rows see nothing
    (1, 37, 4, 2, {"causal": True}),                      # decoding: one query sees every key
    (30, 40, 2, 1, {"window": (5, 3)}),                   # window: boolean mask
    (40, 20, 2, 2, {"window": (2, 0), "causal": True}),   # window with rows that see nothing
    (29, 31, 6, 3, {}),                                   # full, GQA
    (25, 25, 2, 2, {"softcap": 3.0, "causal": True}),     # softcap: the reference
]


@pytest.mark.parametrize("nq,nk,hq,hkv,opts", CASES,
                         ids=[f"{c[0]}x{c[1]}-h{c[2]}/{c[3]}-{'-'.join(c[4]) or 'full'}" for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_torch_path_matches_reference(nq, nk, hq, hkv, opts, dtype):
    q, k, v = _inputs((2, nq, hq, 24), (2, nk, hkv, 24), dtype)
    out, lse = _check(q, k, v, **opts)
    if opts.get("causal") and nq > nk and not opts.get("window"):
        assert torch.isneginf(lse[:, :, :nq - nk]).all() and (out[:, :nq - nk] == 0).all()


def test_torch_path_varlen():
    """Packed sequences (an empty one, one with no keys, Nq != Nk): one SDPA call per sequence."""
    lens_q, lens_k = [7, 0, 19, 4, 12], [9, 0, 19, 0, 30]
    cu_q = torch.tensor([0] + lens_q).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k).cumsum(0).to(torch.int32)
    q, k, v = _inputs((sum(lens_q), 4, 16), (sum(lens_k), 2, 16), torch.float32)
    for opts in ({"causal": True}, {"window": (3, 2)}, {}):
        out, lse = _check(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **opts)
        assert lse.shape == (4, sum(lens_q))
        assert torch.isneginf(lse[:, 26:30]).all() and (out[26:30] == 0).all()   # no keys


def test_torch_path_routes_to_sdpa(monkeypatch):
    """Everything but softcap reaches torch's SDPA (never the materialising reference); softcap
    reaches the reference."""
    import torch.nn.functional as F

    calls = {"sdpa": 0, "sdpa_lse": 0, "reference": 0}
    real_sdpa, real_ref = F.scaled_dot_product_attention, ref.attention
    real_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    def count(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(F, "scaled_dot_product_attention", count("sdpa", real_sdpa))
    monkeypatch.setattr(ref, "attention", count("reference", real_ref))
    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu",
                        count("sdpa_lse", real_lse))
    q, k, v = _inputs((1, 20, 4, 16), (1, 30, 2, 16), torch.float32)
    for opts in ({"causal": True}, {"window": (4, 0)}, {}):
        flash_attention(q, k, v, backend="torch", **opts)
        flash_attention(q, k, v, backend="torch", return_lse=True, **opts)
    cu = torch.tensor([0, 12, 20], dtype=torch.int32)
    flash_attention(q[0], k[0, :20], v[0, :20], cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True,
                    backend="torch")
    assert calls == {"sdpa": 5, "sdpa_lse": 3, "reference": 0}
    flash_attention(q, k, v, backend="torch", softcap=5.0)
    assert calls["reference"] == 1


def test_torch_path_empty_and_degenerate():
    q, k, v = _inputs((1, 0, 2, 16), (1, 7, 2, 16), torch.float32)
    out = flash_attention(q, k, v, backend="torch")
    assert out.shape == q.shape
    q, k, v = _inputs((1, 5, 2, 16), (1, 0, 2, 16), torch.float32)
    out, lse = flash_attention(q, k, v, backend="torch", return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()
