// The schema of every op of the compiled extensions, in one place. fused_lm._C defines them all
// (csrc/cpu/module.cpp); the CPU files and fused_lm._C_cuda only implement them, and _C_cuda
// imports fused_lm._C when it loads (csrc/cuda/module_cuda.cpp), so its CUDA implementations
// always have their schemas. A new op: one line here, its implementations, its launcher in
// launchers.h.
//
// The multi-tensor ops take no tensor lists: the kernels read every address from `table` (rows
// [addr_0..addr_{L-1}, numel, group], L lists; fused_lm/ops/_multi_tensor.py) and the chunks from
// `chunks`, so a call costs the same whatever the number of tensors. The tensors reached through
// the tables are updated in place; a schema cannot name them, so these ops are for eager use
// (not traceable by torch.compile). `stream`: the cudaStream_t as an integer (0 on the CPU).
#pragma once

namespace flm {

inline constexpr const char* kSchemas[] = {
    // x *= scale for every tensor (all of `dtype`) of the table.
    "multi_tensor_scale_(Tensor table, Tensor chunks, int chunk_size, ScalarType dtype, "
    "Tensor scale, int stream) -> ()",
    // x = clamp(x, lo, hi) for every tensor (all of `dtype`) of the table.
    "multi_tensor_clamp_(Tensor table, Tensor chunks, int chunk_size, ScalarType dtype, "
    "float lo, float hi, int stream) -> ()",
    // kind: 0 sum|x|, 1 sum x^2, 2 sum|x|^p, 3 max|x|, 4 min|x| (multi_tensor_norm.h): one partial
    // per chunk, then the finalise writes out = [norm, clip coefficient, non-finite flag].
    "multi_tensor_norm_partials_(Tensor table, Tensor chunks, int chunk_size, ScalarType dtype, "
    "Tensor(a!) partials, int kind, float p, int stream) -> ()",
    "multi_tensor_norm_finalize_(Tensor partials, Tensor(a!) out, int kind, float p, "
    "float max_norm, int stream) -> ()",
    // One call = the step increment of every tensor + the update of every tensor; the step
    // counters through `step_table`, the group hyperparameters from `hp`
    // (fused_lm/ops/_optim_common.py), the lists in the family spec's order (lists.h).
    "multi_tensor_adamw_(Tensor table, Tensor chunks, int chunk_size, Tensor step_table, "
    "Tensor hp, Tensor grad_mult, Tensor skip, int n_lists, ScalarType param_dtype, "
    "ScalarType state_dtype, bool amsgrad, bool master, bool stochastic_rounding, int seed, "
    "int stream) -> ()",
    "multi_tensor_lion_(Tensor table, Tensor chunks, int chunk_size, Tensor step_table, "
    "Tensor hp, Tensor grad_mult, Tensor skip, int n_lists, ScalarType param_dtype, "
    "ScalarType state_dtype, bool master, bool stochastic_rounding, int seed, "
    "int stream) -> ()",
};

}  // namespace flm
