// Argument checks of the optimizer ops, shared by the CPU (csrc/cpu/optim_runner.h) and CUDA
// (csrc/cuda/optim_binding.h) bindings of adamw and lion. Host compiler only (torch headers).
//
// The ops take no tensor lists: the kernels read every address from the tensor table, which the
// Python engine builds from lists it has already validated (fused_lm/optim/_base.py: equal
// lengths and sizes, dense, contiguous, one device, one param dtype and one state dtype per
// bucket). What is checked here is cheap: the tables' and scalars' shapes, dtypes and device,
// and that the (param, state) dtypes and list count are ones the kernels implement.
#pragma once

#include "fused_lm/lists.h"
#include "fused_lm/optim.h"
#include "fused_lm/torch_utils.h"

namespace flm {

// Validates the step table, hyperparameter table and scalars of one bucket against the tensor
// table (same device, one step counter per row) and returns the kernel arguments.
inline OptimArgs optim_args(const at::Tensor& table, const at::Tensor& step_table,
                            const at::Tensor& hp, const at::Tensor& grad_mult,
                            const at::Tensor& skip, bool sr, int64_t seed) {
  const int64_t n = table.size(0);
  TORCH_CHECK(step_table.scalar_type() == c10::ScalarType::Long && step_table.numel() == n &&
                  step_table.is_contiguous() && step_table.device() == table.device(),
              "fused_lm: step_table must be a contiguous int64 tensor of ", n,
              " addresses (one per table row) on ", table.device(), ", got ",
              step_table.scalar_type(), " ", step_table.sizes(), " on ", step_table.device());
  TORCH_CHECK(hp.scalar_type() == c10::ScalarType::Float && hp.dim() == 2 &&
                  hp.size(1) == kHpCols && hp.is_contiguous() && hp.device() == table.device(),
              "fused_lm: hp must be a contiguous float32 (n_groups, ", kHpCols, ") tensor on ",
              table.device(), ", got ", hp.scalar_type(), " ", hp.sizes(), " on ", hp.device());
  check_scalar(grad_mult, table, "grad_mult");
  check_scalar(skip, table, "skip");
  return OptimArgs{hp.data_ptr<float>(), step_table.data_ptr<int64_t>(), n,
                   grad_mult.data_ptr<float>(), skip.data_ptr<float>(),
                   static_cast<uint32_t>(seed & 0xffffffff), sr};
}

// The number of table lists of a bucket (the family specs' layouts, lists.h).
inline int64_t expected_lists(bool adamw, bool amsgrad, bool master) {
  return adamw ? lists::adamw::count(amsgrad, master) : lists::lion::count(master);
}

inline void check_optim_lists(const char* name, int64_t n_lists, bool adamw, bool amsgrad,
                              bool master) {
  TORCH_CHECK(adamw || !amsgrad, "fused_lm: ", name, " has no amsgrad variant");
  const int64_t want = expected_lists(adamw, amsgrad, master);
  TORCH_CHECK(n_lists == want, "fused_lm: ", name, " got n_lists=", n_lists, "; expected ", want,
              " for amsgrad=", amsgrad, ", master=", master);
}

}  // namespace flm
