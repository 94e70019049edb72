// CUDA implementation of fused_lm::multi_tensor_scale_ (schema in csrc/cpu/multi_tensor_scale.cpp).
#include "fused_lm/torch_utils.h"

namespace flm {
int launch_multi_tensor_scale(const LaunchTable& lt, DType dtype, const float* scale);
}

namespace {

void multi_tensor_scale_cuda(at::TensorList tensors, const at::Tensor& table,
                             const at::Tensor& chunks, int64_t chunk_size,
                             const at::Tensor& scale, int64_t stream) {
  if (tensors.empty()) return;
  TORCH_CHECK(table.device() == tensors[0].device(), "fused_lm: table on ", table.device(),
              ", tensors on ", tensors[0].device());
  flm::check_scalar(scale, tensors[0], "scale");
  const flm::LaunchTable lt = flm::launch_table(table, chunks, 1, chunk_size, stream);
  const int err = flm::launch_multi_tensor_scale(lt, flm::dtype_code(tensors[0].scalar_type()),
                                                 scale.data_ptr<float>());
  TORCH_CHECK(err == 0, "fused_lm: multi_tensor_scale_ launch failed: ", flm::cuda_error_string(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lm, CUDA, m) { m.impl("multi_tensor_scale_", &multi_tensor_scale_cuda); }
