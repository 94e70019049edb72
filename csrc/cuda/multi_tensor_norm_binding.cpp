// CUDA implementations of fused_lm::multi_tensor_norm_partials_ and
// fused_lm::multi_tensor_norm_finalize_ (schemas: fused_lm/schemas.h).
#include "fused_lm/launchers.h"
#include "fused_lm/torch_utils.h"


namespace {

void check_partials(const at::Tensor& partials, int64_t n, const at::Tensor& like) {
  TORCH_CHECK(partials.scalar_type() == c10::ScalarType::Float && partials.is_contiguous() &&
                  partials.numel() == n,
              "fused_lm: partials must be a contiguous float32 tensor of ", n, " elements, got ",
              partials.scalar_type(), " with ", partials.numel());
  TORCH_CHECK(partials.device() == like.device(), "fused_lm: partials on ", partials.device(),
              ", tables on ", like.device());
}

void norm_partials_cuda(const at::Tensor& table, const at::Tensor& chunks, int64_t chunk_size,
                        c10::ScalarType dtype, const at::Tensor& partials, int64_t kind, double p,
                        int64_t stream) {
  TORCH_CHECK(table.device().is_cuda(), "fused_lm: CUDA kernel got a table on ", table.device());
  TORCH_CHECK(kind >= 0 && kind <= 4, "fused_lm: norm kind must be in [0, 4], got ", kind);
  const flm::DType code = flm::dtype_code(dtype);
  const flm::LaunchTable lt = flm::launch_table(table, chunks, 1, chunk_size, stream);
  check_partials(partials, lt.n_chunks, table);
  const int err = flm::launch_multi_tensor_norm_partials(
      lt, code, static_cast<int>(kind), static_cast<float>(p), partials.data_ptr<float>());
  TORCH_CHECK(err == 0, "fused_lm: multi_tensor_norm partials launch failed: ",
              flm::cuda_error_string(err));
}

void norm_finalize_cuda(const at::Tensor& partials, const at::Tensor& out, int64_t kind, double p,
                        double max_norm, int64_t stream) {
  TORCH_CHECK(kind >= 0 && kind <= 4, "fused_lm: norm kind must be in [0, 4], got ", kind);
  check_partials(partials, partials.numel(), out);
  TORCH_CHECK(out.scalar_type() == c10::ScalarType::Float && out.numel() == 3 &&
                  out.is_contiguous(),
              "fused_lm: out must be a contiguous float32 tensor of 3 elements (norm, coefficient, "
              "non-finite flag)");
  const int err = flm::launch_multi_tensor_norm_finalize(
      partials.data_ptr<float>(), partials.numel(), static_cast<int>(kind), static_cast<float>(p),
      static_cast<float>(max_norm), out.data_ptr<float>(), reinterpret_cast<void*>(stream));
  TORCH_CHECK(err == 0, "fused_lm: multi_tensor_norm finalise launch failed: ",
              flm::cuda_error_string(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lm, CUDA, m) {
  m.impl("multi_tensor_norm_partials_", &norm_partials_cuda);
  m.impl("multi_tensor_norm_finalize_", &norm_finalize_cuda);
}
