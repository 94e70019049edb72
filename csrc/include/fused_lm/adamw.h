// The adamw family's update functor (AdamWOp) and its dispatch types (AdamWTag, AdamWFamily for
// optim_dispatch), shared by the CUDA kernel (csrc/cuda/adamw.cu) and the CPU kernel
// (csrc/cpu/adamw.cpp). The engine both optimizers share, and why every backend computes the
// same bits: optim.h.
#pragma once
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "lists.h"
#include "macros.h"
#include "optim.h"
#include "tensor_table.h"

namespace flm {

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

// ---- dispatch types ------------------------------------------------------------------------

template <typename P, typename S, bool A, bool M> struct AdamWTag {
  using Op = AdamWOp<P, S, A, M>;
  using Lists = typename std::conditional<
      A, typename std::conditional<M, TypeList<P, P, S, S, S, float>, TypeList<P, P, S, S, S>>::type,
      typename std::conditional<M, TypeList<P, P, S, S, float>, TypeList<P, P, S, S>>::type>::type;
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

struct AdamWFamily {
  template <typename P, typename S, typename F>
  static bool flags(bool amsgrad, bool master, F&& f) { return adamw_flags<P, S>(amsgrad, master, f); }
};

}  // namespace flm
