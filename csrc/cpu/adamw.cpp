// multi_tensor_adamw_ on the CPU: AdamWOp (fused_lm/adamw.h, the very code the CUDA kernel runs)
// under the optimizer runner shared with lion (optim.h). Schema: fused_lm/schemas.h.
#include "fused_lm/adamw.h"
#include "optim_runner.h"

namespace {

void adamw_cpu(const at::Tensor& table, const at::Tensor& chunks, int64_t chunk_size,
               const at::Tensor& step_table, const at::Tensor& hp, const at::Tensor& grad_mult,
               const at::Tensor& skip, int64_t n_lists, c10::ScalarType param_dtype,
               c10::ScalarType state_dtype, bool amsgrad, bool master, bool sr, int64_t seed,
               int64_t /*stream*/) {
  run_cpu<flm::AdamWFamily>("multi_tensor_adamw_", true, table, chunks, chunk_size, step_table,
                            hp, grad_mult, skip, n_lists, param_dtype, state_dtype, amsgrad,
                            master, sr, seed);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lm, CPU, m) {
  m.impl("multi_tensor_adamw_", &adamw_cpu);
}
