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
Host cost: plain gradients on one device are checked and their addresses, sizes and dtypes read
in one C++ call (``ops/_multi_tensor.py`` ``tensor_info``), bucketed and turned into cached tables
with numpy: ~1 ms for the norm of 10k tiny tensors on a CPU (15 ms of per-tensor Python before).

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

import math
import types
import warnings
from collections import OrderedDict
from typing import Iterable

import torch

from fused_lm.ops import _multi_tensor as mt
from fused_lm.ops.multi_tensor_clamp import multi_tensor_clamp_
from fused_lm.ops.multi_tensor_norm import (clip_coef, multi_tensor_norm_and_coef,
                                             multi_tensor_norm_coef_flag, nonfinite_flag,
                                             norm_coef_flag_of)
from fused_lm.ops.multi_tensor_scale import multi_tensor_scale_

__all__ = ["clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_", "clip_grad_value_",
           "total_norm_and_coef", "total_norm_coef_flag"]

TensorOrTensors = torch.Tensor | Iterable[torch.Tensor]
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _dtensor_type():
    """torch.distributed.tensor.DTensor, or None where torch.distributed is unavailable."""
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch < 2.4
        return None
    return DTensor


def _as_list(tensors: TensorOrTensors) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    is_generator = isinstance(tensors, types.GeneratorType)
    out = list(tensors)
    if is_generator and not out:
        warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.",
                      stacklevel=3)
    return out


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor a kernel reads and writes: a DTensor's local shard (an alias of its storage)."""
    dtensor = _dtensor_type()
    return t.to_local() if dtensor is not None and isinstance(t, dtensor) else t


def _allreduce_norm(norm: torch.Tensor, p: float, groups: list) -> torch.Tensor:
    """Combines per-rank norms over ``groups`` into the norm of the union of the ranks' elements:
    the sum of p-th powers (then the root) for finite p, the max (min) for inf (-inf). NaN on any
    rank gives NaN everywhere (a flag travels with max/min, whose NaN handling is backend-defined)."""
    import torch.distributed as dist

    if math.isinf(p):
        nan = torch.isnan(norm)
        val = norm.masked_fill(nan, 0.0 if p > 0 else math.inf).reshape(1)
        flag = nan.to(norm.dtype).reshape(1)
        for g in groups:
            if p > 0:  # one message: the max of [norm, flag]
                buf = torch.cat([val, flag])
                dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=g)
                val, flag = buf[0:1], buf[1:2]
            else:
                dist.all_reduce(val, op=dist.ReduceOp.MIN, group=g)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=g)
        return torch.where(flag[0] > 0, torch.full_like(val[0], math.nan), val[0])
    power = (norm.double() if norm.dtype == torch.float64 else norm.float()).pow(p).reshape(1)
    for g in groups:
        dist.all_reduce(power, op=dist.ReduceOp.SUM, group=g)
    return power.pow(1.0 / p).reshape(()).to(norm.dtype)


def total_norm_and_coef(tensors: list[torch.Tensor], norm_type: float = 2.0, max_norm: float = 1.0,
                        *, process_group=None, backend: str | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(global norm, clip coefficient): ``total_norm_coef_flag`` without the flag."""
    return total_norm_coef_flag(tensors, norm_type, max_norm, process_group=process_group,
                                backend=backend)[:2]


def total_norm_coef_flag(tensors: list[torch.Tensor], norm_type: float = 2.0, max_norm: float = 1.0,
                         *, process_group=None, backend: str | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(global norm, clip coefficient, non-finite flag) of ``tensors`` (plain tensors or DTensors)
    as float32 0-d tensors on the first tensor's (local) device, with no host synchronisation.
    DTensor partials are reduced over the mesh dimensions they are sharded on; plain tensors'
    partials over ``process_group`` when given (ZeRO-style sharding), else taken as global
    (single process, DDP)."""
    if process_group is None:
        # One C++ pass: plain tensors (no DTensor) on one device, checked, with their addresses.
        tensors = list(tensors)
        info = mt.tensor_info(tensors)
        if info is not None:
            return norm_coef_flag_of(tensors, info, norm_type, max_norm, backend=backend)
    dtensor = _dtensor_type()
    if dtensor is None or not any(isinstance(t, dtensor) for t in tensors):
        if process_group is None:
            return multi_tensor_norm_coef_flag(tensors, norm_type, max_norm, backend=backend)
    p = float(norm_type)
    if p == 0.0:
        raise NotImplementedError("norm_type=0 (torch's count of non-zero gradients) is not defined "
                                  "across shards; use a norm type p != 0")
    # (mesh, sharded mesh dims) -> local shards; plain tensors under the key None.
    groups: OrderedDict = OrderedDict()
    meshes = {}
    for t in tensors:
        if dtensor is not None and isinstance(t, dtensor):
            if any(pl.is_partial() for pl in t.placements):
                from torch.distributed.tensor import Replicate

                t = t.redistribute(t.device_mesh, [Replicate() if pl.is_partial() else pl
                                                   for pl in t.placements])
            dims = tuple(i for i, pl in enumerate(t.placements) if pl.is_shard())
            key = (id(t.device_mesh), dims)
            meshes[key] = t.device_mesh
            groups.setdefault(key, []).append(t.to_local())
        else:
            groups.setdefault(None, []).append(t)
    first = next(iter(groups.values()))[0].device
    parts = []
    for key, local in groups.items():
        norm, _ = multi_tensor_norm_and_coef(local, p, max_norm, backend=backend)
        norm = norm.to(local[0].device) if norm.device != local[0].device else norm
        if key is None:
            pgs = [process_group] if process_group is not None else []
        else:
            pgs = [meshes[key].get_group(d) for d in key[1]]
        if pgs:
            norm = _allreduce_norm(norm, p, pgs)
        parts.append(norm.to(first))
    if len(parts) == 1:
        norm = parts[0]
    else:
        dtype = torch.float64 if any(x.dtype == torch.float64 for x in parts) else torch.float32
        norm = torch.linalg.vector_norm(torch.stack([x.to(dtype) for x in parts]), p)
    return norm, clip_coef(norm, max_norm), nonfinite_flag(norm)


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
    norm, _ = total_norm_and_coef(tensors, norm_type, 1.0, process_group=process_group, backend=backend)
    if error_if_nonfinite:
        _raise_if_nonfinite(norm, norm_type)
    return norm


def _scale_grads(grads: list[torch.Tensor], coef: torch.Tensor, backend: str | None,
                 info=None) -> None:
    """Scales ``grads`` (local tensors) by ``coef`` (copied to each device by the scale)."""
    del info
    multi_tensor_scale_(grads, coef, backend=backend)


@torch.no_grad()
def clip_grads_with_norm_(parameters: TensorOrTensors, max_norm: float, total_norm: torch.Tensor,
                          foreach: bool | None = None, *, backend: str | None = None) -> None:
    """Scales every gradient by ``clamp(max_norm / (total_norm + 1e-6), max=1)`` in place, like
    ``torch.nn.utils.clip_grads_with_norm_`` (one launch per device and dtype, no host sync)."""
    del foreach
    grads = [p.grad for p in _as_list(parameters) if p.grad is not None]
    info = mt.tensor_info(grads)   # None for DTensors (and on failed checks): the general path
    if info is None:
        grads = [_local(g) for g in grads]
    if not grads:
        return
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(total_norm, dtensor):
        total_norm = total_norm.full_tensor()
    _scale_grads(grads, clip_coef(total_norm, max_norm), backend, info)


@torch.no_grad()
def clip_grad_norm_(parameters: TensorOrTensors, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: bool | None = None, *,
                    process_group=None, backend: str | None = None) -> torch.Tensor:
    """Clips the gradients of ``parameters`` to a global norm of ``max_norm`` in place and returns
    the norm before clipping, like ``torch.nn.utils.clip_grad_norm_`` (module docstring for the
    differences: float32 norm, DTensor and ``process_group`` reduction)."""
    del foreach
    grads = [p.grad for p in _as_list(parameters) if p.grad is not None]
    max_norm = float(max_norm)
    info = mt.tensor_info(grads) if process_group is None else None
    if info is not None:   # plain tensors on one device, checked: one pass over their addresses
        norm, coef, _ = norm_coef_flag_of(grads, info, norm_type, max_norm, backend=backend)
    else:
        norm, coef = total_norm_and_coef(grads, norm_type, max_norm, process_group=process_group,
                                         backend=backend)
    if error_if_nonfinite:
        _raise_if_nonfinite(norm, norm_type)
    if grads:
        if info is None:
            _scale_grads([_local(g) for g in grads], coef, backend)
        else:
            _scale_grads(grads, coef, backend, info)
    return norm


@torch.no_grad()
def clip_grad_value_(parameters: TensorOrTensors, clip_value: float, foreach: bool | None = None,
                     *, backend: str | None = None) -> None:
    """Clamps every gradient to ``[-clip_value, clip_value]`` in place, like
    ``torch.nn.utils.clip_grad_value_``, in one launch per device and dtype."""
    del foreach
    clip_value = float(clip_value)
    grads = [p.grad for p in _as_list(parameters) if p.grad is not None]
    if _dtensor_type() is not None and any(type(g) not in _PLAIN_TYPES for g in grads):
        grads = [_local(g) for g in grads]
    multi_tensor_clamp_(grads, -clip_value, clip_value, backend=backend)
