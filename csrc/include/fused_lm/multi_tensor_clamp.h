// The multi_tensor_clamp family's functor (ClampOp), shared by the CUDA kernel
// (csrc/cuda/multi_tensor_clamp.cu) and the CPU kernel (csrc/cpu/multi_tensor_clamp.cpp). It
// follows the Op protocol documented in multi_tensor_apply.cuh.
#pragma once
#include <cstdint>

#include "macros.h"
#include "tensor_table.h"

namespace flm {

// clip_grad_value_: x = clamp_max(clamp_min(x, lo), hi) in that order (torch's foreach order, so
// lo > hi gives hi everywhere, as torch does); NaN stays NaN.
struct ClampOp {
  static constexpr int kLists = 1;
  static constexpr unsigned kWriteMask = 1u;
  float lo;
  float hi;

  struct Ctx {
    bool skip;
  };
  FLM_HD Ctx context(const ChunkView& /*c*/) const { return Ctx{false}; }
  FLM_HD void operator()(const Ctx& /*ctx*/, float* v, int64_t /*index*/) const {
    float x = v[0];
    x = x < lo ? lo : x;
    x = x > hi ? hi : x;
    v[0] = x;
  }
};

}  // namespace flm
