// AdamW and Lion on the CPU: the AdamWOp / LionOp functors of optim_functors.h (the very code the
// CUDA kernels run) under cpu_multi_tensor_apply (OpenMP over chunks, SIMD over elements).
// Also defines the schemas of both ops (the CPU extension is always built; _C_cuda adds CUDA
// kernels). One call = the step increment of every tensor + the update of every tensor.
#include <vector>

#include "fused_lm/cpu_multi_tensor.h"
#include "fused_lm/optim_checks.h"
#include "fused_lm/optim_functors.h"

namespace {

template <typename Op, typename... Ts>
void apply_lists(const flm::TensorTable& tt, int64_t n_chunks, const Op& op, flm::TypeList<Ts...>) {
  flm::cpu_multi_tensor_apply<Op, Ts...>(tt, n_chunks, op);
}

void increment_steps(const flm::OptimArgs& a) {
  const float inc = *a.skip != 0.0f ? 0.0f : 1.0f;
  for (int64_t i = 0; i < a.n_tensors; ++i) *reinterpret_cast<float*>(a.step_table[i]) += inc;
}

template <typename Family>
void run_cpu(const char* name, const std::vector<at::TensorList>& lists, at::TensorList steps,
             const at::Tensor& table, const at::Tensor& chunks, int64_t chunk_size,
             const at::Tensor& step_table, const at::Tensor& hp, const at::Tensor& grad_mult,
             const at::Tensor& skip, bool sr, int64_t seed, bool amsgrad, bool master) {
  const at::Tensor& p0 = lists[0][0];
  TORCH_CHECK(p0.device().is_cpu() && table.device().is_cpu(), "fused_lm: CPU ", name,
              " got tensors on ", p0.device(), " and a table on ", table.device());
  const flm::OptimArgs args =
      flm::optim_args(lists, steps, table, step_table, hp, grad_mult, skip, sr, seed);
  const int64_t n_lists = static_cast<int64_t>(lists.size());
  const flm::LaunchTable lt = flm::launch_table(table, chunks, n_lists, chunk_size, 0);
  const flm::TensorTable tt{lt.table, lt.chunks, n_lists, chunk_size};
  const bool ok = flm::optim_dispatch<Family>(
      flm::dtype_code(p0.scalar_type()), flm::dtype_code(lists[2][0].scalar_type()), amsgrad,
      master, [&](auto tag) {
        using Tag = decltype(tag);
        using Op = typename Tag::Op;
        static_assert(Op::kLists >= 3, "bad op");
        TORCH_CHECK(Op::kLists == n_lists, "fused_lm: ", name, " got ", n_lists, " lists");
        increment_steps(args);
        apply_lists(tt, lt.n_chunks, Op{args}, typename Tag::Lists{});
      });
  TORCH_CHECK(ok, "fused_lm: ", name, " has no kernel for params ", p0.scalar_type(),
              " with state ", lists[2][0].scalar_type(), master ? " and master weights" : "",
              "; expected state float32, bfloat16 or the param dtype (master weights for 16-bit "
              "params only)");
}

void adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList masters,
               at::TensorList steps, const at::Tensor& table, const at::Tensor& chunks,
               int64_t chunk_size, const at::Tensor& step_table, const at::Tensor& hp,
               const at::Tensor& grad_mult, const at::Tensor& skip, bool sr, int64_t seed,
               int64_t /*stream*/) {
  if (params.empty()) return;
  std::vector<at::TensorList> lists{params, grads, exp_avgs, exp_avg_sqs};
  if (!max_exp_avg_sqs.empty()) lists.push_back(max_exp_avg_sqs);
  if (!masters.empty()) lists.push_back(masters);
  run_cpu<flm::AdamWFamily>("multi_tensor_adamw_", lists, steps, table, chunks, chunk_size,
                            step_table, hp, grad_mult, skip, sr, seed, !max_exp_avg_sqs.empty(),
                            !masters.empty());
}

void lion_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
              at::TensorList masters, at::TensorList steps, const at::Tensor& table,
              const at::Tensor& chunks, int64_t chunk_size, const at::Tensor& step_table,
              const at::Tensor& hp, const at::Tensor& grad_mult, const at::Tensor& skip, bool sr,
              int64_t seed, int64_t /*stream*/) {
  if (params.empty()) return;
  std::vector<at::TensorList> lists{params, grads, exp_avgs};
  if (!masters.empty()) lists.push_back(masters);
  run_cpu<flm::LionFamily>("multi_tensor_lion_", lists, steps, table, chunks, chunk_size,
                           step_table, hp, grad_mult, skip, sr, seed, false, !masters.empty());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_lm, m) {
  m.def("multi_tensor_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] master_params, "
        "Tensor(f!)[] steps, Tensor table, Tensor chunks, int chunk_size, Tensor step_table, "
        "Tensor hp, Tensor grad_mult, Tensor skip, bool stochastic_rounding, int seed, "
        "int stream) -> ()");
  m.def("multi_tensor_lion_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(e!)[] master_params, Tensor(f!)[] steps, Tensor table, Tensor chunks, "
        "int chunk_size, Tensor step_table, Tensor hp, Tensor grad_mult, Tensor skip, "
        "bool stochastic_rounding, int seed, int stream) -> ()");
}

TORCH_LIBRARY_IMPL(fused_lm, CPU, m) {
  m.impl("multi_tensor_adamw_", &adamw_cpu);
  m.impl("multi_tensor_lion_", &lion_cpu);
}
