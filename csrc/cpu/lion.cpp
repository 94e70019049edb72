// multi_tensor_lion_ on the CPU: LionOp (fused_lm/lion.h, the very code the CUDA kernel runs)
// under the optimizer runner shared with adamw (optim.h). Schema: fused_lm/schemas.h.
#include "fused_lm/lion.h"
#include "optim_runner.h"

namespace {

void lion_cpu(const at::Tensor& table, const at::Tensor& chunks, int64_t chunk_size,
              const at::Tensor& step_table, const at::Tensor& hp, const at::Tensor& grad_mult,
              const at::Tensor& skip, int64_t n_lists, c10::ScalarType param_dtype,
              c10::ScalarType state_dtype, bool master, bool sr, int64_t seed,
              int64_t /*stream*/) {
  run_cpu<flm::LionFamily>("multi_tensor_lion_", false, table, chunks, chunk_size, step_table,
                           hp, grad_mult, skip, n_lists, param_dtype, state_dtype, false, master,
                           sr, seed);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lm, CPU, m) {
  m.impl("multi_tensor_lion_", &lion_cpu);
}
