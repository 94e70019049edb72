// Pieces shared by the optimizer .cu files (adamw.cu, lion.cu, optim_step.cu).
#pragma once
#include <cuda_runtime.h>

#include "fused_lm/multi_tensor_apply.cuh"
#include "fused_lm/optim.h"

namespace flm {

// step += (skip == 0) for the n_tensors float32 counters of args.step_table (optim_step.cu).
cudaError_t launch_step_increment(const OptimArgs& args, cudaStream_t stream);

template <typename Op, typename... Ts>
cudaError_t apply_lists(const TensorTable& tt, int64_t n_chunks, const Op& op, cudaStream_t stream,
                        TypeList<Ts...>) {
  return multi_tensor_apply<Op, Ts...>(tt, n_chunks, op, stream);
}

}  // namespace flm
