// CUDA implementations of fused_lm::multi_tensor_adamw_ / multi_tensor_lion_ (schemas in
// fused_lm/schemas.h; they take the tables, not tensor lists): the part both share. Each op's
// binding (adamw_binding.cpp, lion_binding.cpp) calls run_cuda with its launcher (adamw.cu,
// lion.cu, compiled without torch headers). Internal linkage (an unnamed namespace): _C_cuda
// exports no symbol for it.
#pragma once
#include "fused_lm/launchers.h"
#include "fused_lm/optim_checks.h"

namespace {

using Launcher = int (*)(const flm::LaunchTable&, flm::DType, flm::DType, bool, bool,
                         const flm::OptimArgs&);

void run_cuda(const char* name, bool adamw, Launcher launch, const at::Tensor& table,
              const at::Tensor& chunks, int64_t chunk_size, const at::Tensor& step_table,
              const at::Tensor& hp, const at::Tensor& grad_mult, const at::Tensor& skip,
              int64_t n_lists, c10::ScalarType param_dtype, c10::ScalarType state_dtype,
              bool amsgrad, bool master, bool sr, int64_t seed, int64_t stream) {
  TORCH_CHECK(table.device().is_cuda(), "fused_lm: CUDA ", name, " got a table on ",
              table.device());
  flm::check_optim_lists(name, n_lists, adamw, amsgrad, master);
  const flm::LaunchTable lt = flm::launch_table(table, chunks, n_lists, chunk_size, stream);
  const flm::OptimArgs args =
      flm::optim_args(table, step_table, hp, grad_mult, skip, sr, seed);
  const flm::DType p = flm::dtype_code(param_dtype);
  const flm::DType s = flm::dtype_code(state_dtype);
  if (args.n_tensors == 0) return;
  const int err = launch(lt, p, s, amsgrad, master, args);
  TORCH_CHECK(err == 0, "fused_lm: ", name, " launch failed for params ", param_dtype,
              " with state ", state_dtype, ": ", flm::cuda_error_string(err));
}

}  // namespace
