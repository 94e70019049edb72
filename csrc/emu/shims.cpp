// extern "C" entry points of the project's CUDA launchers (csrc/cuda/*.cu) for the emulator
// tests (tests/test_cuda_emulated.py, through ctypes). Each shim builds the launcher's argument
// structs from plain values, as the torch binding (csrc/cuda/*_binding.cpp) does from tensors.
//
// The launchers are declared weak: a library built from a subset of the .cu files (the mutation
// tests compile only the file they mutate) still loads, and a shim of a missing launcher returns
// kMissing.
//
// A new CUDA launcher gets one shim here and one entry in EMULATED_OPS of the test.
#include <cstdint>

#define FLM_LAUNCHER __attribute__((weak))
#include "fused_lm/launchers.h"

namespace {
constexpr int kMissing = -1;

flm::LaunchTable table(const int64_t* t, const int64_t* chunks, int64_t lists, int64_t n_chunks,
                       int64_t chunk_size) {
  return flm::LaunchTable{t, chunks, lists, n_chunks, chunk_size, nullptr};
}
}  // namespace

#define EMU_SHIM(launcher, ...) \
  if (!&flm::launcher) return kMissing; \
  return flm::launcher(__VA_ARGS__)
#define EMU_API extern "C" __attribute__((visibility("default"))) int
#define EMU_TABLE const int64_t *t, const int64_t *chunks, int64_t lists, int64_t n_chunks, \
                  int64_t chunk_size
#define EMU_OPTIM int p, int s, bool amsgrad, bool master, const float *hp, \
                  const int64_t *step_table, int64_t n_tensors, const float *grad_mult, \
                  const float *skip, uint32_t seed, bool sr

EMU_API emu_adamw(EMU_TABLE, EMU_OPTIM) {
  EMU_SHIM(launch_adamw, table(t, chunks, lists, n_chunks, chunk_size), flm::DType(p),
           flm::DType(s), amsgrad, master,
           flm::OptimArgs{hp, step_table, n_tensors, grad_mult, skip, seed, sr});
}
EMU_API emu_lion(EMU_TABLE, EMU_OPTIM) {
  EMU_SHIM(launch_lion, table(t, chunks, lists, n_chunks, chunk_size), flm::DType(p),
           flm::DType(s), amsgrad, master,
           flm::OptimArgs{hp, step_table, n_tensors, grad_mult, skip, seed, sr});
}
EMU_API emu_multi_tensor_scale(EMU_TABLE, int dtype, const float* scale) {
  EMU_SHIM(launch_multi_tensor_scale, table(t, chunks, lists, n_chunks, chunk_size),
           flm::DType(dtype), scale);
}
EMU_API emu_multi_tensor_clamp(EMU_TABLE, int dtype, float lo, float hi) {
  EMU_SHIM(launch_multi_tensor_clamp, table(t, chunks, lists, n_chunks, chunk_size),
           flm::DType(dtype), lo, hi);
}
EMU_API emu_multi_tensor_norm_partials(EMU_TABLE, int dtype, int kind, float p, float* partials) {
  EMU_SHIM(launch_multi_tensor_norm_partials, table(t, chunks, lists, n_chunks, chunk_size),
           flm::DType(dtype), kind, p, partials);
}
EMU_API emu_multi_tensor_norm_finalize(const float* partials, int64_t n, int kind, float p,
                                       float max_norm, float* out) {
  EMU_SHIM(launch_multi_tensor_norm_finalize, partials, n, kind, p, max_norm, out, nullptr);
}
