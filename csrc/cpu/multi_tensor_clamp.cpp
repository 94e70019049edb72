// multi_tensor_clamp_ on the CPU: x = min(max(x, lo), hi) over a TensorTable (ClampOp from
// multi_tensor_clamp.h, the functor the CUDA kernel runs). Schema: fused_lm/schemas.h.
#include "fused_lm/cpu_multi_tensor.h"
#include "fused_lm/multi_tensor_clamp.h"
#include "fused_lm/torch_utils.h"

namespace {

void multi_tensor_clamp_cpu(const at::Tensor& table, const at::Tensor& chunks, int64_t chunk_size,
                            c10::ScalarType dtype, double lo, double hi, int64_t /*stream*/) {
  TORCH_CHECK(table.device().is_cpu(), "fused_lm: CPU kernel got a table on ", table.device());
  const flm::DType code = flm::dtype_code(dtype);
  const flm::LaunchTable lt = flm::launch_table(table, chunks, 1, chunk_size, 0);
  const flm::TensorTable tt{lt.table, lt.chunks, 1, chunk_size};
  const flm::ClampOp op{static_cast<float>(lo), static_cast<float>(hi)};
  flm::dispatch_dtype(code, [&](auto t) {
    flm::cpu_multi_tensor_apply<flm::ClampOp, decltype(t)>(tt, lt.n_chunks, op);
  });
}

}  // namespace


TORCH_LIBRARY_IMPL(fused_lm, CPU, m) { m.impl("multi_tensor_clamp_", &multi_tensor_clamp_cpu); }
