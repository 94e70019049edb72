// The CPU runner shared by the adamw and lion ops (csrc/cpu/adamw.cpp, lion.cpp): their functors
// (AdamWOp, LionOp: the very code the CUDA kernels run) under cpu_multi_tensor_apply (OpenMP over
// chunks, SIMD over elements). One call = the step increment of every tensor + the update of
// every tensor. Internal linkage (an unnamed namespace): each op's TU instantiates only its own
// family's runner, and _C exports no symbol for it.
#pragma once
#include "fused_lm/cpu_multi_tensor.h"
#include "fused_lm/optim.h"
#include "fused_lm/optim_checks.h"

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
void run_cpu(const char* name, bool adamw, const at::Tensor& table, const at::Tensor& chunks,
             int64_t chunk_size, const at::Tensor& step_table, const at::Tensor& hp,
             const at::Tensor& grad_mult, const at::Tensor& skip, int64_t n_lists,
             c10::ScalarType param_dtype, c10::ScalarType state_dtype, bool amsgrad, bool master,
             bool sr, int64_t seed) {
  TORCH_CHECK(table.device().is_cpu(), "fused_lm: CPU ", name, " got a table on ",
              table.device());
  flm::check_optim_lists(name, n_lists, adamw, amsgrad, master);
  const flm::LaunchTable lt = flm::launch_table(table, chunks, n_lists, chunk_size, 0);
  const flm::OptimArgs args =
      flm::optim_args(table, step_table, hp, grad_mult, skip, sr, seed);
  const flm::DType p = flm::dtype_code(param_dtype);
  const flm::DType s = flm::dtype_code(state_dtype);
  if (args.n_tensors == 0) return;
  const flm::TensorTable tt{lt.table, lt.chunks, n_lists, chunk_size};
  const bool ok = flm::optim_dispatch<Family>(p, s, amsgrad, master, [&](auto tag) {
    using Tag = decltype(tag);
    using Op = typename Tag::Op;
    static_assert(Op::kLists >= 3, "bad op");
    TORCH_CHECK(Op::kLists == n_lists, "fused_lm: ", name, " got ", n_lists, " lists");
    increment_steps(args);
    apply_lists(tt, lt.n_chunks, Op{args}, typename Tag::Lists{});
  });
  TORCH_CHECK(ok, "fused_lm: ", name, " has no kernel for params ", param_dtype, " with state ",
              state_dtype, master ? " and master weights" : "",
              "; expected state float32, bfloat16 or the param dtype (master weights for 16-bit "
              "params only)");
}

}  // namespace
