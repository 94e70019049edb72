"""Pieces shared by the multi-tensor optimizer kernels (ops/adamw.py, ops/lion.py).

* The per-group hyperparameter table ``hp`` (float32, (n_groups, HP_COLS), on the device), one row
  per param group: ``[lr, beta1, beta2, eps, weight_decay, grad_sign]`` (grad_sign = -1 when
  ``maximize``). The kernels read the row of their chunk's group, so groups may differ in every
  hyperparameter and a step is still one launch.
* The step counters: every tensor keeps torch's ``state['step']`` (a float32 0-d tensor on its
  device). A bucket's step tensors are listed by address in ``step_table`` (int64, (n_tensors,));
  one launch adds ``skip == 0 ? 1 : 0`` to each, then the update kernel reads each tensor's count
  through the same table (indexed by the chunk's tensor index) for its bias corrections.
* Per-chunk scalars in float64 (``pow_count``, ``one_minus_product``): the bias corrections
  1 - beta^t and the decay 1 - lr * wd are computed by the same float64 operations on every backend
  (Triton here, the C++ functors through csrc/include/fused_lm/optim.h), then rounded once.
* The counter-based random bits of stochastic rounding: ``fmix32`` (MurmurHash3's finaliser, a
  bijection on 32 bits with full avalanche) keyed by (seed, step, tensor index, element index), so
  a resumed run draws the same bits (csrc/include/fused_lm/optim.h has the C++ twin).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

HP_COLS = 8          # lr, beta1, beta2, eps, weight_decay, grad_sign, (2 spare, keeps rows 32 B)
_GOLDEN = 0x9E3779B9
_M32 = 0xFFFFFFFF


def upload_int64(values: list[int], device: torch.device) -> torch.Tensor:
    """An int64 tensor on ``device`` from host ints, without a host synchronisation."""
    host = torch.tensor(values, dtype=torch.int64)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def step_table(steps: list, device: torch.device) -> torch.Tensor:
    """The step table of a bucket: the int64 addresses of its ``state['step']`` counters, on
    ``device`` (no host synchronisation). The kernels read and write each counter through its
    address on the parameters' device, so each must be a float32 one-element tensor on that
    device (torch's layout); anything else (a user-set CPU tensor on a CUDA parameter, an int64 or
    float64 count, a Python number) raises here instead of becoming an illegal address or a
    misread count. Device-agnostic: the check is the same on every backend."""
    for i, s in enumerate(steps):
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"state['step'] of tensor {i} of the bucket is a {type(s).__name__}; "
                            f"the fused kernels update it in place: expected a float32 "
                            f"one-element tensor on {device}")
        if s.dtype != torch.float32 or s.numel() != 1 or s.device != device:
            error = TypeError if s.dtype != torch.float32 else ValueError
            raise error(f"state['step'] of tensor {i} of the bucket is a {s.dtype} tensor of "
                        f"shape {tuple(s.shape)} on {s.device}; the fused kernels read and write "
                        f"it in place on the parameter's device: expected a float32 one-element "
                        f"tensor on {device}, e.g. "
                        f"torch.tensor(float(step), dtype=torch.float32, device=param.device)")
    return upload_int64([s.data_ptr() for s in steps], device)


# ---------------------------------------------------------------------------------------------
# Random bits for stochastic rounding (the torch twin of the kernels' hash).

def _fmix32_torch(h: torch.Tensor) -> torch.Tensor:
    """fmix32 on int64 tensors holding uint32 values (int64 products wrap; the low 32 bits are
    exact)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def chunk_key_torch(seed: int, step: torch.Tensor, tensor_index: int) -> torch.Tensor:
    """The per-(tensor, step) key: fmix32(fmix32(fmix32(tensor + golden) ^ step) ^ seed)."""
    a = _fmix32_torch(torch.tensor((tensor_index + _GOLDEN) & _M32, dtype=torch.int64,
                                   device=step.device))
    b = _fmix32_torch(a ^ step.to(torch.int64))
    return _fmix32_torch(b ^ (seed & _M32))


def random_bits_torch(key: torch.Tensor, numel: int) -> torch.Tensor:
    """fmix32(key ^ index) for index in [0, numel): int64 tensor of uint32 values."""
    idx = torch.arange(numel, dtype=torch.int64, device=key.device) & _M32
    return _fmix32_torch(key ^ idx)


def round_param_torch(x: torch.Tensor, dtype: torch.dtype, sr: bool, key) -> torch.Tensor:
    """float32 ``x`` stored to ``dtype``: stochastically for bf16 when ``sr``, else nearest."""
    if not (sr and dtype == torch.bfloat16):
        return x.to(dtype)
    bits = random_bits_torch(key, x.numel()).view(x.shape)
    u = x.contiguous().view(torch.int32).to(torch.int64) & _M32
    r = (u + (bits & 0xFFFF)) & 0xFFFF0000
    r = torch.where(r >= 2**31, r - 2**32, r).to(torch.int32).view(torch.float32)
    return torch.where(torch.isfinite(x), r, x).to(dtype)


# ---------------------------------------------------------------------------------------------
# Triton pieces.

if triton is not None:

    @triton.jit
    def fmix32(h):
        # MurmurHash3 finaliser on uint32 (the constants are uint32 literals: products wrap).
        h ^= h >> 16
        h *= 0x85EBCA6B
        h ^= h >> 13
        h *= 0xC2B2AE35
        h ^= h >> 16
        return h

    @triton.jit
    def chunk_key(seed, step, tensor):
        # seed: int32/int64 scalar holding a uint32; step: float32 count; tensor: int64 index.
        a = fmix32((tensor.to(tl.uint32) + 0x9E3779B9).to(tl.uint32))
        b = fmix32(a ^ step.to(tl.uint32))
        return fmix32(b ^ seed.to(tl.uint32))

    @triton.jit
    def stochastic_round_bf16(x, key, offs):
        # x: float32 block; offs: int64 element indices. Adds 16 random bits below the bf16
        # mantissa and truncates: rounds up with probability equal to the discarded fraction.
        r = fmix32(key ^ offs.to(tl.uint32))
        u = x.to(tl.uint32, bitcast=True)
        y = ((u + (r & 0xFFFF)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        finite = (u & 0x7F800000) != 0x7F800000
        return tl.where(finite, y, x)

    @triton.jit
    def rne_bf16(x):
        # float32 -> the nearest bfloat16 value (ties to even), still as float32, so the final
        # cast is exact: the same rounding as the C++ kernels (dtypes.h) and the GPU's cvt.rn, also
        # under the interpreter, whose float32 -> bf16 cast truncates. NaN passes through.
        u = x.to(tl.uint32, bitcast=True)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        return tl.where(x != x, x, r)

    @triton.jit
    def _step_kernel(step_table_ptr, n, skip_ptr, BLOCK: tl.constexpr):
        # step += (skip == 0) for every tensor of the bucket: one launch, n float32 counters.
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        addr = tl.load(step_table_ptr + offs, mask=mask, other=0).to(tl.pointer_type(tl.float32))
        inc = tl.where(tl.load(skip_ptr) != 0, 0.0, 1.0)
        s = tl.load(addr, mask=mask, other=0.0)
        tl.store(addr, s + inc, mask=mask)

    @triton.jit
    def pow_count(base, t):
        # base^n in float64 for the integer step count n = t (a float32 count, truncated, at
        # most 2^30: every float32 beta < 1 gives 1 - beta^(2^30) == 1 in float32; n = 0 below 1
        # and for NaN, which makes the update NaN, as torch's beta ** nan does), by squaring:
        # 31 float64 multiply steps per chunk, no libdevice (the interpreter has none), and the
        # same multiplies in the same order as pow_count in optim.h (C++), so every backend
        # gets the same bits. Why not exp2(t * log2(beta)) in float32: 1 - beta^t cancels
        # (beta2 = 0.999, t = 1: 1000x), and a GPU's lg2.approx has ~2^-22 absolute error, so the
        # bias correction would be off by ~1e-4 relative there and exact in the interpreter.
        # (The outer select is not a max(t, 0): its operands differ, so no NaN-dropping max.f32
        # appears in the PTX, where tools/triton_aot_check.py looks for AMSGrad's.)
        n = tl.where(t >= 1.0, tl.where(t < 1073741824.0, t, 1073741824.0), 0.0).to(tl.int32)
        x = base.to(tl.float64)
        r = x * 0.0 + 1.0
        for _ in range(31):
            r = tl.where((n & 1) != 0, r * x, r)
            x = x * x
            n = n >> 1
        return r

    @triton.jit
    def one_minus_product(a, b):
        # float32(1 - a * b) for float32 a, b, computed in float64 (the product is exact there):
        # the decoupled weight decay factor 1 - lr * wd, as torch computes it in Python floats.
        return (1.0 - a.to(tl.float64) * b.to(tl.float64)).to(tl.float32)


_STEP_BLOCK = 1024


def increment_steps_triton(step_table: torch.Tensor, skip: torch.Tensor) -> None:
    n = step_table.numel()
    if n:
        _step_kernel[(triton.cdiv(n, _STEP_BLOCK),)](step_table, n, skip, BLOCK=_STEP_BLOCK)


def increment_steps_torch(steps: list[torch.Tensor], skip: torch.Tensor) -> None:
    if steps:
        inc = (skip == 0).to(torch.float32)
        for s in steps:
            s.add_(inc.to(s.device))
