// CUDA implementation of fused_lm::multi_tensor_scale_ (schema: fused_lm/schemas.h).
#include "fused_lm/launchers.h"
#include "fused_lm/torch_utils.h"


namespace {

void multi_tensor_scale_cuda(const at::Tensor& table, const at::Tensor& chunks, int64_t chunk_size,
                             c10::ScalarType dtype, const at::Tensor& scale, int64_t stream) {
  TORCH_CHECK(table.device().is_cuda(), "fused_lm: CUDA kernel got a table on ", table.device());
  flm::check_scalar(scale, table, "scale");
  const flm::DType code = flm::dtype_code(dtype);
  const flm::LaunchTable lt = flm::launch_table(table, chunks, 1, chunk_size, stream);
  const int err = flm::launch_multi_tensor_scale(lt, code, scale.data_ptr<float>());
  TORCH_CHECK(err == 0, "fused_lm: multi_tensor_scale_ launch failed: ", flm::cuda_error_string(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lm, CUDA, m) { m.impl("multi_tensor_scale_", &multi_tensor_scale_cuda); }
