// The engine shared by the AdamW and Lion update functors (adamw.h, lion.h), which run in the
// CUDA kernels (csrc/cuda/adamw.cu, lion.cu) and the CPU kernels (csrc/cpu/adamw.cpp, lion.cpp):
// the CPU CI runs the very arithmetic of the GPU. Here: the kernel arguments (OptimArgs), the
// stochastic-rounding bits, the float64 per-chunk scalars and the runtime dtype/flag dispatch.
//
// Both functors follow the Op protocol of multi_tensor_apply.cuh. Per chunk, context() reads the
// hyperparameters of the chunk's param group from the device table `hp` (row layout in
// fused_lm/ops/_optim_common.py: lr, beta1, beta2, eps, weight_decay, grad_sign), the tensor's
// step count through `step_table` (int64 addresses of float32 counters, indexed by the chunk's
// tensor), and the device scalars grad_mult (1/loss scale x clip coefficient) and skip
// (found_inf: the whole chunk is left untouched). Per element, float32 math only.
//
// Instantiations are kept few (compile time): templates over the storage types (param P, state S)
// and the list layout (amsgrad, master weights); maximize is a sign in `hp`, stochastic rounding
// a runtime flag. Supported (P, S): S in {float, bf16, P}; master weights only for 16-bit P.
//
// Same bits on every backend. The per-element math is written with explicit fma_rn where a fused
// multiply-add is meant, and both extensions are built without contraction (setup.py: g++
// -ffp-contract=off, nvcc --fmad=false), so GCC and nvcc cannot fuse differently; / and sqrtf
// are IEEE-rounded on both (nvcc's default -prec-div/-prec-sqrt; vdivps/vsqrtps). The per-chunk
// scalars (bias corrections, decay) are float64 with the same operations as the Triton kernels
// (fused_lm/ops/_optim_common.py: pow_count, one_minus_product), which also use fma, div_rn and
// sqrt_rn with contraction off: CPU C++, CUDA C++ and Triton (GPU or interpreter) agree bit for
// bit on AdamW and Lion (tests/test_gpu_numerics.py checks CPU C++ against the interpreter).
#pragma once
#include <cstdint>
#include <type_traits>

#include "dtypes.h"
#include "launch.h"
#include "macros.h"

namespace flm {

constexpr int kHpCols = 8;

// ---- counter-based random bits for stochastic rounding (twin of ops/_optim_common.py) --------

// MurmurHash3's 32-bit finaliser: a bijection with full avalanche.
FLM_HD uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

// Key of one (tensor, step) pair; the bits of element i are fmix32(key ^ uint32(i)).
FLM_HD uint32_t sr_key(uint32_t seed, float step, int64_t tensor) {
  const uint32_t a = fmix32(uint32_t(tensor) + 0x9e3779b9u);
  const uint32_t b = fmix32(a ^ uint32_t(step));
  return fmix32(b ^ seed);
}

// float32 -> a bf16-representable float32, rounded up with probability equal to the discarded
// fraction (16 random bits added below the bf16 mantissa, then truncation). E[result] = x.
FLM_HD float stochastic_round_bf16(float x, uint32_t bits) {
  const uint32_t u = f32_bits(x);
  if ((u & 0x7f800000u) == 0x7f800000u) return x;  // inf / NaN: round to nearest
  return bits_f32((u + (bits & 0xffffu)) & 0xffff0000u);
}

// base^n in float64 for the integer step count n = t (truncated, at most 2^30; 0 below 1 and for
// NaN), by squaring: the multiplies of pow_count in fused_lm/ops/_optim_common.py, in the same
// order, so 1 - beta^t has the same bits on every backend. (powf does not: CUDA's and glibc's
// differ in the last bits, and 1 - beta^t cancels, beta2 = 0.999 at t = 1 by 1000x.)
FLM_HD double pow_count(float base, float t) {
  int n = t >= 1.0f ? static_cast<int>(t < 1073741824.0f ? t : 1073741824.0f) : 0;
  double x = base;
  double r = 1.0;
  for (int i = 0; i < 31; ++i) {
    if (n & 1) r *= x;
    x *= x;
    n >>= 1;
  }
  return r;
}

// float32(1 - a * b) computed in float64 (the product of two floats is exact there): the decay
// factor 1 - lr * wd, as torch computes it in Python floats (twin: one_minus_product).
FLM_HD float one_minus_product(float a, float b) {
  return static_cast<float>(1.0 - static_cast<double>(a) * static_cast<double>(b));
}

template <typename P>
FLM_HD float round_param(float p, bool sr, uint32_t key, int64_t index) {
  if constexpr (std::is_same<P, bf16>::value) {
    if (sr) return stochastic_round_bf16(p, fmix32(key ^ uint32_t(index)));
  }
  return p;  // the apply loop stores it with round-to-nearest-even
}

// The pointers every optimizer op reads (built by the bindings).
struct OptimArgs {
  const float* hp;             // (n_groups, kHpCols)
  const int64_t* step_table;   // (n_tensors,) addresses of float32 step counters
  int64_t n_tensors;
  const float* grad_mult;      // scalar
  const float* skip;           // scalar, nonzero = leave everything untouched
  uint32_t seed;
  bool sr;                     // stochastic rounding of bf16 params
};

FLM_HD float step_of(const OptimArgs& a, int64_t tensor) {
  return *reinterpret_cast<const float*>(a.step_table[tensor]);
}

// ---- runtime dtype/flag dispatch (host code shared by the CPU and CUDA launchers) ------------

template <typename... Ts> struct TypeList {};

// The state dtypes of param dtype P: float32, bf16 or P itself. (A helper, not a second generic
// lambda nested in optim_dispatch's: g++ 12 evaluated is_same<S, P> as false there for
// P = S = fp16 and dropped that pair; tests/test_cuda_emulated.py caught it.)
template <typename Family, typename P, typename F>
bool optim_by_state(DType s, bool amsgrad, bool master, F&& f) {
  bool ok = false;
  dispatch_dtype(s, [&](auto st) {
    using S = decltype(st);
    if constexpr (std::is_same<S, float>::value || std::is_same<S, bf16>::value ||
                  std::is_same<S, P>::value) {
      ok = Family::template flags<P, S>(amsgrad, master, f);
    }
  });
  return ok;
}

// Dispatches (param dtype, state dtype, amsgrad, master) to f(Tag{}); false when unsupported.
// Family: AdamWFamily (adamw.h) or LionFamily (lion.h).
template <typename Family, typename F>
bool optim_dispatch(DType p, DType s, bool amsgrad, bool master, F&& f) {
  bool ok = false;
  dispatch_dtype(p, [&](auto pt) {
    ok = optim_by_state<Family, decltype(pt)>(s, amsgrad, master, f);
  });
  return ok;
}

}  // namespace flm
