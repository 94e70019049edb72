#!/usr/bin/env python
"""Smoke run of every kernel: each op x dtype x backend once at a small and at a realistic size,
checked against its fused_lm.reference twin, one PASS/FAIL line each, written and flushed the
moment the case ends.

    python tools/gpu_smoke.py                       # CUDA when present, else the CPU backends
    python tools/gpu_smoke.py --log smoke.log --deadline 60 --quiet
    python tools/gpu_smoke.py --list                # the cases, nothing run
    python tools/gpu_smoke.py --only attention --sizes small

Attribution of a crash to one case:
* every case ends with ``torch.cuda.synchronize()`` (and CUDA_LAUNCH_BLOCKING=1 is set), so an
  asynchronous fault (illegal address, misaligned access, device-side assert) surfaces in the case
  that launched it, not in a later one;
* such a fault is sticky: the CUDA context of the process is lost and every later CUDA call of
  that process fails. Cases therefore run in worker processes, one per family, and after any
  exception the worker probes its context with a tiny kernel; when the probe fails it reports the
  case as FAIL and exits, and a fresh worker continues with the next case of the family;
* a worker that dies (segfault, abort) or exceeds the per-case timeout is killed and replaced the
  same way; the case it was running (announced before it started) gets the FAIL line.
Families run in parallel workers (separate processes, so separate CUDA contexts: a fault in one
cannot poison another), which also spreads Triton's JIT compilation over the host's cores.

The check is loose on purpose (SMOKE_BOUND: TF32-level for fp32, a few storage roundings for
16-bit): indexing, masking and synchronisation bugs give errors of order one; precision is what
the tests check. Exit status 0 when every case passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import math
import os
import selectors
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FAMILIES = ("multi_tensor", "optim", "clip", "losses", "attention")
DTYPES = ("fp32", "bf16", "fp16")


@dataclass
class Case:
    id: str                  # family/op[variant]/dtype/backend/size
    family: str
    run: Callable[[], tuple[float, float]]   # -> (relative error, bound)


# ----------------------------------------------------------------------------------------------
# Cases (built in the worker; the parent only needs their ids)
# ----------------------------------------------------------------------------------------------

def _torch():
    import torch

    return torch


def _dt(name: str):
    torch = _torch()
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def smoke_bound(dtype: str) -> float:
    return {"fp32": 5e-3, "bf16": 5e-2, "fp16": 1e-2}[dtype]


def _rel(actual, expected) -> float:
    from tests._helpers import rel_error

    return rel_error(actual, expected)


def _flat(ts):
    torch = _torch()
    return torch.cat([t.detach().reshape(-1).double().cpu() for t in ts]) if ts else torch.zeros(0)


def _shapes(size: str) -> list[tuple[int, ...]]:
    """small: odd sizes, empty and single-element tensors; realistic: GPT-2 small's embedding and
    one transformer block (45M elements: several chunks per tensor, large grids)."""
    if size == "small":
        return [(3,), (1000,), (33, 65), (1,), (0,), (7001,)]
    d, v, ctx = 768, 50257, 1024
    return [(v, d), (ctx, d), (d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,),
            (4 * d, d), (4 * d,), (d, 4 * d), (d,)]


def _tensors(size, dtype, device, scale=1.0):
    torch = _torch()
    return [(torch.randn(s, device=device) * scale).to(_dt(dtype)) for s in _shapes(size)]


def _backends(op: str, device) -> list[str]:
    from fused_lm import _backend

    out = []
    for b in _backend.OPS[op].backends:
        if device.type == "cuda" and b in ("cuda", "triton", "torch"):
            out.append(b)          # cuda kept even when _C_cuda is missing: its cases then FAIL
        elif device.type == "cpu" and b in ("cpu", "torch"):
            out.append(b)
        elif device.type == "cpu" and b == "triton" and _backend.interpreter_on():
            out.append(b)
    return out


def multi_tensor_cases(device, sizes) -> list[Case]:
    from fused_lm.ops.multi_tensor_clamp import multi_tensor_clamp_
    from fused_lm.ops.multi_tensor_norm import multi_tensor_norm
    from fused_lm.ops.multi_tensor_scale import multi_tensor_scale_
    from fused_lm.reference import multi_tensor_clamp as rclamp
    from fused_lm.reference import multi_tensor_norm as rnorm
    from fused_lm.reference import multi_tensor_scale as rscale

    cases = []
    for size in sizes:
        for dt in DTYPES:
            for b in _backends("multi_tensor_scale", device):
                def scale(size=size, dt=dt, b=b):
                    xs = _tensors(size, dt, device)
                    expected = rscale.multi_tensor_scale(xs, 0.37)
                    multi_tensor_scale_(xs, 0.37, backend=b)
                    return _rel(_flat(xs), _flat(expected)), smoke_bound(dt)
                cases.append(Case(f"multi_tensor/scale/{dt}/{b}/{size}", "multi_tensor", scale))
            for b in _backends("multi_tensor_norm", device):
                def norm(size=size, dt=dt, b=b):
                    xs = _tensors(size, dt, device)
                    got = multi_tensor_norm(xs, 2.0, backend=b).norm
                    return _rel(got.double().cpu(), rnorm.total_norm(xs, 2.0)), smoke_bound(dt)
                cases.append(Case(f"multi_tensor/norm/{dt}/{b}/{size}", "multi_tensor", norm))
            for b in _backends("multi_tensor_clamp", device):
                def clamp(size=size, dt=dt, b=b):
                    xs = _tensors(size, dt, device, scale=2.0)
                    expected = rclamp.clip_grad_value(xs, 1.5)
                    multi_tensor_clamp_(xs, -1.5, 1.5, backend=b)
                    return _rel(_flat(xs), _flat(expected)), smoke_bound(dt)
                cases.append(Case(f"multi_tensor/clamp/{dt}/{b}/{size}", "multi_tensor", clamp))
    return cases


# (name, optimizer, options): the optimizer variants, each against the reference step.
OPTIM_VARIANTS = [
    ("adamw", "AdamW", {}),
    ("adamw+amsgrad", "AdamW", {"amsgrad": True}),
    ("adamw+master", "AdamW", {"master_weights": True}),
    ("adamw+bf16state", "AdamW", {"state_dtype": "bf16"}),
    ("lion", "Lion", {}),
    ("lion+master", "Lion", {"master_weights": True}),
    ("lion+bf16state", "Lion", {"state_dtype": "bf16"}),
]


def optim_cases(device, sizes) -> list[Case]:
    cases = []
    for size in sizes:
        for name, cls, opts in OPTIM_VARIANTS:
            for dt in DTYPES:
                if opts.get("master_weights") and dt == "fp32":
                    continue          # master weights exist only for 16-bit parameters
                for b in _backends(cls.lower(), device):
                    def run(size=size, dt=dt, b=b, cls=cls, opts=opts):
                        return _optim_case(cls, opts, size, dt, b, device)
                    cases.append(Case(f"optim/{name}/{dt}/{b}/{size}", "optim", run))
    return cases


def _optim_case(cls, opts, size, dt, backend, device):
    """Two steps with a large learning rate (so a missing or wrong update is an order-one error
    in the parameters) against reference.adamw_step / lion_step on clones, including the state."""
    torch = _torch()
    import fused_lm.optim as fo
    from fused_lm.reference import adamw as radamw
    from fused_lm.reference import lion as rlion

    kw = dict(opts)
    if "state_dtype" in kw:
        kw["state_dtype"] = _dt(kw["state_dtype"])
    lr, wd = 0.05, 0.1
    params = [p.requires_grad_() for p in _tensors(size, dt, device)]
    ref_p = [p.detach().clone() for p in params]
    opt = getattr(fo, cls)(params, lr=lr, weight_decay=wd, backend=backend, **kw)
    ref_state = []
    for step in range(1, 3):
        grads = [torch.randn_like(p, dtype=torch.float32).to(p.dtype) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for i, (p, g) in enumerate(zip(ref_p, grads)):
            st = opt.state[params[i]]
            if step == 1:
                ref_state.append({k: torch.zeros_like(v) for k, v in st.items()
                                  if k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")})
                if "master_param" in st:
                    ref_state[i]["master"] = p.detach().float().clone()
            rs = ref_state[i]
            group = opt.param_groups[0]
            if cls == "AdamW":
                radamw.adamw_step(p, g, rs["exp_avg"], rs["exp_avg_sq"], step, lr=lr,
                               beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                               weight_decay=wd, amsgrad=bool(kw.get("amsgrad")),
                               max_exp_avg_sq=rs.get("max_exp_avg_sq"), master=rs.get("master"))
            else:
                rlion.lion_step(p, g, rs["exp_avg"], lr=lr, beta1=group["betas"][0],
                              beta2=group["betas"][1], weight_decay=wd, master=rs.get("master"))
    err = _rel(_flat(params), _flat(ref_p))
    err = max(err, _rel(_flat([opt.state[p]["exp_avg"] for p in params]),
                        _flat([rs["exp_avg"] for rs in ref_state])))
    bound = smoke_bound("bf16" if kw.get("state_dtype") is not None else dt)
    return err, bound


def clip_cases(device, sizes) -> list[Case]:
    import fused_lm
    from fused_lm.reference import multi_tensor_norm as rnorm

    cases = []
    for size in sizes:
        for dt in DTYPES:
            for b in _backends("multi_tensor_norm", device):
                def run(size=size, dt=dt, b=b):
                    torch = _torch()
                    params = [torch.nn.Parameter(x) for x in _tensors(size, dt, device)]
                    for p in params:
                        p.grad = torch.randn_like(p, dtype=torch.float32).to(p.dtype)
                    expected, norm_ref = rnorm.clip_grad_norm([p.grad for p in params], 1.0)
                    norm = fused_lm.clip_grad_norm_(params, 1.0, backend=b)
                    err = _rel(norm.double().cpu(), norm_ref)
                    return max(err, _rel(_flat([p.grad for p in params]), _flat(expected))), smoke_bound(dt)
                cases.append(Case(f"clip/clip_grad_norm_/{dt}/{b}/{size}", "clip", run))
    return cases


def loss_cases(device, sizes) -> list[Case]:
    cases = []
    for size in sizes:
        for dt in DTYPES:
            for b in _backends("cross_entropy", device):
                cases.append(Case(f"losses/cross_entropy/{dt}/{b}/{size}", "losses",
                                  lambda size=size, dt=dt, b=b: _ce_case(size, dt, b, device)))
            for b in _backends("linear_cross_entropy", device):
                cases.append(Case(f"losses/linear_cross_entropy/{dt}/{b}/{size}", "losses",
                                  lambda size=size, dt=dt, b=b: _lce_case(size, dt, b, device)))
    return cases


def _targets(n, v, device):
    torch = _torch()
    t = torch.randint(0, v, (n,), device=device)
    t[::7] = -100                                    # some ignored rows
    return t


def _ce_case(size, dt, backend, device):
    """Forward and backward (logits gradient) with label smoothing and ignored rows."""
    torch = _torch()
    from fused_lm.ops.cross_entropy import cross_entropy
    from fused_lm.reference import cross_entropy as rce

    n, v = (37, 1001) if size == "small" else (4096, 50257)
    x = (torch.randn(n, v, device=device) * 2).to(_dt(dt)).requires_grad_()
    t = _targets(n, v, device)
    loss = cross_entropy(x, t, label_smoothing=0.1, backend=backend)
    loss.backward()
    xr = x.detach().double().requires_grad_()
    lr_ = rce.cross_entropy(xr, t, label_smoothing=0.1)
    lr_.backward()
    err = max(_rel(loss.detach().double().cpu(), lr_.detach().cpu()), _rel(x.grad, xr.grad))
    return err, smoke_bound(dt)


def _lce_case(size, dt, backend, device):
    """Linear layer + cross-entropy, forward and the input/weight gradients."""
    torch = _torch()
    from fused_lm.ops.linear_cross_entropy import linear_cross_entropy
    from fused_lm.reference import linear_cross_entropy as rlce

    n, h, v = (33, 40, 517) if size == "small" else (2048, 768, 50257)
    x = torch.randn(n, h, device=device).to(_dt(dt)).requires_grad_()
    w = (torch.randn(v, h, device=device) / math.sqrt(h)).to(_dt(dt)).requires_grad_()
    t = _targets(n, v, device)
    loss = linear_cross_entropy(x, w, t, backend=backend)
    loss.backward()
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    lr_ = rlce.linear_cross_entropy(xr, wr, t)
    lr_.backward()
    err = max(_rel(loss.detach().double().cpu(), lr_.detach().cpu()), _rel(x.grad, xr.grad),
              _rel(w.grad, wr.grad))
    return err, smoke_bound(dt)


# (name, shapes (B, Nq, Hq, Hkv, D) or (varlen lengths, Hq, Hkv, D), causal) per size. Both sizes
# share head dims and flags, so the realistic case reuses the kernels JIT-compiled for the small one.
ATTENTION_VARIANTS = {
    "small": [("causal", (2, 37, 3, 3, 64), True), ("gqa", (1, 45, 4, 2, 128), False),
              ("varlen", ([17, 1, 40], 4, 2, 64), True)],
    "realistic": [("causal", (4, 1024, 12, 12, 64), True), ("gqa", (2, 1024, 16, 4, 128), False),
                  ("varlen", ([1000, 1, 513, 2047, 300], 12, 4, 64), True)],
}


def attention_cases(device, sizes) -> list[Case]:
    cases = []
    for size in sizes:
        for name, shape, causal in ATTENTION_VARIANTS[size]:
            for dt in DTYPES:
                for b in _backends("attention", device):
                    cases.append(Case(f"attention/{name}/{dt}/{b}/{size}", "attention",
                                      lambda shape=shape, causal=causal, dt=dt, b=b, name=name:
                                      _attention_case(name, shape, causal, dt, b, device)))
    return cases


def _attention_case(name, shape, causal, dt, backend, device):
    """Forward and backward (dq, dk, dv) against the reference in float64."""
    torch = _torch()
    from fused_lm.nn.functional import flash_attention
    from fused_lm.reference import attention as ratt

    kw = {"causal": causal}
    if name == "varlen":
        lengths, hq, hkv, d = shape
        cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
        qs, ks = (sum(lengths), hq, d), (sum(lengths), hkv, d)
        kw.update(cu_seqlens_q=cu, cu_seqlens_k=cu)
    else:
        b, n, hq, hkv, d = shape
        qs, ks = (b, n, hq, d), (b, n, hkv, d)
    q = torch.randn(qs, device=device).to(_dt(dt)).requires_grad_()
    k = torch.randn(ks, device=device).to(_dt(dt)).requires_grad_()
    v = torch.randn(ks, device=device).to(_dt(dt)).requires_grad_()
    extra = {"max_seqlen_q": max(shape[0]), "max_seqlen_k": max(shape[0])} if name == "varlen" else {}
    out = flash_attention(q, k, v, backend=backend, **kw, **extra)
    dout = torch.randn_like(out)
    out.backward(dout)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = ratt.attention(qr, kr, vr, **kw)
    expected.backward(dout.double())
    err = max(_rel(out, expected), _rel(q.grad, qr.grad), _rel(k.grad, kr.grad), _rel(v.grad, vr.grad))
    return err, smoke_bound(dt)


BUILDERS = {"multi_tensor": multi_tensor_cases, "optim": optim_cases, "clip": clip_cases,
            "losses": loss_cases, "attention": attention_cases}


def all_cases(device, families, sizes) -> list[Case]:
    out = []
    for fam in families:
        out += BUILDERS[fam](device, sizes)
    return out


# ----------------------------------------------------------------------------------------------
# Worker: runs its cases in order, one line per case on stdout
# ----------------------------------------------------------------------------------------------

def _context_alive(device) -> bool:
    torch = _torch()
    if device.type != "cuda":
        return True
    try:
        x = torch.ones(4, device=device)
        torch.cuda.synchronize(device)
        return float((x + 1).sum().item()) == 8.0
    except Exception:
        return False


def worker(device_name: str, ids: list[str]) -> int:
    torch = _torch()
    torch.manual_seed(0)
    device = torch.device(device_name)
    families = sorted({i.split("/")[0] for i in ids})
    sizes = sorted({i.split("/")[-1] for i in ids})
    table = {c.id: c for c in all_cases(device, families, sizes)}
    # Fault injection for the tests of this script (tests/test_gpu_check_tooling.py):
    # FUSED_LM_SMOKE_INJECT="crash=<id>;hang=<id>;lost=<id>" makes that case abort the process,
    # sleep forever, or fail like a sticky CUDA error (context lost).
    inject = dict(kv.split("=", 1)[::-1] for kv in os.environ.get("FUSED_LM_SMOKE_INJECT", "").split(";") if "=" in kv)
    for cid in ids:
        print(f"START {cid}", flush=True)
        t0 = time.perf_counter()
        lost = False
        try:
            fault = inject.get(cid)
            if fault == "crash":
                os.abort()
            elif fault == "hang":
                time.sleep(3600)
            elif fault == "lost":
                lost = True
                raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
            err, bound = table[cid].run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ms = (time.perf_counter() - t0) * 1e3
            ok = math.isfinite(err) and err <= bound
            print(f"{'PASS' if ok else 'FAIL'} {cid} rel_err={err:.2e} (bound {bound:.0e}) {ms:.0f} ms",
                  flush=True)
        except Exception as exc:  # one case's failure is reported, the next case runs
            msg = (str(exc).strip().splitlines() or [""])[0][:300]
            alive = _context_alive(device) and not lost
            tail = "" if alive else " [CUDA context lost: a fresh worker takes the next case]"
            print(f"FAIL {cid} {type(exc).__name__}: {msg}{tail}", flush=True)
            if not alive:
                return 3
        finally:
            # Free the case's tensors before the next (realistic sizes take GBs).
            if device.type == "cuda":
                try:
                    torch.cuda.empty_cache()
                except Exception:
                    pass
    return 0


# ----------------------------------------------------------------------------------------------
# Parent: one worker per family in parallel, restarts, time limits, the log
# ----------------------------------------------------------------------------------------------

class Family:
    def __init__(self, name: str, ids: list[str]):
        self.name, self.pending, self.proc, self.current = name, list(ids), None, None
        self.started = 0.0
        self.buf = {"out": b"", "err": b""}
        self.err_tail: list[str] = []
        self.ran_any = False                 # the current worker has started a case


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    p.add_argument("--only", default="", help="families: " + ", ".join(FAMILIES))
    p.add_argument("--sizes", default="small,realistic")
    p.add_argument("--log", type=Path, default=None, help="append the PASS/FAIL lines here too")
    p.add_argument("--case-timeout", type=float, default=90.0, help="seconds one case may take")
    p.add_argument("--deadline", type=float, default=None, help="seconds for the whole smoke run")
    p.add_argument("--quiet", action="store_true", help="print only FAIL lines and the summary")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.worker is not None:
        return worker(str(device), args.worker.split(","))
    families = [f for f in (args.only.split(",") if args.only else FAMILIES) if f]
    unknown = set(families) - set(FAMILIES)
    if unknown:
        p.error(f"unknown families {sorted(unknown)}; known: {', '.join(FAMILIES)}")
    sizes = [s for s in args.sizes.split(",") if s]
    cases = all_cases(device, families, sizes)
    if args.list:
        for c in cases:
            print(c.id)
        print(f"{len(cases)} cases")
        return 0

    log = open(args.log, "a", buffering=1) if args.log else None
    counts = {"PASS": 0, "FAIL": 0, "NOT RUN": 0}

    def report(line: str) -> None:
        word = line.split(" ", 1)[0]
        counts["FAIL" if word == "FAIL" else "PASS" if word == "PASS" else "NOT RUN"] += 1
        if log:
            log.write(line + "\n")
            log.flush()
        if not args.quiet or word != "PASS":
            print(line, flush=True)

    header = (f"# smoke on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU backends'}), "
              f"torch {torch.__version__}: {len(cases)} cases, families {', '.join(families)}, sizes {', '.join(sizes)}")
    print(header, flush=True)
    if log:
        log.write(header + "\n")
    env = dict(os.environ)
    env["CUDA_LAUNCH_BLOCKING"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [x for x in [env.get("PYTHONPATH")] if x])
    fams = [Family(f, [c.id for c in cases if c.family == f]) for f in families]
    fams = [f for f in fams if f.pending]
    sel = selectors.DefaultSelector()
    start = time.monotonic()

    def launch(f: Family) -> None:
        f.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--device", str(device),
                                   "--worker", ",".join(f.pending)], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        f.current, f.started, f.err_tail, f.ran_any = None, time.monotonic(), [], False
        sel.register(f.proc.stdout, selectors.EVENT_READ, (f, "out"))
        sel.register(f.proc.stderr, selectors.EVENT_READ, (f, "err"))

    def handle(f: Family, line: str) -> None:
        if line.startswith("START "):
            f.current, f.started, f.ran_any = line[6:], time.monotonic(), True
        elif line.startswith(("PASS ", "FAIL ")):
            cid = line.split(" ", 2)[1]
            if cid in f.pending:
                f.pending.remove(cid)
            f.current = None
            report(line)

    def retire(f: Family, why: str) -> None:
        """The worker is gone or killed: FAIL its current case, start a fresh one for the rest."""
        for stream in (f.proc.stdout, f.proc.stderr):
            try:
                sel.unregister(stream)
            except (KeyError, ValueError):
                pass
        if f.proc.poll() is None:
            f.proc.kill()
        f.proc.wait()
        tail = " | ".join(f.err_tail[-3:])
        if f.current is not None:
            report(f"FAIL {f.current} {why}" + (f": {tail}" if tail else ""))
            if f.current in f.pending:
                f.pending.remove(f.current)
        elif why and not f.ran_any:
            # The worker died before starting any case (an import error): no fresh worker would
            # do better, so the family's remaining cases fail with that reason.
            for cid in f.pending:
                report(f"FAIL {cid} worker could not start ({why})" + (f": {tail}" if tail else ""))
            f.pending = []
        f.proc = None
        if f.pending:
            launch(f)

    for f in fams:
        launch(f)
    while any(f.proc is not None for f in fams):
        now = time.monotonic()
        if args.deadline is not None and now - start > args.deadline:
            for f in fams:
                if f.proc is not None:
                    f.proc.kill()
                    f.proc.wait()
                    if f.current:
                        report(f"FAIL {f.current} stopped: the smoke stage's {args.deadline:g} s ran out")
                        f.pending.remove(f.current)
                    for cid in f.pending:
                        report(f"NOT RUN {cid} (time budget)")
                    f.pending, f.proc = [], None
            break
        for key, _ in sel.select(timeout=0.5):
            f, which = key.data
            chunk = os.read(key.fileobj.fileno(), 65536)
            if not chunk:
                try:
                    sel.unregister(key.fileobj)
                except (KeyError, ValueError):
                    pass
                continue
            f.buf[which] += chunk
            *lines, f.buf[which] = f.buf[which].split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace").rstrip()
                if which == "out":
                    handle(f, line)
                elif line.strip():
                    f.err_tail.append(line.strip()[:300])
                    f.err_tail = f.err_tail[-20:]
        for f in fams:
            if f.proc is None:
                continue
            if f.current is not None and time.monotonic() - f.started > args.case_timeout:
                retire(f, f"timeout: no result after {args.case_timeout:g} s (worker killed)")
            elif f.proc.poll() is not None and not _readable(sel, f):
                code = f.proc.returncode
                if code == 0 and not f.pending:
                    retire(f, "")
                else:
                    why = (f"worker died with signal {-code}" if code < 0 else
                           f"worker exited {code}" if code != 3 else "CUDA context lost")
                    retire(f, f"crashed: {why}")
    total = time.monotonic() - start
    summary = (f"# smoke: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['NOT RUN']} not run, "
               f"in {total:.0f} s")
    print(summary, flush=True)
    if log:
        log.write(summary + "\n")
        log.close()
    return 0 if counts["FAIL"] == 0 and counts["NOT RUN"] == 0 else 1


def _readable(sel, f: Family) -> bool:
    """True while the worker's pipes are still registered (output not yet drained)."""
    keys = sel.get_map()
    return any(k.fileobj in (f.proc.stdout, f.proc.stderr) for k in keys.values())


if __name__ == "__main__":
    sys.exit(main())
