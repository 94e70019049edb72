// AdamW and Lion update functors, shared by the CUDA kernels (csrc/cuda/optim_*.cu) and the CPU
// kernels (csrc/cpu/optim.cpp): the CPU CI runs the very arithmetic of the GPU.
//
// Both follow the Op protocol of multi_tensor_apply.cuh. Per chunk, context() reads the
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
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "dtypes.h"
#include "lists.h"
#include "launch.h"
#include "macros.h"
#include "tensor_table.h"

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

// ---- AdamW ---------------------------------------------------------------------------------
// lists: 0 param (P), 1 grad (P), 2 exp_avg (S), 3 exp_avg_sq (S), [max_exp_avg_sq (S)],
// [master (float)]. With a master copy the update applies to it and the param is its rounding.
template <typename P, typename S, bool kAmsgrad, bool kMaster>
struct AdamWOp {
  // List positions from the family spec (lists.h, generated from fused_lm/ops/adamw.py SPEC).
  static constexpr int kP = lists::adamw::kParams, kG = lists::adamw::kGrads;
  static constexpr int kM = lists::adamw::kExpAvgs, kV = lists::adamw::kExpAvgSqs;
  static constexpr int kVmax = lists::adamw::max_exp_avg_sqs(kAmsgrad, kMaster);
  static constexpr int kMasterList = lists::adamw::masters(kAmsgrad, kMaster);
  static constexpr int kLists = lists::adamw::count(kAmsgrad, kMaster);
  static constexpr unsigned kWriteMask = (1u << kP) | (1u << kM) | (1u << kV) |
                                         (kAmsgrad ? 1u << kVmax : 0u) |
                                         (kMaster ? 1u << kMasterList : 0u);
  OptimArgs a;

  struct Ctx {
    bool skip;
    float mult, decay, c1, c2, b2, eps, neg_step_size, sqrt_bc2;
    uint32_t key;
  };

  FLM_HD Ctx context(const ChunkView& c) const {
    Ctx x;
    x.skip = *a.skip != 0.0f;
    const float* h = a.hp + c.group * kHpCols;
    const float lr = h[0];
    x.c1 = 1.0f - h[1];
    x.c2 = 1.0f - h[2];
    x.b2 = h[2];
    x.eps = h[3];
    x.decay = one_minus_product(lr, h[4]);
    x.mult = *a.grad_mult * h[5];
    const float t = step_of(a, c.tensor);
    // -lr / bias_correction1 and sqrt(bias_correction2), float64, rounded once.
    x.neg_step_size = static_cast<float>(-static_cast<double>(lr) / (1.0 - pow_count(h[1], t)));
    x.sqrt_bc2 = static_cast<float>(sqrt(1.0 - pow_count(h[2], t)));
    x.key = a.sr ? sr_key(a.seed, t, c.tensor) : 0u;
    return x;
  }

  FLM_HD void operator()(const Ctx& x, float* v, int64_t index) const {
    const float g = v[kG] * x.mult;
    float p;
    if constexpr (kMaster) p = v[kMasterList]; else p = v[kP];
    p *= x.decay;
    const float m = fma_rn(x.c1, g - v[kM], v[kM]);      // lerp(m, g, 1 - b1)
    const float s = fma_rn(x.c2 * g, g, x.b2 * v[kV]);   // b2 * v + (1 - b2) * g^2
    float vh = s;
    if constexpr (kAmsgrad) {
      const float vm = v[kVmax];
      vh = (s > vm || s != s) ? s : vm;                   // torch.maximum (NaN propagates)
      v[kVmax] = vh;
    }
    p = fma_rn(x.neg_step_size, m / (sqrtf(vh) / x.sqrt_bc2 + x.eps), p);
    v[kM] = m;
    v[kV] = s;
    if constexpr (kMaster) v[kMasterList] = p;
    v[kP] = round_param<P>(p, a.sr, x.key, index);
  }
};

// ---- Lion ----------------------------------------------------------------------------------
// lists: 0 param (P), 1 grad (P), 2 exp_avg (S), [master (float)].
template <typename P, typename S, bool kMaster>
struct LionOp {
  static constexpr int kP = lists::lion::kParams, kG = lists::lion::kGrads;
  static constexpr int kM = lists::lion::kExpAvgs;
  static constexpr int kMasterList = lists::lion::masters(kMaster);
  static constexpr int kLists = lists::lion::count(kMaster);
  static constexpr unsigned kWriteMask =
      (1u << kP) | (1u << kM) | (kMaster ? 1u << kMasterList : 0u);
  OptimArgs a;

  struct Ctx {
    bool skip;
    float mult, decay, neg_lr, b1, b2, c1, c2;
    uint32_t key;
  };

  FLM_HD Ctx context(const ChunkView& c) const {
    Ctx x;
    x.skip = *a.skip != 0.0f;
    const float* h = a.hp + c.group * kHpCols;
    x.neg_lr = -h[0];
    x.b1 = h[1];
    x.b2 = h[2];
    x.c1 = 1.0f - h[1];
    x.c2 = 1.0f - h[2];
    x.decay = one_minus_product(h[0], h[4]);
    x.mult = *a.grad_mult * h[5];
    x.key = a.sr ? sr_key(a.seed, step_of(a, c.tensor), c.tensor) : 0u;
    return x;
  }

  FLM_HD void operator()(const Ctx& x, float* v, int64_t index) const {
    const float g = v[kG] * x.mult;
    float p;
    if constexpr (kMaster) p = v[kMasterList]; else p = v[kP];
    const float c = fma_rn(x.c1, g, x.b1 * v[kM]);
    const float sign = float(c > 0.0f) - float(c < 0.0f);  // torch.sign: (0 < c) - (c < 0), NaN -> 0
    p = fma_rn(x.neg_lr, sign, p * x.decay);              // lr * sign is exact
    v[kM] = fma_rn(x.c2, g, x.b2 * v[kM]);
    if constexpr (kMaster) v[kMasterList] = p;
    v[kP] = round_param<P>(p, a.sr, x.key, index);
  }
};

// ---- runtime dtype/flag dispatch (host code shared by the CPU and CUDA launchers) ------------

template <typename... Ts> struct TypeList {};

template <typename P, typename S, bool A, bool M> struct AdamWTag {
  using Op = AdamWOp<P, S, A, M>;
  using Lists = typename std::conditional<
      A, typename std::conditional<M, TypeList<P, P, S, S, S, float>, TypeList<P, P, S, S, S>>::type,
      typename std::conditional<M, TypeList<P, P, S, S, float>, TypeList<P, P, S, S>>::type>::type;
};

template <typename P, typename S, bool M> struct LionTag {
  using Op = LionOp<P, S, M>;
  using Lists = typename std::conditional<M, TypeList<P, P, S, float>, TypeList<P, P, S>>::type;
};

// Calls f(Tag{}) for the instantiation matching the runtime choice; false if unsupported.
template <typename P, typename S, typename F>
bool adamw_flags(bool amsgrad, bool master, F&& f) {
  if constexpr (std::is_same<P, float>::value) {
    if (master) return false;
    amsgrad ? f(AdamWTag<P, S, true, false>{}) : f(AdamWTag<P, S, false, false>{});
  } else {
    if (master) {
      amsgrad ? f(AdamWTag<P, S, true, true>{}) : f(AdamWTag<P, S, false, true>{});
    } else {
      amsgrad ? f(AdamWTag<P, S, true, false>{}) : f(AdamWTag<P, S, false, false>{});
    }
  }
  return true;
}

template <typename P, typename S, typename F>
bool lion_flags(bool /*amsgrad*/, bool master, F&& f) {
  if constexpr (std::is_same<P, float>::value) {
    if (master) return false;
    f(LionTag<P, S, false>{});
  } else {
    master ? f(LionTag<P, S, true>{}) : f(LionTag<P, S, false>{});
  }
  return true;
}

struct AdamWFamily {
  template <typename P, typename S, typename F>
  static bool flags(bool amsgrad, bool master, F&& f) { return adamw_flags<P, S>(amsgrad, master, f); }
};
struct LionFamily {
  template <typename P, typename S, typename F>
  static bool flags(bool amsgrad, bool master, F&& f) { return lion_flags<P, S>(amsgrad, master, f); }
};

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
template <typename Family, typename F>
bool optim_dispatch(DType p, DType s, bool amsgrad, bool master, F&& f) {
  bool ok = false;
  dispatch_dtype(p, [&](auto pt) {
    ok = optim_by_state<Family, decltype(pt)>(s, amsgrad, master, f);
  });
  return ok;
}

}  // namespace flm
