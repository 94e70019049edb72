"""Reference cross-entropy, written for clarity (float64 by default); its linear twin (the
projection first, logits materialised) is in linear_cross_entropy.py.

Differentiated by autograd, so the tests take the reference gradients from here too.

Per token i with logits z_i (V,), target t_i, class weights w (ones when absent), smoothing eps:

    z      = softcap * tanh(x / softcap)        (when softcap is set; Gemma 2)
    lse_i  = log sum_c exp(z_ic)
    logp   = z_i - lse_i
    nll_i  = -w[t_i] * logp[t_i]
    smooth = -sum_c w_c * logp_c                 (torch: the smoothing term is weighted per class)
    loss_i = (1 - eps) * nll_i + eps / V * smooth + z_loss * lse_i**2      (z-loss: PaLM)

Ignored tokens (t_i == ignore_index) contribute 0. Reductions, as torch defines them:
* ``none``: loss_i, shaped like the target;
* ``sum``:  sum_i loss_i;
* ``mean``: the cross-entropy part divided by sum_i w[t_i] over non-ignored tokens (the count
  when there are no weights), the z-loss part divided by the count of non-ignored tokens (the
  z-loss is a per-token regulariser, independent of class weights). An all-ignored batch gives
  0/0 = nan, as torch does.

Unlike torch's (N, C, d1, ...) layout, the class dimension is the LAST one: (N, V) or (B, T, V).
"""

from __future__ import annotations

import torch


def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                  ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                  *, z_loss: float = 0.0, softcap: float | None = None,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Cross-entropy of ``input`` (..., V) against class indices ``target`` (...), in ``dtype``."""
    V = input.shape[-1]
    x = input.reshape(-1, V).to(dtype)                                  # (N, V)
    t = target.reshape(-1).long()                                       # (N,)
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    w = torch.ones(V, dtype=dtype, device=x.device) if weight is None else weight.to(dtype)
    lse = torch.logsumexp(x, dim=-1)                                    # (N,)
    logp = x - lse[:, None]                                             # (N, V)
    valid = t != ignore_index
    t_safe = torch.where(valid, t, torch.zeros_like(t))
    if bool(((t_safe < 0) | (t_safe >= V)).any()):
        raise IndexError(f"target out of range [0, {V}) (ignore_index={ignore_index})")
    w_t = w[t_safe] * valid                                             # (N,) 0 when ignored
    nll = -logp.gather(1, t_safe[:, None])[:, 0] * w_t
    ce = (1 - label_smoothing) * nll
    if label_smoothing > 0:                             # (skipped at 0: -inf logits would give 0*inf)
        ce = ce + label_smoothing / V * (-(logp * w).sum(-1) * valid)
    zl = z_loss * lse**2 * valid
    if reduction == "none":
        return (ce + zl).reshape(target.shape)
    if reduction == "sum":
        return ce.sum() + zl.sum()
    if reduction == "mean":
        return ce.sum() / w_t.sum() + zl.sum() / valid.sum()
    raise ValueError(f"reduction={reduction!r}: expected 'none', 'sum' or 'mean'")


def __getattr__(name):
    # ``linear_cross_entropy`` lives in linear_cross_entropy.py (its family's module); still
    # importable from here, for code written before it moved.
    if name == "linear_cross_entropy":
        from .linear_cross_entropy import linear_cross_entropy
        return linear_cross_entropy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

