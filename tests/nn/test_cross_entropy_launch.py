"""Launch limits of the cross-entropy launchers (issue 11, item 4; the linear CE runs the same
kernels on its chunks).

* Grids: CUDA allows 2**31 - 1 programs on grid axis 0 but only 65535 on axes 1 and 2. Both
  launchers (_ce_kernel: a persistent grid of at most N programs; _scale_kernel: numel / 2048
  programs) use axis 0 alone.
* Offsets: a row offset ``row * stride`` passes 2**31 once rows x V does (16800 x 128256 bf16
  logits). The CE kernel widens the row index to int64 before multiplying; checked here under
  the interpreter with a fake-stride case: a (3, V) view whose row stride is 2**30 + 7 elements,
  into a 4 GiB virtual bf16 buffer of which only the three rows are ever touched (untouched
  pages are never committed). With 32-bit offsets the third row's address wraps and the process
  dies (measured: SIGSEGV), so the case runs in a subprocess. The scale kernel's flat offsets
  come from ``program_id.to(int64)``: checked in its source (a run would need > 2**31 elements).
"""

import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fused_lm import _backend
from fused_lm.ops import cross_entropy as _ce
from fused_lm.ops.cross_entropy import cross_entropy
from tests._helpers import randn

REPO = Path(__file__).resolve().parents[2]
AXIS_LIMIT = 2**31 - 1

needs_interpreter = pytest.mark.skipif(
    not _backend.interpreter_on() or torch.cuda.is_available(),
    reason="the fake-stride case runs the kernel under the Triton interpreter on CPU tensors "
           "(CUDA: test_gpu_64bit_offsets in test_cross_entropy.py)")

_FAKE_STRIDE = textwrap.dedent("""
    import json, os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, sys.argv[1])
    import torch
    from fused_lm.ops import cross_entropy as ce
    from fused_lm.reference import cross_entropy as ref

    N, V, stride = 3, 700, (1 << 30) + 7          # rows x stride > 2**31 elements
    try:
        xbuf = torch.empty((N - 1) * stride + V, dtype=torch.bfloat16)
        gbuf = torch.empty((N - 1) * stride + V, dtype=torch.bfloat16)
    except RuntimeError:
        sys.exit(77)                               # no 4 GiB of address space here
    x = xbuf.as_strided((N, V), (stride, 1))
    g = gbuf.as_strided((N, V), (stride, 1))
    torch.manual_seed(0)
    values = torch.randn(N, V).to(torch.bfloat16)
    x.copy_(values)
    t = torch.tensor([5, -100, V - 1])
    rows = torch.empty(N)
    den, cnt = ce.denominators(t, None, -100, V)
    ce.ce_rows_(x, t, None, -100, 0.1, 1e-3, 0.0, True, den, cnt, rows, g, None, "triton")
    xr = values.double().requires_grad_()
    expected = ref.cross_entropy(xr, t, label_smoothing=0.1, z_loss=1e-3, reduction="none")
    expected.sum().backward()
    scale = 1.0 / float(den)                       # mean: rows hold loss / D, z-loss / count
    loss_err = ((rows.double() * 2 - expected.detach()) / expected.detach().clamp_min(1e-30)).abs()
    print(json.dumps({"loss_err": float(loss_err[t != -100].max()),
                      "grad_err": float(((g.double() - xr.grad * scale).norm() / (xr.grad * scale).norm())),
                      "ignored_grad_zero": bool((g[1] == 0).all())}))
""")


@needs_interpreter
def test_64bit_row_offsets_fake_stride():
    proc = subprocess.run([sys.executable, "-c", _FAKE_STRIDE, str(REPO)], capture_output=True,
                          text=True, timeout=600)
    if proc.returncode == 77:
        pytest.skip("this machine refuses a 4 GiB virtual allocation")
    assert proc.returncode == 0, (f"kernel crashed or failed (exit {proc.returncode}): 32-bit row "
                                  f"offsets? stderr: {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loss_err"] < 1e-5, out
    assert out["grad_err"] < 1.6e-2, out
    assert out["ignored_grad_zero"], out


class _GridRecorder:
    """Stands in for a Triton kernel object: records each launch grid, then launches."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]


def test_grids_use_axis_0_only(monkeypatch):
    if not _backend.interpreter_on() and not torch.cuda.is_available():
        pytest.skip("needs the Triton kernel (CUDA, or the interpreter on CPU)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ce_rec, scale_rec = _GridRecorder(_ce._ce_kernel), _GridRecorder(_ce._scale_kernel)
    monkeypatch.setattr(_ce, "_ce_kernel", ce_rec)
    monkeypatch.setattr(_ce, "_scale_kernel", scale_rec)
    N, V = 9, 600
    x = randn(N, V, device=device).requires_grad_()
    t = torch.randint(0, V, (N,), device=device)
    loss = cross_entropy(x, t, reduction="none", backend="triton")
    loss.backward(torch.rand(N, device=device))          # per-row scale: the scale kernel runs
    assert ce_rec.grids and scale_rec.grids
    for grid in ce_rec.grids + scale_rec.grids:
        assert len(grid) == 1 and 1 <= grid[0] <= AXIS_LIMIT, grid
    assert all(g[0] <= N for g in ce_rec.grids)


def test_persistent_grid_bound_at_realistic_sizes(monkeypatch):
    """_programs on an H100-like device for a large batch stays <= N and within axis 0."""
    monkeypatch.setattr(_ce, "_device_caps", lambda index: (132, 50 << 20))
    monkeypatch.delenv("FUSED_LM_CE_PROGRAMS", raising=False)
    for N, V in ((10**7, 1000), (16800, 128256), (3, 256000)):
        p = _ce._programs(N, V, 2, torch.device("cuda", 0))
        assert 1 <= p <= min(N, AXIS_LIMIT), (N, V, p)


def test_scale_kernel_offsets_are_64_bit():
    src = inspect.getsource(_ce._scale_kernel.fn)
    assert "tl.program_id(0).to(tl.int64)" in src
    ce_src = inspect.getsource(_ce._ce_kernel.fn)
    assert "pid.to(tl.int64)" in ce_src
