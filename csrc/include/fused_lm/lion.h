// The lion family's update functor (LionOp) and its dispatch types (LionTag, LionFamily for
// optim_dispatch), shared by the CUDA kernel (csrc/cuda/lion.cu) and the CPU kernel
// (csrc/cpu/lion.cpp). The engine both optimizers share, and why every backend computes the
// same bits: optim.h.
#pragma once
#include <cstdint>
#include <type_traits>

#include "lists.h"
#include "macros.h"
#include "optim.h"
#include "tensor_table.h"

namespace flm {

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

// ---- dispatch types ------------------------------------------------------------------------

template <typename P, typename S, bool M> struct LionTag {
  using Op = LionOp<P, S, M>;
  using Lists = typename std::conditional<M, TypeList<P, P, S, float>, TypeList<P, P, S>>::type;
};

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

struct LionFamily {
  template <typename P, typename S, typename F>
  static bool flags(bool amsgrad, bool master, F&& f) { return lion_flags<P, S>(amsgrad, master, f); }
};

}  // namespace flm
