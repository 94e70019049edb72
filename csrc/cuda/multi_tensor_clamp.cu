// multi_tensor_clamp_ on CUDA: x = min(max(x, lo), hi), one launch over a TensorTable
// (ClampOp, multi_tensor_clamp.h). Bytes moved: 2 * numel * sizeof(T) (read + write).
#include "fused_lm/launchers.h"
#include "fused_lm/multi_tensor_apply.cuh"
#include "fused_lm/multi_tensor_clamp.h"

namespace flm {

int launch_multi_tensor_clamp(const LaunchTable& lt, DType dtype, float lo, float hi) {
  const TensorTable tt{lt.table, lt.chunks, lt.lists, lt.chunk_size};
  const ClampOp op{lo, hi};
  auto stream = static_cast<cudaStream_t>(lt.stream);
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_dtype(dtype, [&](auto t) {
    err = multi_tensor_apply<ClampOp, decltype(t)>(tt, lt.n_chunks, op, stream);
  });
  return err;
}

}  // namespace flm
