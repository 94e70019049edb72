"""The multi-tensor optimizer engine shared by fused_lm.optim.AdamW and fused_lm.optim.Lion.

A step:

1. gathers the parameters that have a gradient and validates them all (sparse gradients,
   mismatched dtypes, meta tensors) before anything is modified;
2. creates missing state (torch's layout: ``step`` as a float32 0-d tensor on the parameter's
   device, the moments in ``_moment_dtype``, and ``master_param`` under the precision menu);
3. plans the step (``_plan.build_plan``): buckets by (backend, device, param dtype, state
   dtype, variant flags), each ONE step-increment launch plus ONE update launch whatever the
   number of tensors and param groups; complex tensors enter as their real views; parameters the
   kernels cannot take (float64, non-contiguous) form PyTorch-path buckets of the same step. A
   training loop repeats the same plan: it is kept, and a later step only re-reads addresses;
4. per device, reads the per-group hyperparameter table ``hp`` (ops/_optim_common.py) and the
   GradScaler's ``grad_scale``/``found_inf`` as device scalars ``grad_mult``/``skip`` (clipping
   folds its coefficient and non-finite flag in), so unscaling, clipping and inf-skipping happen
   inside the kernels with no host synchronisation;
5. builds every launch first (tables validated with ``mt.check_lists`` when built, rows read),
   then launches each bucket on its backend (fused_lm/_backend.py: cuda | triton | cpu | torch).

Around the step, the class keeps torch's contract: torch's constructor keywords and errors
(``check_constructor``), its ``state_dict``/``load_state_dict`` with their hooks (round trips are
exact), and copies (deepcopy, pickle) that keep every option beyond torch's (``_OPTIONS``).
Subclasses define the defaults, the hyperparameter row of a group, the moments of the state and
the kernels (``_KERNELS``).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from functools import partial
from itertools import chain
from typing import Any

import torch

from fused_lm import _backend
from fused_lm.optim import _plan

_SEED_KEY = "sr_seed"   # saved in every param group of state_dict(): resumed runs draw the same bits


class _MultiTensorOptimizer(torch.optim.Optimizer):
    """Base class: subclasses set ``_SPEC`` (the family's ops/_spec.py spec: list order, backends)
    and ``_OP`` (its name, what _backend selects by), ``_MOMENTS`` (state keys of the
    moments, in table order) and ``_KERNELS`` (triton, compiled and torch launchers), and
    implement ``_hp_row`` and ``_uses_amsgrad``."""

    _step_supports_amp_scaling = True
    _SPEC = None
    _OP: str = ""
    _MOMENTS: tuple[str, ...] = ()
    _KERNELS: dict = {}
    _COMPLEX = True     # complex parameters run as their real views (torch's AdamW does too)
    # Attributes beyond torch's that pickling and deepcopy keep (see __getstate__).
    _OPTIONS = ("backend", "master_weights", "state_dtype", "stochastic_rounding", "_seed",
                "max_grad_norm", "grad_norm_process_group", "grad_norm")

    def __init__(self, params, defaults: dict[str, Any], *, backend: str | None = None,
                 master_weights: bool = False, state_dtype: torch.dtype | None = None,
                 stochastic_rounding: bool = False, max_grad_norm: float | None = None,
                 grad_norm_process_group=None):
        if max_grad_norm is not None and not float(max_grad_norm) > 0.0:
            raise ValueError(f"max_grad_norm={max_grad_norm!r}: expected a positive number or None")
        if backend is not None and backend not in _backend.BACKENDS:
            raise ValueError(f"backend={backend!r}: expected one of {', '.join(_backend.BACKENDS)} or None")
        if state_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"state_dtype={state_dtype}: expected None (the parameter dtype, as torch), "
                             "torch.float32 or torch.bfloat16")
        self.backend = backend
        self.master_weights = bool(master_weights)
        self.state_dtype = state_dtype
        self.stochastic_rounding = bool(stochastic_rounding)
        # The seed of stochastic rounding's random bits: from the process seed, so that building
        # the optimizer consumes no random numbers; saved in state_dict().
        self._seed = torch.initial_seed() & 0xFFFFFFFF
        self._reset_caches()
        # Gradient clipping folded into the step (issue 5; see _prepare_clip).
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.grad_norm_process_group = grad_norm_process_group
        self.grad_norm: torch.Tensor | None = None
        super().__init__(params, defaults)

    # -- subclass hooks ------------------------------------------------------------------------

    def _hp_row(self, group: dict) -> tuple:
        """(lr, beta1, beta2, eps, weight_decay, maximize) of a group; lr and the betas may be
        one-element tensors (of any shape, as torch allows)."""
        raise NotImplementedError

    def _uses_amsgrad(self, group: dict) -> bool:
        return False

    @staticmethod
    def _validate_hparams(group: dict) -> None:
        raise NotImplementedError

    # -- param groups, precision -----------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except (TypeError, ValueError, RuntimeError):
            self.param_groups.pop()
            raise
        self._invalidate()

    def _check_group(self, group: dict) -> None:
        """Raises for hyperparameters, flags or parameters this optimizer cannot run."""
        name = type(self).__name__
        self._validate_hparams(group)
        if group.get("differentiable", False):
            raise RuntimeError(differentiable_message(name))
        for p in group["params"]:
            if p.is_complex():
                if not self._COMPLEX:
                    raise TypeError(f"{name} does not support complex parameters (got {p.dtype}); "
                                    "view them as real with torch.view_as_real")
                if self.state_dtype == torch.bfloat16:
                    raise TypeError(f"{name}: state_dtype=torch.bfloat16 does not apply to complex "
                                    f"parameters (got {p.dtype}); expected None or torch.float32")
            elif not p.is_floating_point():
                raise TypeError(f"{name} needs floating-point parameters, got {p.dtype}")

    def _has_master(self, p: torch.Tensor) -> bool:
        return self.master_weights and p.dtype in (torch.bfloat16, torch.float16)

    def _moment_dtype(self, p: torch.Tensor) -> torch.dtype:
        """The dtype of ``p``'s moments: ``state_dtype`` when set; else float32 when ``p`` has a
        float32 master copy (what Apex, DeepSpeed's bf16 optimizer and Transformer Engine keep
        beside master weights: bf16 moments would round away the precision the master keeps);
        else ``p``'s dtype (torch). Complex parameters keep complex moments."""
        if p.is_complex():
            return torch.complex64 if self.state_dtype == torch.float32 else p.dtype
        if self.state_dtype is not None:
            return self.state_dtype
        return torch.float32 if self._has_master(p) else p.dtype

    # -- pickling, deepcopy, state_dict ----------------------------------------------------------
    # torch's __getstate__ keeps defaults, state and param_groups only: our options are added, so
    # that a copy (deepcopy, pickle, multiprocessing) continues exactly like the original. The
    # caches (plan, tables) are rebuilt by the copy's first step; hooks are not copied (torch).

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update((name, getattr(self, name)) for name in self._OPTIONS)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for name, value in (("backend", None), ("master_weights", False), ("state_dtype", None),
                            ("stochastic_rounding", False), ("_seed", 0), ("max_grad_norm", None),
                            ("grad_norm_process_group", None), ("grad_norm", None)):
            if not hasattr(self, name):
                setattr(self, name, value)
        self._reset_caches()
        for group in self.param_groups:   # checkpoints of older versions lack the newer flags
            for k, v in self.defaults.items():
                group.setdefault(k, v)

    def __deepcopy__(self, memo: dict) -> "_MultiTensorOptimizer":
        pg = self.grad_norm_process_group
        if pg is not None:   # a handle on a communicator (not picklable): the copy shares it
            memo.setdefault(id(pg), pg)
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new

    def state_dict(self) -> dict[str, Any]:
        """torch's ``Optimizer.state_dict`` (same layout, ids and hooks). With stochastic rounding,
        every param group also carries the seed of the random bits as ``sr_seed``, so that a
        resumed run draws the same bits; ``load_state_dict`` takes it out of the groups."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        # ids as torch numbers them: in order of first appearance across the groups, each group
        # advancing the counter by its length.
        ids: dict[int, int] = {}
        start = 0
        groups = []
        for group in self.param_groups:
            params = group["params"]
            ids.update({id(p): i for i, p in enumerate(params, start) if id(p) not in ids})
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = [ids[id(p)] for p in params]
            if self.stochastic_rounding:
                packed[_SEED_KEY] = self._seed
            start += len(params)
            groups.append(packed)
        state = {(ids[id(k)] if isinstance(k, torch.Tensor) else k): v
                 for k, v in self.state.items()}
        sd = {"state": state, "param_groups": groups}
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``Optimizer.load_state_dict``: pre-hooks see (a shallow copy of) the incoming
        state dict and may edit it or return another; post-hooks run once the state is restored;
        the same checks and messages; ``param_names`` kept. Differences: every loaded tensor is a
        copy (continuing never mutates the checkpoint); ``step`` is a float32 0-d tensor on the
        parameter's device; moments take ``state_dtype`` when set, else the promoted dtype of the
        saved value and the moment dtype this optimizer would create (so float32 moments and
        master weights are never downcast); a malformed checkpoint (a moment of the wrong shape,
        invalid hyperparameters) raises before anything is changed."""
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups = self.param_groups
        saved_groups = copy.deepcopy(state_dict["param_groups"])
        if len(groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)):
            raise ValueError("loaded state dict contains a parameter group "
                             "that doesn't match the size of optimizer's group")
        id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                          chain.from_iterable(g["params"] for g in groups)))
        seed = next((g[_SEED_KEY] for g in saved_groups if _SEED_KEY in g), None)
        for group, saved in zip(groups, saved_groups):
            saved.pop(_SEED_KEY, None)
            saved["params"] = group["params"]
            if "param_names" in group and "param_names" not in saved:
                saved["param_names"] = group["param_names"]
            for k, v in self.defaults.items():
                saved.setdefault(k, v)
            self._check_group(saved)
        state: defaultdict = defaultdict(dict)
        for key, value in state_dict["state"].items():
            param = id_map.get(key)
            if param is None:
                state[key] = value
            elif isinstance(value, dict):
                state[param] = {k: self._load_value(param, k, v, key) for k, v in value.items()}
            else:
                state[param] = self._load_value(param, None, value, key)
        if seed is not None:
            self._seed = int(seed) & 0xFFFFFFFF
        self.__setstate__({"state": state, "param_groups": saved_groups})
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _load_value(self, param: torch.Tensor, key, value, pid):
        where = f"{type(self).__name__}.load_state_dict: state[{pid!r}][{key!r}]"
        if key == "step":
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(f"{where} has {value.numel()} elements, expected one")
            else:
                value = torch.tensor(float(value))
            return value.to(device=param.device, dtype=torch.float32, copy=True).reshape(())
        if not isinstance(value, torch.Tensor):
            return value
        if key in self._MOMENTS or key in ("max_exp_avg_sq", "master_param"):
            if value.shape != param.shape or value.is_complex() != param.is_complex():
                raise ValueError(f"{where} is a {tuple(value.shape)} {value.dtype} tensor, "
                                 f"expected the parameter's shape {tuple(param.shape)} and a "
                                 f"{'complex' if param.is_complex() else 'real'} dtype")
        if key == "master_param":
            return value.to(device=param.device, dtype=torch.float32, copy=True)
        if value.is_floating_point() or value.is_complex():
            dtype = self._moment_dtype(param)
            if self.state_dtype is None:
                dtype = torch.promote_types(value.dtype, dtype)
            return value.to(device=param.device, dtype=dtype, copy=True)
        return value.to(device=param.device, copy=True)

    def _reset_caches(self) -> None:
        """The caches of the step (none is copied or pickled; a copy's first step rebuilds)."""
        name = type(self).__name__
        self._tables = _plan.TableCache(name)
        self._hp = _plan.HpCache(name)
        self._consts: dict[torch.device, tuple] = {}
        self._plan: _plan.StepPlan | None = None
        self._plan_id = 0
        self._clip: tuple | None = None

    def _invalidate(self) -> None:
        self._tables.clear()
        self._hp.clear()
        self._plan = None

    # -- scalars read by the kernels -----------------------------------------------------------

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        c = self._consts.get(device)
        if c is None:
            c = (torch.ones((), dtype=torch.float32, device=device),
                 torch.zeros((), dtype=torch.float32, device=device))
            self._consts[device] = c
        return c

    def _grad_multiplier_and_skip(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 0-d tensors on ``device`` read by the kernels: every gradient is multiplied by
        ``mult`` (1/grad_scale of a GradScaler; gradient clipping multiplies its coefficient in)
        and the whole update is skipped, step counts included, when ``skip`` is nonzero
        (GradScaler's found_inf; clipping adds a non-finite norm). Extend by overriding and
        combining with ``super()``; never synchronises with the host."""
        one, zero = self._constants(device)
        scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        mult = one
        if scale is not None:
            mult = torch.reciprocal(scale.to(device=device, dtype=torch.float32,
                                              non_blocking=True).reshape(()))
        skip = zero
        if found_inf is not None:
            skip = found_inf.to(device=device, dtype=torch.float32, non_blocking=True).reshape(())
        if self._clip is not None:   # fold the clip coefficient and the non-finite-norm flag in
            coef, flag = (t.to(device, non_blocking=True) for t in self._clip)
            mult = coef if mult is one else mult * coef
            skip = flag if skip is zero else torch.maximum(skip, flag)
        return mult, skip

    def _prepare_clip(self, grads) -> None:
        """With ``max_grad_norm`` set: the global L2 norm of the step's gradients, on the device,
        in a constant number of launches (ops/multi_tensor_norm.py; DTensor gradients are reduced
        over their mesh, plain ones over ``grad_norm_process_group`` when set), then the coefficient
        clamp(max_grad_norm / (norm + 1e-6), max=1) that ``_grad_multiplier_and_skip`` folds into
        the kernels' gradient multiplier (gradients are not rewritten) and the flag that skips
        the step when the norm is not finite. Under GradScaler the gradients are scaled: the norm
        of the unscaled ones is norm * (1 / grad_scale). ``self.grad_norm`` keeps the pre-clip
        norm (a float32 0-d tensor)."""
        if self.max_grad_norm is None:
            self._clip = None
            return
        from fused_lm.ops.multi_tensor_norm import clip_coef, multi_tensor_norm, nonfinite_flag

        norm, coef, flag = multi_tensor_norm(grads, 2.0, self.max_grad_norm,
                                             process_group=self.grad_norm_process_group,
                                             backend=self.backend)
        scale = getattr(self, "grad_scale", None)
        if scale is not None:
            norm = norm * torch.reciprocal(scale.to(device=norm.device, dtype=torch.float32,
                                                    non_blocking=True).reshape(()))
            coef, flag = clip_coef(norm, self.max_grad_norm), nonfinite_flag(norm)
        self.grad_norm = norm
        self._clip = (coef, flag)

    def _torch_row(self, group: dict) -> tuple:
        """The hyperparameters of a group for the PyTorch path: tensors as 0-d views, so that
        they broadcast like Python numbers whatever their one-element shape."""
        return tuple(v.reshape(()) if isinstance(v, torch.Tensor) else v
                     for v in self._hp_row(group))

    # -- the step ------------------------------------------------------------------------------

    def _gather(self) -> list[tuple[int, torch.Tensor, torch.Tensor, int]]:
        name = type(self).__name__
        items = []
        pos = -1
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                pos += 1
                g = p.grad
                if g is None:
                    continue
                if p.device.type == "meta" or g.device.type == "meta":
                    raise RuntimeError(f"{name}: a parameter or gradient on the meta device has "
                                       "no data; materialise the module (module.to_empty("
                                       "device=...) and initialise it) before step()")
                if g.is_sparse or g.layout != torch.strided:
                    raise RuntimeError(f"{name} does not support sparse gradients (layout {g.layout}); "
                                       "expected dense gradients")
                if (g.is_complex() or p.is_complex()) and not self._COMPLEX:
                    raise TypeError(f"{name} does not support complex gradients or parameters "
                                    f"(got {g.dtype}); expected a real floating dtype")
                if g.dtype != p.dtype:
                    raise TypeError(f"{name}: gradient dtype {g.dtype} differs from its parameter's "
                                    f"{p.dtype}; expected the same dtype")
                if g.shape != p.shape:
                    raise ValueError(f"{name}: gradient shape {tuple(g.shape)} differs from its "
                                     f"parameter's {tuple(p.shape)}")
                items.append((gi, p, g, pos))
        return items

    def _ensure_state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        sd = self._moment_dtype(p)
        for k in self._MOMENTS:
            if k not in state:
                state[k] = torch.zeros_like(p, dtype=sd, memory_format=torch.preserve_format)
        if self._uses_amsgrad(group) and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(state[self._MOMENTS[-1]],
                                                       memory_format=torch.preserve_format)
        if self._has_master(p) and "master_param" not in state:
            master = torch.empty_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            state["master_param"] = master.copy_(p.detach())
        return state

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step over every parameter with a gradient; returns ``closure()``'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plan, addrs = self._current_plan()
        if plan is None:
            return loss
        self._prepare_clip(None if self.max_grad_norm is None
                           else [p.grad for p in plan.with_grad])
        launches = self._launches(plan, addrs)   # everything that can raise raises here
        for launch in launches:
            launch()
        plan.release_grads()
        return loss

    def _current_plan(self) -> tuple[_plan.StepPlan | None, list]:
        """The plan of this step and each bucket's checked addresses: the kept plan when it still
        applies (same parameters by identity, the same ones without a gradient, the same
        options, every gradient passes ``Bucket.collect``); else a new one, after validating
        every gradient and creating missing state (addresses None: every table is rebuilt and
        validated). (None, []) when no parameter has a gradient."""
        plan = self._plan
        if plan is not None and plan.applies(self._plan_key(), self.param_groups):
            addrs = plan.collect()
            if addrs is not None:
                return plan, addrs
        items = self._gather()
        if not items:
            return None, []
        selected: dict[tuple, str] = {}
        for _, p, _g, _ in items:   # validate backends for every (device, dtype) before any change
            key = (p.device, p.dtype.to_real())
            if key not in selected:
                selected[key] = _backend.select(self._OP, p.device, key[1], self.backend)
        states = [self._ensure_state(p, self.param_groups[gi]) for gi, p, _g, _ in items]
        self._plan_id += 1
        self._plan = plan = _plan.build_plan(
            items, states, self._SPEC, self._MOMENTS, self._uses_amsgrad,
            lambda device, dtype: selected[(device, dtype)], key=self._plan_key(),
            param_groups=self.param_groups, plan_id=self._plan_id)
        return plan, [None] * len(plan.buckets)

    def _plan_key(self) -> tuple:
        return (tuple(len(g["params"]) for g in self.param_groups),
                tuple(self._uses_amsgrad(g) for g in self.param_groups),
                self.master_weights, self.state_dtype, self.backend, _backend.forced())

    def _launches(self, plan: _plan.StepPlan, addrs: list) -> list:
        """Each bucket's launch, ready to call: per device the gradient multiplier and skip flag
        and the kernels' hyperparameter table; per param group the PyTorch path's row; per
        kernel bucket its (validated) tables."""
        scalars: dict[torch.device, tuple] = {}
        hp_tables: dict[torch.device, torch.Tensor] = {}
        torch_rows: dict[int, tuple] = {}
        k, sr, seed = self._KERNELS, self.stochastic_rounding, self._seed
        launches = []
        for b, b_addrs in zip(plan.buckets, addrs):
            if b.device not in scalars:
                scalars[b.device] = self._grad_multiplier_and_skip(b.device)
            mult, skip = scalars[b.device]
            if b.backend == "torch":
                for gi in b.groups:
                    if gi not in torch_rows:
                        torch_rows[gi] = self._torch_row(self.param_groups[gi])
                launches.append(partial(k["torch"], b.lists, [torch_rows[gi] for gi in b.groups],
                                        mult, skip, amsgrad=b.amsgrad, sr=sr, seed=seed,
                                        indices=list(range(len(b.groups)))))
                continue
            if b.device not in hp_tables:
                hp_tables[b.device] = self._hp.get(b.device, [self._hp_row(g)
                                                              for g in self.param_groups])
            table, step_table = self._tables.get(b, b_addrs, plan.id)
            kw = dict(param_dtype=b.param_dtype, state_dtype=b.state_dtype, amsgrad=b.amsgrad,
                      master=b.master, sr=sr, seed=seed)
            if b.backend == "triton":
                launches.append(partial(k["triton"], table, step_table, hp_tables[b.device],
                                        mult, skip, **kw))
            else:
                launches.append(partial(k["compiled"], b.backend, table, step_table,
                                        hp_tables[b.device], mult, skip, **kw))
        return launches


def check_lr_betas(lr, betas, weight_decay, eps=None) -> None:
    """The hyperparameters of a group: torch's checks, order and messages (torch/optim/adam.py).
    lr and the betas may be one-element tensors (both betas, or neither, as torch requires)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr.is_complex() or not lr.is_floating_point():
            raise ValueError(f"Tensor lr must be a real floating tensor, got {lr.dtype}")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if eps is not None and (isinstance(eps, torch.Tensor) or not 0.0 <= eps):
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair of floats, got {betas!r}")
    tensors = [isinstance(b, torch.Tensor) for b in betas]
    for i, b in enumerate(betas):
        if tensors[i] and (b.numel() != 1 or b.is_complex() or not b.is_floating_point()):
            raise ValueError(f"Tensor betas[{i}] must be 1-element, of a real floating dtype")
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b}")
    if isinstance(weight_decay, torch.Tensor) or not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if tensors[0] != tensors[1]:
        raise ValueError("betas must be either both floats or both Tensors")


def to_scalars(betas) -> tuple:
    """The betas as torch stores them: one-element tensors squeezed to 0-d, numbers as given."""
    return tuple(b.squeeze() if isinstance(b, torch.Tensor) and b.dim() != 0 else b for b in betas)


def differentiable_message(name: str) -> str:
    return (f"`fused` does not support `differentiable`: {name} always runs fused kernels, which "
            "autograd does not differentiate through, so differentiable=True is not supported "
            "(torch.optim's for-loop optimizers support it)")


def check_constructor(name: str, lr, betas, weight_decay, eps=None, *, foreach, capturable,
                      differentiable, fused) -> None:
    """A constructor's arguments, in torch's order with torch's errors. Any value of torch's
    ``foreach``, ``fused`` and ``capturable`` is accepted (our step is always multi-tensor, fused
    and capturable), but the combinations torch's constructors reject raise torch's errors, so
    that code which constructs ours also constructs torch's. ``differentiable=True`` cannot run
    here: a clear error."""
    if isinstance(lr, torch.Tensor) and foreach and not capturable:
        raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
    check_lr_betas(lr, betas, weight_decay, eps)
    if foreach and not capturable:
        for i, b in enumerate(betas):
            if isinstance(b, torch.Tensor):
                raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False "
                                 "and foreach=True")
    if differentiable:
        raise RuntimeError(differentiable_message(name))
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
