// CUDA implementation of fused_lm::multi_tensor_adamw_ (schema: fused_lm/schemas.h): the shared
// optimizer binding (optim_binding.h) with launch_adamw (adamw.cu).
#include "optim_binding.h"

namespace {

void adamw_cuda(const at::Tensor& table, const at::Tensor& chunks, int64_t chunk_size,
                const at::Tensor& step_table, const at::Tensor& hp, const at::Tensor& grad_mult,
                const at::Tensor& skip, int64_t n_lists, c10::ScalarType param_dtype,
                c10::ScalarType state_dtype, bool amsgrad, bool master, bool sr, int64_t seed,
                int64_t stream) {
  run_cuda("multi_tensor_adamw_", true, &flm::launch_adamw, table, chunks, chunk_size,
           step_table, hp, grad_mult, skip, n_lists, param_dtype, state_dtype, amsgrad, master,
           sr, seed, stream);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lm, CUDA, m) {
  m.impl("multi_tensor_adamw_", &adamw_cuda);
}
