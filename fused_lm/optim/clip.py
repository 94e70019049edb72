"""Gradient clipping: drop-in ``torch.nn.utils.clip_grad_norm_`` and friends on multi-tensor kernels.

    fused_lm.clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False,
                             foreach=None)                         # -> total norm (0-d float32)
    fused_lm.get_total_norm(tensors, norm_type=2.0, error_if_nonfinite=False, foreach=None)
    fused_lm.clip_grads_with_norm_(parameters, max_norm, total_norm, foreach=None)
    fused_lm.clip_grad_value_(parameters, clip_value, foreach=None)

Same meaning as torch.nn.utils: the norm of all gradients viewed as one vector, for norm types
2, 1, inf and any other p (negative p and -inf too, as torch allows; 0 as torch composes it: the
number of gradients with a non-zero element); the coefficient ``clamp(max_norm / (norm + 1e-6),
max=1)`` multiplies every gradient in place (no ``if coef < 1`` branch, so no host sync); a single
tensor or an iterable is accepted; ``grad=None`` is skipped; no gradient gives ``tensor(0.)``;
``error_if_nonfinite=True`` raises the same RuntimeError as torch (the one path that reads the
norm on the host).

How it runs: the norm is ops/multi_tensor_norm.py (per-chunk partials then one finalise that
also writes the clip coefficient: a constant number of launches whatever the number of
gradients), the scale is ops/multi_tensor_scale.py with the coefficient read on the device (one
launch per dtype), ``clip_grad_value_`` is ops/multi_tensor_clamp.py (one launch per dtype; torch
runs two foreach passes). ``foreach`` is accepted for signature compatibility and ignored: the
multi-tensor kernels always run; ``backend=`` (keyword-only) or ``FUSED_LM_BACKEND`` picks them.
The functions here are the torch signatures only: the gradients are described once as a
``TensorBatch`` (ops/_multi_tensor.py) that the norm and the scale both read, and the norm,
coefficient and flag, with the DTensor / ``process_group`` reduction, are the one function
``ops.multi_tensor_norm.multi_tensor_norm``. Host cost: plain gradients on one device are checked
and their addresses, sizes and dtypes read in one C++ call (``tensor_info``), bucketed and turned
into cached tables with numpy: ~1 ms for the norm of 10k tiny tensors on a CPU (15 ms of
per-tensor Python before).

Differences from torch (documented "better"s):
* The returned norm is float32 whatever the gradients' dtype, accumulated in float32 (torch
  returns a bf16 norm when every gradient is bf16, rounded to 8 bits of mantissa, and clips with
  that rounded norm). float64 gradients give a float64 norm (torch path), as torch does.
* Empty gradients are fine with the inf norm (torch raises on the inf norm of an empty tensor).
* DTensor gradients (FSDP2) give a plain tensor holding the global norm on every rank (torch
  returns a replicated DTensor); call ``.item()`` directly.

Distributed training:
* DDP: gradients are all-reduced before ``clip_grad_norm_`` runs, so every rank computes the same
  global norm locally; nothing else is needed.
* FSDP2 (``fully_shard``): gradients are DTensors sharded over the mesh. Each rank reduces its
  local shards to a partial (sum of |g|^p, or max/min |g| for +-inf), partials are all-reduced
  over the mesh dimensions on which a gradient is sharded (not over replicated ones, e.g. HSDP's
  replicate dimension), and the root is taken: the result equals the single-process norm.
  ``Partial`` placements are first redistributed to ``Replicate``.
* A ZeRO-style sharded optimizer whose ranks each hold a disjoint slice of plain-tensor gradients
  (``ZeroRedundancyOptimizer``): pass ``process_group=`` (keyword-only, e.g.
  ``torch.distributed.group.WORLD``) so the local partial is all-reduced over it. The optimizers'
  ``max_grad_norm`` option takes the same argument.
* DeepSpeed: DeepSpeed clips inside ``engine.step()`` when the config sets ``gradient_clipping``
  (its ZeRO stages hold partitioned, flattened gradients that these functions do not see). Use
  that setting with DeepSpeed and do not call ``clip_grad_norm_`` on the model's parameters
  (they hold no gradient, or an unreduced one, between backward and step). With a fused_lm
  optimizer as DeepSpeed's client optimizer, leave its ``max_grad_norm=None`` and let DeepSpeed
  clip, or set ``gradient_clipping: 0`` and use ``max_grad_norm`` with ``process_group`` set to
  the data-parallel group when the optimizer sees partitioned gradients (ZeRO-1/2).
"""

from __future__ import annotations

import types
import warnings
from typing import Iterable

import torch

from fused_lm.ops import _multi_tensor as mt
from fused_lm.ops.multi_tensor_clamp import multi_tensor_clamp_
from fused_lm.ops.multi_tensor_norm import clip_coef, multi_tensor_norm
from fused_lm.ops.multi_tensor_scale import multi_tensor_scale_

__all__ = ["clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_", "clip_grad_value_"]

TensorOrTensors = torch.Tensor | Iterable[torch.Tensor]


def _as_list(tensors: TensorOrTensors) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    is_generator = isinstance(tensors, types.GeneratorType)
    out = list(tensors)
    if is_generator and not out:
        warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.",
                      stacklevel=3)
    return out


def _raise_if_nonfinite(norm: torch.Tensor, norm_type: float) -> None:
    if torch.logical_or(norm.isnan(), norm.isinf()):  # host sync: only with error_if_nonfinite
        raise RuntimeError(
            f"The total norm of order {float(norm_type)} for gradients from `parameters` is "
            "non-finite, so it cannot be clipped. To disable this error and scale the gradients "
            "by the non-finite norm anyway, set `error_if_nonfinite=False`")


@torch.no_grad()
def get_total_norm(tensors: TensorOrTensors, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                   foreach: bool | None = None, *, process_group=None,
                   backend: str | None = None) -> torch.Tensor:
    """The norm of ``tensors`` viewed as one vector, like ``torch.nn.utils.get_total_norm``
    (float32 0-d tensor on the first tensor's device; see the module docstring)."""
    del foreach  # accepted for compatibility: the multi-tensor kernels always run
    tensors = _as_list(tensors)
    norm = multi_tensor_norm(tensors, norm_type, 1.0, process_group=process_group,
                             backend=backend).norm
    if error_if_nonfinite:
        _raise_if_nonfinite(norm, norm_type)
    return norm


@torch.no_grad()
def clip_grads_with_norm_(parameters: TensorOrTensors, max_norm: float, total_norm: torch.Tensor,
                          foreach: bool | None = None, *, backend: str | None = None) -> None:
    """Scales every gradient by ``clamp(max_norm / (total_norm + 1e-6), max=1)`` in place, like
    ``torch.nn.utils.clip_grads_with_norm_`` (one launch per device and dtype, no host sync)."""
    del foreach
    grads = mt.TensorBatch([p.grad for p in _as_list(parameters) if p.grad is not None])
    if not len(grads):
        return
    if mt.local_shard(total_norm) is not total_norm:   # a DTensor norm: its global value
        total_norm = total_norm.full_tensor()
    multi_tensor_scale_(grads, clip_coef(total_norm, max_norm), backend=backend)


@torch.no_grad()
def clip_grad_norm_(parameters: TensorOrTensors, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: bool | None = None, *,
                    process_group=None, backend: str | None = None) -> torch.Tensor:
    """Clips the gradients of ``parameters`` to a global norm of ``max_norm`` in place and returns
    the norm before clipping, like ``torch.nn.utils.clip_grad_norm_`` (module docstring for the
    differences: float32 norm, DTensor and ``process_group`` reduction)."""
    del foreach
    # Described once (one C++ pass for plain gradients on one device), read by the norm and the scale.
    grads = mt.TensorBatch([p.grad for p in _as_list(parameters) if p.grad is not None])
    norm, coef, _ = multi_tensor_norm(grads, norm_type, max_norm, process_group=process_group,
                                      backend=backend)
    if error_if_nonfinite:
        _raise_if_nonfinite(norm, norm_type)
    if len(grads):
        multi_tensor_scale_(grads, coef, backend=backend)
    return norm


@torch.no_grad()
def clip_grad_value_(parameters: TensorOrTensors, clip_value: float, foreach: bool | None = None,
                     *, backend: str | None = None) -> None:
    """Clamps every gradient to ``[-clip_value, clip_value]`` in place, like
    ``torch.nn.utils.clip_grad_value_``, in one launch per device and dtype."""
    del foreach
    clip_value = float(clip_value)
    grads = [p.grad for p in _as_list(parameters) if p.grad is not None]
    multi_tensor_clamp_(grads, -clip_value, clip_value, backend=backend)
