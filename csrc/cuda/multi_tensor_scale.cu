// multi_tensor_scale_ on CUDA: x_i *= s, one launch over a TensorTable (ScaleOp,
// multi_tensor_scale.h). Bytes moved: 2 * numel * sizeof(T) (read + write).
#include "fused_lm/launchers.h"
#include "fused_lm/multi_tensor_apply.cuh"
#include "fused_lm/multi_tensor_scale.h"

namespace flm {

int launch_multi_tensor_scale(const LaunchTable& lt, DType dtype, const float* scale) {
  const TensorTable tt{lt.table, lt.chunks, lt.lists, lt.chunk_size};
  const ScaleOp op{scale};
  auto stream = static_cast<cudaStream_t>(lt.stream);
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_dtype(dtype, [&](auto t) {
    err = multi_tensor_apply<ScaleOp, decltype(t)>(tt, lt.n_chunks, op, stream);
  });
  return err;
}

}  // namespace flm
