// CUDA implementation of fused_lm::multi_tensor_clamp_ (schema: fused_lm/schemas.h).
#include "fused_lm/launchers.h"
#include "fused_lm/torch_utils.h"


namespace {

void multi_tensor_clamp_cuda(const at::Tensor& table, const at::Tensor& chunks, int64_t chunk_size,
                             c10::ScalarType dtype, double lo, double hi, int64_t stream) {
  TORCH_CHECK(table.device().is_cuda(), "fused_lm: CUDA kernel got a table on ", table.device());
  const flm::DType code = flm::dtype_code(dtype);
  const flm::LaunchTable lt = flm::launch_table(table, chunks, 1, chunk_size, stream);
  const int err = flm::launch_multi_tensor_clamp(lt, code, static_cast<float>(lo),
                                                 static_cast<float>(hi));
  TORCH_CHECK(err == 0, "fused_lm: multi_tensor_clamp_ launch failed: ", flm::cuda_error_string(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lm, CUDA, m) { m.impl("multi_tensor_clamp_", &multi_tensor_clamp_cuda); }
