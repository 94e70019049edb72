// Lion on CUDA: the step-increment kernel, then one multi_tensor_apply launch of LionOp
// (fused_lm/lion.h, shared with the CPU kernel) over every chunk of every tensor of a bucket.
// Bytes per element (fp32 params and state): 12 read + 8 written = 20.
#include "fused_lm/lion.h"
#include "fused_lm/launchers.h"
#include "fused_lm/multi_tensor_apply.cuh"
#include "optim_common.cuh"

namespace flm {

int launch_lion(const LaunchTable& lt, DType param, DType state, bool amsgrad, bool master,
                 const OptimArgs& args) {
  auto stream = static_cast<cudaStream_t>(lt.stream);
  cudaError_t err = launch_step_increment(args, stream);
  if (err != cudaSuccess) return err;
  const TensorTable tt{lt.table, lt.chunks, lt.lists, lt.chunk_size};
  const bool ok = optim_dispatch<LionFamily>(param, state, amsgrad, master, [&](auto tag) {
    using Tag = decltype(tag);
    err = apply_lists(tt, lt.n_chunks, typename Tag::Op{args}, stream, typename Tag::Lists{});
  });
  return ok ? int(err) : int(cudaErrorInvalidValue);
}

}  // namespace flm
