// Argument checks of the optimizer ops, shared by the CPU (csrc/cpu/optim.cpp) and CUDA
// (csrc/cuda/optim_binding.cpp) bindings. Host compiler only (torch headers).
#pragma once
#include <vector>

#include "fused_lm/optim_functors.h"
#include "fused_lm/torch_utils.h"

namespace flm {

// Validates the lists and scalars of one bucket and returns the kernel arguments. `lists` are
// the table's lists in order; empty optional lists are skipped by the caller.
inline OptimArgs optim_args(const std::vector<at::TensorList>& lists, at::TensorList steps,
                            const at::Tensor& table, const at::Tensor& step_table,
                            const at::Tensor& hp, const at::Tensor& grad_mult,
                            const at::Tensor& skip, bool sr, int64_t seed) {
  const at::Tensor& first = lists[0][0];
  const int64_t n = static_cast<int64_t>(lists[0].size());
  for (size_t k = 0; k < lists.size(); ++k) {
    TORCH_CHECK(static_cast<int64_t>(lists[k].size()) == n, "fused_lm: tensor list ", k, " has ",
                lists[k].size(), " tensors, the params list has ", n);
  }
  TORCH_CHECK(static_cast<int64_t>(steps.size()) == n, "fused_lm: ", steps.size(),
              " step tensors for ", n, " params");
  TORCH_CHECK(table.size(0) == n, "fused_lm: tensor table has ", table.size(0), " rows for ", n,
              " params");
  TORCH_CHECK(step_table.scalar_type() == c10::ScalarType::Long && step_table.numel() == n &&
                  step_table.is_contiguous() && step_table.device() == first.device(),
              "fused_lm: step_table must be a contiguous int64 tensor of ", n,
              " addresses on ", first.device());
  TORCH_CHECK(hp.scalar_type() == c10::ScalarType::Float && hp.dim() == 2 &&
                  hp.size(1) == kHpCols && hp.is_contiguous() && hp.device() == first.device(),
              "fused_lm: hp must be a contiguous float32 (n_groups, ", kHpCols, ") tensor on ",
              first.device(), ", got ", hp.scalar_type(), " ", hp.sizes(), " on ", hp.device());
  check_scalar(grad_mult, first, "grad_mult");
  check_scalar(skip, first, "skip");
  return OptimArgs{hp.data_ptr<float>(), step_table.data_ptr<int64_t>(), n,
                   grad_mult.data_ptr<float>(), skip.data_ptr<float>(),
                   static_cast<uint32_t>(seed & 0xffffffff), sr};
}

}  // namespace flm
