"""The step plan of the multi-tensor optimizers and the caches a step reads.

A training loop repeats the same step: the same parameters with gradients, the same state, the
same options. What that step launches is built once, by ``build_plan`` (a function of the
gathered parameters, their state and the backend chosen per (device, dtype); it changes nothing),
and kept as a ``StepPlan``: its buckets, one per (backend, device, param dtype, state dtype,
variant flags), each ONE step-increment launch plus ONE update launch whatever the number of
tensors and param groups. A later step only checks that the plan still applies and re-reads the
parameters' and gradients' addresses (``StepPlan.collect``).

For plain (non-DTensor) parameters one C++ call per bucket (``fused_lm._C.optim_addresses``; a
Python twin when the extension is not built) checks every gradient (present, dense, the
parameter's dtype, shape and device, contiguous for the kernels) and returns a (3, n) int64 tensor
[param addresses; grad addresses; numels]. ``TableCache`` compares it with ``torch.equal`` to the
one the bucket's device tensor table was built from: when only addresses moved (gradients
reallocated after ``zero_grad(set_to_none=True)``, ``p.data`` replaced) the table's two address
columns are patched; when a size changed the table is rebuilt and re-validated. ``HpCache`` keeps
the per-group hyperparameter table on each device while the float hyperparameters stay the same.
"""

from __future__ import annotations

import dataclasses
import operator
from itertools import chain

import torch

from fused_lm.ops import _multi_tensor as mt
from fused_lm.ops import _optim_common as oc

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (param dtype, state dtype) pairs the compiled and Triton kernels take; others use the torch path.
KERNEL_PAIRS = {(p, s) for p in _KERNEL_DTYPES for s in (torch.float32, torch.bfloat16, p)}
# The per-tensor lists a bucket keeps, by name. The kernels take them in the order of
# ``Bucket.kernel_lists``: params, grads, the moments, then the optional ones.
LIST_NAMES = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "masters", "steps")


def kview(t: torch.Tensor) -> torch.Tensor:
    """What the kernels update for ``t``: its local shard, seen as real when complex. torch's
    AdamW runs complex parameters, gradients and moments through ``view_as_real`` (real and
    imaginary parts are independent coordinates), so the same elementwise update on the real
    view is exactly torch's; it then shares buckets with real parameters of that dtype."""
    t = mt.local_shard(t)
    return torch.view_as_real(t) if t.is_complex() else t


_native_addresses = None   # fused_lm._C.optim_addresses once looked up; False when unavailable


def addresses_py(params, grads, contiguous: bool) -> torch.Tensor | None:
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


def addresses(params: list, contiguous: bool) -> torch.Tensor | None:
    """``addresses_py`` of plain parameters and their ``.grad``: one C++ call when the CPU
    extension is built."""
    global _native_addresses
    if _native_addresses is None:
        from fused_lm import _ext

        _native_addresses = (getattr(_ext.cpu_ext(), "optim_addresses", False)
                             if _ext.has_cpu() else False)
    if _native_addresses:
        return _native_addresses(params, contiguous)
    return addresses_py(params, [p.grad for p in params], contiguous)


@dataclasses.dataclass(frozen=True)
class BucketKey:
    """What one launch pair shares: the backend, device, dtypes and kernel variant."""
    backend: str
    device: torch.device
    param_dtype: torch.dtype
    state_dtype: torch.dtype
    amsgrad: bool
    master: bool


class Bucket:
    """The tensors of one launch pair: per-tensor lists by name (``LIST_NAMES``), the param group
    and flat position of each tensor, and the parameters themselves (DTensor, not shards)."""

    __slots__ = ("key", "layout", "lists", "groups", "pos", "params", "plain")

    def __init__(self, key: BucketKey, layout: tuple[str, ...]):
        self.key = key
        self.layout = layout   # the kernels' list order (the family's SPEC.layout)
        self.lists: dict[str, list] = {k: [] for k in LIST_NAMES}
        self.groups: list[int] = []
        self.pos: list[int] = []
        self.params: list = []
        self.plain = True   # every parameter a plain tensor: the C++ address check applies

    backend = property(lambda self: self.key.backend)
    device = property(lambda self: self.key.device)
    param_dtype = property(lambda self: self.key.param_dtype)
    state_dtype = property(lambda self: self.key.state_dtype)
    amsgrad = property(lambda self: self.key.amsgrad)
    master = property(lambda self: self.key.master)

    def collect(self) -> torch.Tensor | None:
        """This step's gradients of the bucket's parameters, checked: (3, n) int64 [param
        addresses; grad addresses; numels], or None when a check fails. ``lists["grads"]`` is
        filled only where something reads it (the torch path, DTensor shards); the compiled
        and Triton kernels read the table."""
        kernel = self.backend != "torch"
        if self.plain:
            first = self.params[0] if self.params else None
            addrs = addresses(self.params, kernel)
            if addrs is not None and not kernel:
                self.lists["grads"] = [p.grad for p in self.params]
        else:
            # Views (shards, real views of complex tensors) are taken again: ``p.data`` may have
            # been replaced since the plan was built.
            views, grads = [], []
            for p in self.params:
                g = p.grad
                if g is None:
                    return None
                views.append(kview(p))
                grads.append(kview(g))
            first = views[0] if views else None
            addrs = addresses_py(views, grads, kernel)
            if addrs is not None:
                self.lists["params"], self.lists["grads"] = views, grads
        if addrs is not None and first is not None and (first.dtype != self.param_dtype
                                                        or first.device != self.device):
            return None
        return addrs

    def kernel_lists(self) -> list[list[torch.Tensor]]:
        """The lists in the kernels' order, ``layout`` (from the family's SPEC, which the Triton
        kernels' row offsets and the C++ functors' list indices follow too)."""
        if not self.lists["grads"]:
            self.lists["grads"] = [kview(p.grad) for p in self.params]
        return [self.lists[name] for name in self.layout]


@dataclasses.dataclass
class StepPlan:
    """What a step launches: the buckets, and what decides whether the plan still applies (the
    options it was built under, the flat parameter list by identity, the parameters that had no
    gradient). ``id`` is new for every plan: tables of an older plan are rebuilt."""
    key: tuple
    flat: list
    with_grad: list
    no_grad: list
    buckets: list[Bucket]
    id: int

    def applies(self, key: tuple, param_groups: list[dict]) -> bool:
        return (key == self.key
                and all(map(operator.is_, chain.from_iterable(g["params"] for g in param_groups),
                            self.flat))
                and len(self.flat) == sum(len(g["params"]) for g in param_groups)
                and not any(p.grad is not None for p in self.no_grad))

    def collect(self) -> list[torch.Tensor] | None:
        """Each bucket's checked addresses (``Bucket.collect``), or None when a check fails (the
        full path then raises or re-routes)."""
        addrs = []
        for b in self.buckets:
            a = b.collect()
            if a is None:
                self.release_grads()
                return None
            addrs.append(a)
        return addrs

    def release_grads(self) -> None:
        """Holds no gradient between steps (their memory must be reusable)."""
        for b in self.buckets:
            b.lists["grads"] = []


def build_plan(items, states, spec, moments: tuple[str, ...], amsgrad_of, backend_of, *,
               key: tuple, param_groups: list[dict], plan_id: int) -> StepPlan:
    """The plan of ``items`` ((group index, param, grad, flat position) of every parameter with a
    gradient, validated) whose state already exists (``states[i]`` of ``items[i]``), for the
    family ``spec`` (ops/_spec.py: the order of the kernels' lists).
    ``backend_of(device, dtype)`` is the backend chosen for the kernels; parameters they cannot
    take (non-contiguous layouts, dtype pairs outside ``KERNEL_PAIRS``) take the torch path in
    buckets of their own. Changes nothing."""
    buckets: dict[BucketKey, Bucket] = {}
    for (gi, p, g, pos), state in zip(items, states):
        amsgrad = amsgrad_of(param_groups[gi])
        lp, lg = kview(p), kview(g)
        ms = [kview(state[k]) for k in moments]
        vmax = kview(state["max_exp_avg_sq"]) if amsgrad else None
        master = mt.local_shard(state["master_param"]) if "master_param" in state else None
        pdt, sdt = lp.dtype, ms[0].dtype
        backend = backend_of(p.device, pdt)
        if backend != "torch":
            dense = (lp.is_contiguous() and lg.is_contiguous()
                     and all(m.is_contiguous() and m.dtype == sdt for m in ms)
                     and (vmax is None or (vmax.is_contiguous() and vmax.dtype == sdt))
                     and (master is None or master.is_contiguous()))
            if not dense or (pdt, sdt) not in KERNEL_PAIRS:
                backend = "torch"   # same math in PyTorch, for the layouts the kernels do not take
        bkey = BucketKey(backend, lp.device, pdt, sdt, amsgrad, master is not None)
        b = buckets.get(bkey)
        if b is None:
            layout = spec.layout(**spec.pick(amsgrad=amsgrad, master=master is not None))
            b = buckets[bkey] = Bucket(bkey, layout)
        L = b.lists
        L["params"].append(lp)
        L["grads"].append(lg)
        L["exp_avgs"].append(ms[0])
        if len(ms) > 1:
            L["exp_avg_sqs"].append(ms[1])
        if vmax is not None:
            L["max_exp_avg_sqs"].append(vmax)
        if master is not None:
            L["masters"].append(master)
        L["steps"].append(state["step"])
        b.groups.append(gi)
        b.pos.append(pos)
        b.params.append(p)
        b.plain = b.plain and lp is p and type(p) in mt.PLAIN_TYPES and type(g) in mt.PLAIN_TYPES
    flat = [p for grp in param_groups for p in grp["params"]]
    with_grad = [item[1] for item in items]
    return StepPlan(key, flat, with_grad, [p for p in flat if p.grad is None],
                    list(buckets.values()), plan_id)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


@dataclasses.dataclass
class _TableEntry:
    plan_id: int
    addrs: torch.Tensor      # (3, n) [param addresses; grad addresses; numels] it was built from
    table: mt.TensorTable
    step_table: torch.Tensor
    host: torch.Tensor       # the host copy of the table (the table itself on the CPU)


class TableCache:
    """Each bucket's device tensor table and step table, kept between steps of a plan."""

    def __init__(self, owner: str):
        self.owner = owner
        self._entries: dict[BucketKey, _TableEntry] = {}

    def clear(self) -> None:
        self._entries.clear()

    def get(self, b: Bucket, addrs: torch.Tensor | None, plan_id: int
            ) -> tuple[mt.TensorTable, torch.Tensor]:
        """The tables for this step's ``addrs`` (from ``Bucket.collect``: every gradient already
        checked against its parameter; None on the full path). State, step counters and groups
        are fixed for a plan; params and grads may move between steps: then only their two
        address columns are rewritten, unless a size changed too (the table is then rebuilt
        from the re-validated lists)."""
        e = self._entries.get(b.key)
        same_plan = addrs is not None and e is not None and e.plan_id == plan_id
        if same_plan and torch.equal(e.addrs, addrs):
            return e.table, e.step_table
        if _capturing(b.device):
            raise RuntimeError(f"{self.owner}: the parameters, gradients or state changed during "
                               "CUDA graph capture; run one eager step before capturing")
        if same_plan and torch.equal(e.addrs[2], addrs[2]):
            table, step_table, host = e.table, e.step_table, e.host
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
            lists = b.kernel_lists()
            mt.check_lists(lists)
            table = mt.build_table(lists, b.groups)
            host = table.table if b.device.type == "cpu" else table._host[0]
            if addrs is None:   # [param addresses; grad addresses; numels], as collect() gives
                addrs = host[:, [0, 1, table.lists]].t().contiguous()
            step_table = oc.step_table(b.lists["steps"], b.device)
        self._entries[b.key] = _TableEntry(plan_id, addrs, table, step_table, host)
        return table, step_table


@dataclasses.dataclass
class _HpEntry:
    rows: tuple        # the float rows the table holds
    table: torch.Tensor


class HpCache:
    """The (n_groups, HP_COLS) float32 hyperparameter table of each device, uploaded again only
    when a float hyperparameter changed."""

    def __init__(self, owner: str):
        self.owner = owner
        self._entries: dict[torch.device, _HpEntry] = {}

    def clear(self) -> None:
        self._entries.clear()

    def get(self, device: torch.device, rows: list[list]) -> torch.Tensor:
        """``rows``: per group (lr, beta1, beta2, eps, weight_decay, maximize); lr and the betas
        may be one-element tensors. On the host they are read as floats (no device
        synchronisation); on a device they are copied into the table on the device."""
        floats, on_device = [], []
        for gi, row in enumerate(rows):
            row = list(row)
            for col in range(3):                     # lr, beta1, beta2
                v = row[col]
                if isinstance(v, torch.Tensor):
                    if v.device.type == "cpu":
                        row[col] = float(v)
                    else:
                        on_device.append((gi, col, v))
                        row[col] = 0.0
            lr, b1, b2, eps, wd, maximize = row
            floats.append((float(lr), float(b1), float(b2), float(eps), float(wd),
                           -1.0 if maximize else 1.0, 0.0, 0.0))
        key = tuple(floats)
        e = self._entries.get(device)
        if e is None or e.rows != key:
            if _capturing(device):
                raise RuntimeError(
                    f"{self.owner}: the float hyperparameters changed during CUDA graph capture; "
                    "run one eager step with the same values before capturing, and use a 0-d "
                    "CUDA tensor for a learning rate that changes between replays")
            host = torch.tensor(floats, dtype=torch.float32).reshape(len(floats), oc.HP_COLS)
            base = host if device.type == "cpu" else host.pin_memory().to(device, non_blocking=True)
            e = self._entries[device] = _HpEntry(key, base)
        hp = e.table
        if on_device:
            hp = hp.clone()
            for gi, col, v in on_device:
                hp[gi, col].copy_(v.reshape(()), non_blocking=True)
        return hp
