// The multi_tensor_scale family's functor (ScaleOp), shared by the CUDA kernel
// (csrc/cuda/multi_tensor_scale.cu) and the CPU kernel (csrc/cpu/multi_tensor_scale.cpp). It
// follows the Op protocol documented in multi_tensor_apply.cuh. Every op family keeps its functors
// in the header named after it (<family>.h here), so a TU includes only what it runs.
#pragma once
#include <cstdint>

#include "macros.h"
#include "tensor_table.h"

namespace flm {

// x_i *= s for every element of every tensor (one list, written back).
// `scale` points at a float32 scalar in device (or host) memory, so a scale computed on the
// GPU (a clip coefficient, 1/loss_scale) is used without a host synchronisation.
struct ScaleOp {
  static constexpr int kLists = 1;
  static constexpr unsigned kWriteMask = 1u;
  const float* scale;

  struct Ctx {
    bool skip;
    float s;
  };
  FLM_HD Ctx context(const ChunkView& /*c*/) const { return Ctx{false, *scale}; }
  FLM_HD void operator()(const Ctx& ctx, float* v, int64_t /*index*/) const { v[0] *= ctx.s; }
};

}  // namespace flm
