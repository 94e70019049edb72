// Per-element math of the multi_tensor_norm family, shared by the CUDA kernels
// (csrc/cuda/multi_tensor_norm.cu) and the CPU kernels (csrc/cpu/multi_tensor_norm.cpp), so CI on
// a CPU runs the arithmetic of the GPU.
//
// The global p-norm of tensors x_1..x_n, viewed as one vector, is
//
//     ||x||_p = (sum_i sum_j |x_ij|^p)^(1/p)        p finite, p != 0
//     ||x||_inf = max_ij |x_ij|,  ||x||_-inf = min_ij |x_ij|
//
// computed in two launches: every chunk of every tensor reduces its elements to one float32
// partial (`term` then `combine`), then one finalise reduces the partials (`combine`) and takes
// the root (`finish`). NaN propagates through every kind, as in torch (max and min included:
// CUDA's fmaxf/fminf would drop it, hence the explicit comparisons).
#pragma once
#include <cmath>
#include <cstdint>

#include "macros.h"
#include "tensor_table.h"

namespace flm {

// Which reduction a norm type needs; the Python side maps norm_type to (kind, p).
enum class NormKind : int {
  kSumAbs = 0,  // p = 1:      sum |x|
  kSumSq = 1,   // p = 2:      sum x^2         (root: sqrt)
  kSumPow = 2,  // other p:    sum |x|^p       (root: ^(1/p)); negative p too, as torch allows
  kMaxAbs = 3,  // p = inf:    max |x|
  kMinAbs = 4,  // p = -inf:   min |x|
};

FLM_HD float nan_max(float a, float b) { return (a != a || a > b) ? a : b; }
FLM_HD float nan_min(float a, float b) { return (a != a || a < b) ? a : b; }

template <NormKind K>
struct NormOp {
  float p;  // the norm order (used by kSumPow only)

  static constexpr bool kIsSum = K == NormKind::kSumAbs || K == NormKind::kSumSq ||
                                 K == NormKind::kSumPow;

  // The reduction's identity: an empty chunk contributes nothing (so an empty tensor is fine for
  // every kind; torch raises for the inf norm of an empty tensor).
  FLM_HD float identity() const { return K == NormKind::kMinAbs ? INFINITY : 0.0f; }

  // The contribution of one element. |x|^p = 2^(p log2|x|): 0 -> 0 for p > 0 and inf for p < 0,
  // inf -> inf, NaN -> NaN, as pow does.
  FLM_HD float term(float x) const {
    const float a = fabsf(x);
    if constexpr (K == NormKind::kSumSq) return x * x;
    else if constexpr (K == NormKind::kSumPow) return exp2f(p * log2f(a));
    else return a;
  }

  // acc combined with term(x); the sum of squares as one fma (acc + x^2 rounded once, as the
  // Triton kernel's tl.fma): the FMA the compilers used to contract here, now written down.
  FLM_HD float accumulate(float acc, float x) const {
    if constexpr (K == NormKind::kSumSq) return fma_rn(x, x, acc);
    else return combine(acc, term(x));
  }

  FLM_HD float combine(float a, float b) const {
    if constexpr (kIsSum) return a + b;
    else if constexpr (K == NormKind::kMaxAbs) return nan_max(a, b);
    else return nan_min(a, b);
  }

  // The norm from the fully reduced value.
  FLM_HD float finish(float r) const {
    if constexpr (K == NormKind::kSumSq) return sqrtf(r);
    else if constexpr (K == NormKind::kSumPow) return exp2f(log2f(r) / p);
    else return r;
  }
};

// torch.nn.utils.clip_grads_with_norm_'s coefficient, clamp(max_norm / (norm + 1e-6), max=1),
// evaluated as torch evaluates it in float32 (Tensor.__rtruediv__ is reciprocal then multiply).
// A NaN norm gives a NaN coefficient, as torch.clamp does (fminf would return 1).
FLM_HD float clip_coefficient(float norm, float max_norm) {
  const float c = (1.0f / (norm + 1e-6f)) * max_norm;
  return c > 1.0f ? 1.0f : c;
}

// 1 when the norm is NaN or +-inf, else 0: the "skip this step" flag of an optimizer step with
// max_grad_norm (as GradScaler's found_inf). x - x is NaN exactly for NaN and infinities.
FLM_HD float nonfinite_flag(float norm) { return (norm - norm == 0.0f) ? 0.0f : 1.0f; }

}  // namespace flm
