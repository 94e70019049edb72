"""fused_lm.optim.AdamW: torch.optim.AdamW on multi-tensor Triton, CUDA C++ and CPU C++ kernels.

With default options it reproduces ``torch.optim.AdamW`` to float32 rounding (decoupled decay,
bias correction, amsgrad, maximize; the math is in fused_lm/ops/adamw.py) and its checkpoints load
both ways. A step is two launches per bucket (device x dtypes), whatever the number of tensors.
"""

from __future__ import annotations

import torch

from fused_lm.ops import adamw as _ops
from fused_lm.optim._base import (_MultiTensorOptimizer, check_constructor, check_lr_betas,
                                   to_scalars)


class AdamW(_MultiTensorOptimizer):
    """Drop-in ``torch.optim.AdamW``: the same arguments, defaults, param-group keys and
    checkpoints.

    torch's keywords: ``foreach`` and ``fused`` (any value, kept in the param groups as torch
    keeps them: the step is always fused and multi-tensor), ``capturable`` (any value: the step
    never synchronises with the host and can always be captured in a CUDA graph),
    ``differentiable`` (False; True raises). The combinations torch rejects raise torch's
    errors (``fused`` with ``foreach``; a tensor ``lr`` or tensor betas with ``foreach=True`` and
    ``capturable=False``).

    Args beyond torch's:
        backend: "cuda" | "triton" | "cpu" | "torch" | None (None: fused_lm._backend chooses per
            device and dtype; float64 and non-contiguous parameters use the torch path).
        master_weights: keep a float32 copy of bf16/fp16 parameters in ``state['master_param']``;
            the update applies to it and the parameter becomes its rounding. The moments are
            then float32 too unless ``state_dtype`` says otherwise.
        state_dtype: the dtype of ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq``: None (the
            parameter dtype, as torch; float32 with master weights), torch.float32 or
            torch.bfloat16. Math is float32 in every case.
        stochastic_rounding: round bf16 parameter updates stochastically with counter-based
            random bits of (seed, step, tensor, element); the seed is saved in ``state_dict()``
            so a resumed run is bit-identical. Other dtypes round to nearest.
        max_grad_norm: clip the gradients to this global L2 norm inside the step: the norm is
            computed on the device (a constant number of launches) and the update kernel
            multiplies each gradient by clamp(max_grad_norm / (norm + 1e-6), max=1) as it reads
            it; gradients are not rewritten. Equal, within rounding, to
            ``clip_grad_norm_(params, max_grad_norm)`` then ``step()``; under GradScaler the norm
            is of the unscaled gradients, and a non-finite norm skips the step like found_inf.
            ``optimizer.grad_norm`` holds the pre-clip norm of the last step (a 0-d tensor).
        grad_norm_process_group: with ``max_grad_norm``, a process group whose ranks hold
            DISJOINT slices of the gradients (ZeroRedundancyOptimizer: pass it through ZeRO's
            ``**defaults``, or set ``zero.optim.grad_norm_process_group``); the partial norms are
            all-reduced over it. Not needed under DDP (gradients already global) nor FSDP2
            (DTensor gradients are reduced over their mesh).

    ``step()`` never synchronises with the host, honours ``torch.amp.GradScaler`` (unscales in
    the kernel and skips everything, step counts included, on ``found_inf``) and can be captured
    in a CUDA graph after one eager step (use a 0-d CUDA tensor ``lr`` to vary it per replay).
    Complex parameters are updated as their real views, like torch's.
    """

    _SPEC = _ops.SPEC
    _OP = _ops.SPEC.name
    _MOMENTS = ("exp_avg", "exp_avg_sq")
    _KERNELS = {"triton": _ops.adamw_triton, "compiled": _ops.adamw_compiled,
                "torch": _ops.adamw_torch}

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, foreach: bool | None = None, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None,
                 backend: str | None = None, master_weights: bool = False,
                 state_dtype: torch.dtype | None = None, stochastic_rounding: bool = False,
                 max_grad_norm: float | None = None, grad_norm_process_group=None):
        check_constructor(type(self).__name__, lr, betas, weight_decay, eps, foreach=foreach,
                          capturable=capturable, differentiable=differentiable, fused=fused)
        # torch.optim.AdamW's keys, in its order (AdamW is torch's Adam with decoupled decay).
        defaults = dict(lr=lr, betas=to_scalars(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize, foreach=foreach,
                        capturable=capturable, differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=True)
        super().__init__(params, defaults, backend=backend, master_weights=master_weights,
                         state_dtype=state_dtype, stochastic_rounding=stochastic_rounding,
                         max_grad_norm=max_grad_norm, grad_norm_process_group=grad_norm_process_group)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:   # as torch's AdamW: a loaded Adam group becomes AdamW
            group["decoupled_weight_decay"] = True

    @staticmethod
    def _validate_hparams(group: dict) -> None:
        check_lr_betas(group["lr"], group["betas"], group["weight_decay"], group["eps"])

    def _hp_row(self, group: dict) -> tuple:
        b1, b2 = group["betas"]
        return (group["lr"], b1, b2, group["eps"], group["weight_decay"], group.get("maximize", False))

    def _uses_amsgrad(self, group: dict) -> bool:
        return bool(group.get("amsgrad", False))
