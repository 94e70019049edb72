"""The multi-tensor optimizer engine shared by fused_lm.optim.AdamW and fused_lm.optim.Lion.

A step:

1. gathers the parameters that have a gradient and validates them all (sparse or complex
   gradients, mismatched dtypes) before anything is modified;
2. creates missing state (torch's layout: ``step`` as a float32 0-d tensor on the parameter's
   device, the moments, and ``master_param`` under the precision menu);
3. groups the parameters into buckets by (backend, device, param dtype, state dtype, variant
   flags) — a bucket is ONE step-increment launch plus ONE update launch whatever the number of
   tensors and param groups;
4. per device, uploads the per-group hyperparameter table ``hp`` (ops/_optim_common.py) and reads
   the GradScaler's ``grad_scale``/``found_inf`` as device scalars ``grad_mult``/``skip``, so
   unscaling and inf-skipping happen inside the kernels with no host synchronisation;
5. launches each bucket on its backend (fused_lm/_backend.py: cuda | triton | cpu | torch) over a
   device tensor table cached between steps. The compiled ops take the tables only (no tensor
   lists), so every list is validated (``mt.check_lists``) when its table is built.

A training loop repeats the same plan (buckets, state) every step: it is cached, and a step only
re-reads the parameters' and gradients' addresses. For plain (non-DTensor) parameters one C++
call per bucket (``fused_lm._C.optim_addresses``; a Python twin when the extension is not built)
checks every gradient (present, dense, the parameter's dtype, shape and device, contiguous for
the kernels) and returns a (3, n) int64 tensor [param addresses; grad addresses; numels],
compared with ``torch.equal`` to the one the table was built from. When only addresses moved
(gradients reallocated after ``zero_grad(set_to_none=True)``, ``p.data`` replaced) the table's
two address columns are patched; when a size changed it is rebuilt and re-validated; when a
check fails the full path runs again (it raises, or re-routes e.g. non-contiguous gradients to
the torch path).

Subclasses define the defaults, the hyperparameter row of a group, the moments of the state and
the kernels (``_KERNELS``).
"""

from __future__ import annotations

import operator
from itertools import chain
from typing import Any

import torch

from fused_lm import _backend
from fused_lm.ops import _multi_tensor as mt
from fused_lm.ops import _optim_common as oc

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (param dtype, state dtype) pairs the compiled and Triton kernels take; others use the torch path.
_KERNEL_PAIRS = {(p, s) for p in _KERNEL_DTYPES for s in (torch.float32, torch.bfloat16, p)}
_SEED_KEY = "sr_seed"   # saved in every param group of state_dict(): resumed runs draw the same bits


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), else the tensor itself: kernels run on shards."""
    return getattr(t, "_local_tensor", t)


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_native_addresses = None   # fused_lm._C.optim_addresses once looked up; False when unavailable


def _addresses_py(params, grads, contiguous: bool) -> torch.Tensor | None:
    """The Python twin of ``fused_lm._C.optim_addresses`` over explicit (local) gradients: the
    (3, n) int64 tensor [param addresses; grad addresses; numels], or None when a gradient is
    missing, not dense, differs from its parameter in dtype, shape or device, the parameters
    differ in dtype or device, or (``contiguous``) a tensor is not contiguous."""
    if not params:
        return torch.zeros((3, 0), dtype=torch.int64)
    dtype, device = params[0].dtype, params[0].device
    for p, g in zip(params, grads):
        if (g is None or g.layout != torch.strided or p.layout != torch.strided
                or p.dtype != dtype or p.device != device or g.dtype != dtype
                or g.device != device or g.shape != p.shape
                or (contiguous and not (p.is_contiguous() and g.is_contiguous()))):
            return None
    return torch.tensor([[p.data_ptr() for p in params], [g.data_ptr() for g in grads],
                         [p.numel() for p in params]], dtype=torch.int64).reshape(3, len(params))


def _addresses(params: list, contiguous: bool) -> torch.Tensor | None:
    """``_addresses_py`` of plain parameters and their ``.grad``: one C++ call when the CPU
    extension is built."""
    global _native_addresses
    if _native_addresses is None:
        from fused_lm import _ext

        _native_addresses = (getattr(_ext.cpu_ext(), "optim_addresses", False)
                             if _ext.has_cpu() else False)
    if _native_addresses:
        return _native_addresses(params, contiguous)
    return _addresses_py(params, [p.grad for p in params], contiguous)


class _Bucket:
    __slots__ = ("backend", "device", "param_dtype", "state_dtype", "amsgrad", "master", "lists",
                 "groups", "pos", "params", "plain")

    def __init__(self, backend, device, param_dtype, state_dtype, amsgrad, master):
        self.backend, self.device = backend, device
        self.param_dtype, self.state_dtype = param_dtype, state_dtype
        self.amsgrad, self.master = amsgrad, master
        self.lists = {k: [] for k in ("params", "grads", "exp_avgs", "exp_avg_sqs",
                                      "max_exp_avg_sqs", "masters", "steps")}
        self.groups: list[int] = []   # param group of each tensor
        self.pos: list[int] = []      # index of each tensor in the optimizer's flat param list
        self.params: list = []        # the parameters themselves (DTensor, not their shards)
        self.plain = True             # every parameter a plain tensor: the C++ address check

    def collect(self) -> torch.Tensor | None:
        """This step's gradients of the bucket's parameters, checked: (3, n) int64 [param
        addresses; grad addresses; numels], or None when a check fails. ``lists["grads"]`` is
        filled only where something reads it (the torch path, DTensor shards); the compiled
        and Triton kernels read the table."""
        kernel = self.backend != "torch"
        if self.plain:
            addrs = _addresses(self.params, kernel)
            if addrs is not None and not kernel:
                self.lists["grads"] = [p.grad for p in self.params]
            return addrs
        grads = []
        for p in self.params:
            g = p.grad
            if g is None:
                return None
            grads.append(_local(g))
        addrs = _addresses_py(self.lists["params"], grads, kernel)
        if addrs is not None:
            self.lists["grads"] = grads
        return addrs


class _MultiTensorOptimizer(torch.optim.Optimizer):
    """Base class: subclasses set ``_OP`` (the _backend op name), ``_MOMENTS`` (state keys of the
    moments, in table order) and ``_KERNELS`` (triton, compiled and torch launchers), and
    implement ``_hp_row`` and ``_uses_amsgrad``."""

    _step_supports_amp_scaling = True
    _OP: str = ""
    _MOMENTS: tuple[str, ...] = ()
    _KERNELS: dict = {}

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
        self._tables: dict[tuple, tuple] = {}
        self._hp: dict[torch.device, tuple] = {}
        self._consts: dict[torch.device, tuple] = {}
        self._plan: tuple | None = None
        self._plan_id = 0
        # Gradient clipping folded into the step (issue 5; see _prepare_clip).
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.grad_norm_process_group = grad_norm_process_group
        self.grad_norm: torch.Tensor | None = None
        self._clip: tuple | None = None
        super().__init__(params, defaults)

    # -- subclass hooks ------------------------------------------------------------------------

    def _hp_row(self, group: dict) -> tuple:
        """(lr, beta1, beta2, eps, weight_decay, maximize) of a group; lr may be a 0-d tensor."""
        raise NotImplementedError

    def _uses_amsgrad(self, group: dict) -> bool:
        return False

    @staticmethod
    def _validate_hparams(group: dict) -> None:
        raise NotImplementedError

    # -- param groups, state_dict --------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_hparams(group)
            for p in group["params"]:
                if p.is_complex():
                    raise TypeError(f"{type(self).__name__} does not support complex parameters "
                                    f"(got {p.dtype}); view them as real with torch.view_as_real")
                if not p.is_floating_point():
                    raise TypeError(f"{type(self).__name__} needs floating-point parameters, got {p.dtype}")
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        self._invalidate()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for name, value in (("backend", None), ("master_weights", False), ("state_dtype", None),
                            ("stochastic_rounding", False), ("_seed", 0), ("max_grad_norm", None),
                            ("grad_norm_process_group", None), ("grad_norm", None), ("_clip", None)):
            if not hasattr(self, name):
                setattr(self, name, value)
        for attr in ("_tables", "_hp", "_consts"):
            setattr(self, attr, {})
        self._plan, self._plan_id = None, 0
        for group in self.param_groups:
            for k, v in self.defaults.items():
                group.setdefault(k, v)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        for group in sd["param_groups"]:
            group[_SEED_KEY] = self._seed
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loader, except that float32 state and master weights are never downcast to the
        parameter dtype (moments take ``state_dtype`` when set, else the promoted dtype of the
        saved value and the parameter), ``step`` lives on the parameter's device, and every
        loaded tensor is a copy (continuing never mutates the checkpoint)."""
        state_dict = dict(state_dict)
        saved_state = state_dict["state"]
        saved_groups = state_dict["param_groups"]
        state_dict["state"] = {}
        super().load_state_dict(state_dict)
        seed = next((g[_SEED_KEY] for g in saved_groups if _SEED_KEY in g), None)
        if seed is not None:
            self._seed = int(seed) & 0xFFFFFFFF
        for group in self.param_groups:
            group.pop(_SEED_KEY, None)
            for k, v in self.defaults.items():
                group.setdefault(k, v)
        id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                          chain.from_iterable(g["params"] for g in self.param_groups)))
        for key, value in saved_state.items():
            if key in id_map:
                param = id_map[key]
                self.state[param] = {k: self._load_value(param, k, v) for k, v in value.items()}
            else:
                self.state[key] = value
        self._invalidate()

    def _load_value(self, param: torch.Tensor, key: str, value):
        if key == "step":
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(float(value))
            return value.to(device=param.device, dtype=torch.float32, copy=True).reshape(())
        if not isinstance(value, torch.Tensor):
            return value
        if key == "master_param":
            return value.to(device=param.device, dtype=torch.float32, copy=True)
        if value.is_floating_point():
            dtype = self.state_dtype or torch.promote_types(value.dtype, param.dtype)
            return value.to(device=param.device, dtype=dtype, copy=True)
        return value.to(device=param.device, copy=True)

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
        in a constant number of launches (fused_lm.optim.clip; DTensor gradients are reduced over
        their mesh, plain ones over ``grad_norm_process_group`` when set), then the coefficient
        clamp(max_grad_norm / (norm + 1e-6), max=1) that ``_grad_multiplier_and_skip`` folds into
        the kernels' gradient multiplier (gradients are not rewritten) and the flag that skips
        the step when the norm is not finite. Under GradScaler the gradients are scaled: the norm
        of the unscaled ones is norm * (1 / grad_scale). ``self.grad_norm`` keeps the pre-clip
        norm (a float32 0-d tensor)."""
        if self.max_grad_norm is None:
            self._clip = None
            return
        from fused_lm.ops.multi_tensor_norm import clip_coef, nonfinite_flag
        from fused_lm.optim.clip import total_norm_coef_flag

        norm, coef, flag = total_norm_coef_flag(grads, 2.0, self.max_grad_norm,
                                                process_group=self.grad_norm_process_group,
                                                backend=self.backend)
        scale = getattr(self, "grad_scale", None)
        if scale is not None:
            norm = norm * torch.reciprocal(scale.to(device=norm.device, dtype=torch.float32,
                                                    non_blocking=True).reshape(()))
            coef, flag = clip_coef(norm, self.max_grad_norm), nonfinite_flag(norm)
        self.grad_norm = norm
        self._clip = (coef, flag)

    def _hp_table(self, device: torch.device) -> torch.Tensor:
        """(n_groups, HP_COLS) float32 on ``device``: cached while the float hyperparameters stay
        the same; 0-d tensor learning rates on a device are copied in on the device."""
        rows, tensor_lrs = [], []
        for gi, group in enumerate(self.param_groups):
            lr, b1, b2, eps, wd, maximize = self._hp_row(group)
            if isinstance(lr, torch.Tensor):
                if lr.device.type == "cpu":
                    lr = float(lr)           # a host value: no device synchronisation
                else:
                    tensor_lrs.append((gi, lr))
                    lr = 0.0
            rows.append((float(lr), float(b1), float(b2), float(eps), float(wd),
                         -1.0 if maximize else 1.0, 0.0, 0.0))
        key = tuple(rows)
        cached = self._hp.get(device)
        if cached is None or cached[0] != key:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    f"{type(self).__name__}: the float hyperparameters changed during CUDA graph "
                    "capture; run one eager step with the same values before capturing, and use "
                    "a 0-d CUDA tensor for a learning rate that changes between replays")
            host = torch.tensor(rows, dtype=torch.float32).reshape(len(rows), oc.HP_COLS)
            base = host if device.type == "cpu" else host.pin_memory().to(device, non_blocking=True)
            cached = (key, base)
            self._hp[device] = cached
        hp = cached[1]
        if tensor_lrs:
            hp = hp.clone()
            for gi, lr in tensor_lrs:
                hp[gi, 0].copy_(lr.reshape(()), non_blocking=True)
        return hp

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
                if g.is_sparse or g.layout != torch.strided:
                    raise RuntimeError(f"{name} does not support sparse gradients (layout {g.layout}); "
                                       "expected dense gradients")
                if g.is_complex() or p.is_complex():
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
        sd = self.state_dtype or p.dtype
        for k in self._MOMENTS:
            if k not in state:
                state[k] = torch.zeros_like(p, dtype=sd, memory_format=torch.preserve_format)
        if self._uses_amsgrad(group) and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(state[self._MOMENTS[-1]],
                                                       memory_format=torch.preserve_format)
        if self.master_weights and p.dtype in (torch.bfloat16, torch.float16) \
                and "master_param" not in state:
            master = torch.empty_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            state["master_param"] = master.copy_(p.detach())
        return state

    def _buckets(self, items) -> list[_Bucket]:
        selected: dict[tuple, str] = {}
        for _, p, _g, _ in items:   # validate backends for every (device, dtype) before any change
            key = (p.device, p.dtype)
            if key not in selected:
                selected[key] = _backend.select(self._OP, p.device, p.dtype, self.backend)
        buckets: dict[tuple, _Bucket] = {}
        for gi, p, g, pos in items:
            group = self.param_groups[gi]
            state = self._ensure_state(p, group)
            amsgrad = self._uses_amsgrad(group)
            lp, lg = _local(p), _local(g)
            moments = [_local(state[k]) for k in self._MOMENTS]
            vmax = _local(state["max_exp_avg_sq"]) if amsgrad else None
            master = _local(state["master_param"]) if "master_param" in state else None
            sdt = moments[0].dtype
            backend = selected[(p.device, p.dtype)]
            if backend != "torch":
                dense = (lp.is_contiguous() and lg.is_contiguous()
                         and all(m.is_contiguous() and m.dtype == sdt for m in moments)
                         and (vmax is None or (vmax.is_contiguous() and vmax.dtype == sdt))
                         and (master is None or master.is_contiguous()))
                if not dense or (p.dtype, sdt) not in _KERNEL_PAIRS:
                    backend = "torch"   # same math in PyTorch, for non-contiguous layouts
            bkey = (backend, lp.device, p.dtype, sdt, amsgrad, master is not None)
            b = buckets.get(bkey)
            if b is None:
                b = buckets[bkey] = _Bucket(backend, lp.device, p.dtype, sdt, amsgrad,
                                            master is not None)
            L = b.lists
            L["params"].append(lp)
            L["grads"].append(lg)
            L["exp_avgs"].append(moments[0])
            if len(moments) > 1:
                L["exp_avg_sqs"].append(moments[1])
            if vmax is not None:
                L["max_exp_avg_sqs"].append(vmax)
            if master is not None:
                L["masters"].append(master)
            L["steps"].append(state["step"])
            b.groups.append(gi)
            b.pos.append(pos)
            b.params.append(p)
            b.plain = b.plain and lp is p and type(p) in _PLAIN_TYPES and type(g) in _PLAIN_TYPES
        return list(buckets.values())

    def _lists(self, b: _Bucket) -> list[list[torch.Tensor]]:
        L = b.lists
        if not L["grads"]:
            L["grads"] = [_local(p.grad) for p in b.params]
        lists = [L["params"], L["grads"], L["exp_avgs"]]
        if L["exp_avg_sqs"]:
            lists.append(L["exp_avg_sqs"])
        if b.amsgrad:
            lists.append(L["max_exp_avg_sqs"])
        if b.master:
            lists.append(L["masters"])
        return lists

    def _table(self, b: _Bucket, addrs: torch.Tensor | None) -> tuple[mt.TensorTable, torch.Tensor]:
        """The bucket's tensor table and step table for this step's ``addrs`` (from
        ``_Bucket.collect``: every gradient already checked against its parameter; None on the
        full path). State, step counters and groups are fixed for a plan (a new plan gets a new
        id); params and grads may move between steps: then only their two address columns are
        rewritten, unless a size changed too (the table is then rebuilt from the re-validated
        lists)."""
        bkey = (b.backend, b.device, b.param_dtype, b.state_dtype, b.amsgrad, b.master)
        cached = self._tables.get(bkey)
        same_plan = addrs is not None and cached is not None and cached[0] == self._plan_id
        if same_plan and torch.equal(cached[1], addrs):
            return cached[2], cached[3]
        if b.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{type(self).__name__}: the parameters, gradients or state changed "
                               "during CUDA graph capture; run one eager step before capturing")
        if same_plan and torch.equal(cached[1][2], addrs[2]):
            _, _, table, step_table, host = cached
            if b.device.type == "cpu":    # the kernels ran synchronously: patch in place
                host[:, :2] = addrs[:2].t()
            else:                         # the previous upload may still read the old copy
                host = host.clone()
                host[:, :2] = addrs[:2].t()
                host = host.pin_memory()
                table = mt.TensorTable(host.to(b.device, non_blocking=True), table.chunks,
                                       table.n_chunks, table.chunk_size, table.lists,
                                       (host, table._host[1]))
        else:
            lists = self._lists(b)
            mt.check_lists(lists)
            table = mt.build_table(lists, b.groups)
            host = table.table if b.device.type == "cpu" else table._host[0]
            if addrs is None:   # [param addresses; grad addresses; numels], as collect() gives
                addrs = host[:, [0, 1, table.lists]].t().contiguous()
            step_table = oc.step_table(b.lists["steps"], b.device)
        self._tables[bkey] = (self._plan_id, addrs, table, step_table, host)
        return table, step_table

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step over every parameter with a gradient; returns ``closure()``'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets, addrs = self._fast_plan()
        items = None
        if buckets is None:
            items = self._gather()
            if not items:
                return loss
            buckets = self._buckets(items)
            self._plan_id += 1
            self._plan = self._new_plan(buckets)
            addrs = [None] * len(buckets)   # new plan: every table is rebuilt and validated
        if not buckets:
            return loss
        if self.max_grad_norm is None:
            self._prepare_clip(None)
        else:
            self._prepare_clip([p.grad for b in buckets for p in b.params] if items is None
                               else [item[2] for item in items])
        scalars: dict[torch.device, tuple] = {}
        hps: dict[torch.device, torch.Tensor] = {}
        k = self._KERNELS
        sr = self.stochastic_rounding
        for b, b_addrs in zip(buckets, addrs):
            if b.device not in scalars:
                scalars[b.device] = self._grad_multiplier_and_skip(b.device)
            mult, skip = scalars[b.device]
            if b.backend == "torch":
                hps = [self._hp_row(self.param_groups[gi]) for gi in b.groups]
                k["torch"](b.lists, hps, mult, skip, amsgrad=b.amsgrad, sr=sr, seed=self._seed,
                           indices=list(range(len(b.groups))))
                continue
            if b.device not in hps:
                hps[b.device] = self._hp_table(b.device)
            table, step_table = self._table(b, b_addrs)
            kw = dict(param_dtype=b.param_dtype, state_dtype=b.state_dtype, amsgrad=b.amsgrad,
                      master=b.master, sr=sr, seed=self._seed)
            if b.backend == "triton":
                k["triton"](table, step_table, hps[b.device], mult, skip, **kw)
            else:
                k["compiled"](b.backend, table, step_table, hps[b.device], mult, skip, **kw)
        for b in buckets:      # hold no gradient between steps (their memory must be reusable)
            b.lists["grads"] = []
        return loss

    # -- the cached step plan --------------------------------------------------------------------
    # Building buckets costs ~10 us per parameter of Python; a training loop repeats the same
    # plan every step (same params with gradients, same state), so the plan is kept and each
    # step only checks that it still applies and re-reads the addresses (module docstring).

    def _plan_key(self) -> tuple:
        return (tuple(len(g["params"]) for g in self.param_groups),
                tuple(self._uses_amsgrad(g) for g in self.param_groups),
                self.master_weights, self.state_dtype, self.backend, _backend.forced())

    def _new_plan(self, buckets: list[_Bucket]) -> tuple:
        self._flat = [p for g in self.param_groups for p in g["params"]]
        no_grad = [p for p in self._flat if p.grad is None]
        return (self._plan_key(), buckets, no_grad)

    def _fast_plan(self):
        """(buckets, this step's addresses of each bucket) when the cached plan still applies:
        the same parameters (by identity), the same ones without a gradient, the same options,
        and every gradient passes ``_Bucket.collect``. Else (None, None): the full path then
        validates, creates state and rebuilds the plan."""
        plan = self._plan
        if plan is None:
            return None, None
        key, buckets, no_grad = plan
        if (self._plan_key() != key
                or not all(map(operator.is_, chain.from_iterable(g["params"]
                                                                 for g in self.param_groups),
                               self._flat))
                or any(p.grad is not None for p in no_grad)):
            return None, None
        addrs = []
        for b in buckets:
            a = b.collect()
            if a is None or (b.params and (b.params[0].dtype != b.param_dtype
                                           or _local(b.params[0]).device != b.device)):
                for b2 in buckets:
                    b2.lists["grads"] = []
                return None, None       # let the full path raise or re-route
            addrs.append(a)
        return buckets, addrs


def check_lr_betas(lr, betas, weight_decay, eps=None) -> None:
    """torch's validation and messages (torch/optim/adam.py)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr.is_complex() or not lr.is_floating_point():
            raise ValueError(f"Tensor lr must be a real floating tensor, got {lr.dtype}")
    elif not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if eps is not None and not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair of floats, got {betas!r}")
    if any(isinstance(b, torch.Tensor) for b in betas):
        raise ValueError("betas must be floats (tensor betas are not supported)")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if isinstance(weight_decay, torch.Tensor) or not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
