// CUDA implementations of fused_lm::multi_tensor_adamw_ / multi_tensor_lion_ (schemas in
// csrc/cpu/optim.cpp). The kernels live in optim_*.cu, compiled without torch headers.
#include <vector>

#include "fused_lm/optim_checks.h"

namespace flm {
int launch_adamw(const LaunchTable& lt, DType param, DType state, bool amsgrad, bool master,
                 const OptimArgs& args);
int launch_lion(const LaunchTable& lt, DType param, DType state, bool amsgrad, bool master,
                const OptimArgs& args);
}  // namespace flm

namespace {

using Launcher = int (*)(const flm::LaunchTable&, flm::DType, flm::DType, bool, bool,
                         const flm::OptimArgs&);

void run_cuda(const char* name, Launcher launch, const std::vector<at::TensorList>& lists,
              at::TensorList steps, const at::Tensor& table, const at::Tensor& chunks,
              int64_t chunk_size, const at::Tensor& step_table, const at::Tensor& hp,
              const at::Tensor& grad_mult, const at::Tensor& skip, bool sr, int64_t seed,
              bool amsgrad, bool master, int64_t stream) {
  const at::Tensor& p0 = lists[0][0];
  TORCH_CHECK(p0.device().is_cuda() && table.device() == p0.device(), "fused_lm: CUDA ", name,
              " got tensors on ", p0.device(), " and a table on ", table.device());
  const flm::OptimArgs args =
      flm::optim_args(lists, steps, table, step_table, hp, grad_mult, skip, sr, seed);
  const int64_t n_lists = static_cast<int64_t>(lists.size());
  const flm::LaunchTable lt = flm::launch_table(table, chunks, n_lists, chunk_size, stream);
  const int err = launch(lt, flm::dtype_code(p0.scalar_type()),
                         flm::dtype_code(lists[2][0].scalar_type()), amsgrad, master, args);
  TORCH_CHECK(err == 0, "fused_lm: ", name, " launch failed for params ", p0.scalar_type(),
              " with state ", lists[2][0].scalar_type(), ": ", flm::cuda_error_string(err));
}

void adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                at::TensorList masters, at::TensorList steps, const at::Tensor& table,
                const at::Tensor& chunks, int64_t chunk_size, const at::Tensor& step_table,
                const at::Tensor& hp, const at::Tensor& grad_mult, const at::Tensor& skip,
                bool sr, int64_t seed, int64_t stream) {
  if (params.empty()) return;
  std::vector<at::TensorList> lists{params, grads, exp_avgs, exp_avg_sqs};
  if (!max_exp_avg_sqs.empty()) lists.push_back(max_exp_avg_sqs);
  if (!masters.empty()) lists.push_back(masters);
  run_cuda("multi_tensor_adamw_", &flm::launch_adamw, lists, steps, table, chunks, chunk_size,
           step_table, hp, grad_mult, skip, sr, seed, !max_exp_avg_sqs.empty(), !masters.empty(),
           stream);
}

void lion_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
               at::TensorList masters, at::TensorList steps, const at::Tensor& table,
               const at::Tensor& chunks, int64_t chunk_size, const at::Tensor& step_table,
               const at::Tensor& hp, const at::Tensor& grad_mult, const at::Tensor& skip, bool sr,
               int64_t seed, int64_t stream) {
  if (params.empty()) return;
  std::vector<at::TensorList> lists{params, grads, exp_avgs};
  if (!masters.empty()) lists.push_back(masters);
  run_cuda("multi_tensor_lion_", &flm::launch_lion, lists, steps, table, chunks, chunk_size,
           step_table, hp, grad_mult, skip, sr, seed, false, !masters.empty(), stream);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lm, CUDA, m) {
  m.impl("multi_tensor_adamw_", &adamw_cuda);
  m.impl("multi_tensor_lion_", &lion_cuda);
}
