// Every CUDA launcher (csrc/cuda/*.cu), declared once. The .cu files that define them, the torch
// bindings that call them (csrc/cuda/*_binding.cpp) and the emulator's shims (csrc/emu/shims.cpp,
// which defines FLM_LAUNCHER as a weak attribute first) all include this header, so a changed
// signature fails to compile everywhere instead of failing to link, or linking wrongly.
// Each returns 0 or a cudaError_t code.
#pragma once
#include <cstdint>

#include "launch.h"
#include "optim.h"

#ifndef FLM_LAUNCHER
#define FLM_LAUNCHER
#endif

namespace flm {

// AdamW / Lion: the step increment, then the update of every tensor of the table (adamw.cu,
// lion.cu).
FLM_LAUNCHER int launch_adamw(const LaunchTable& lt, DType param, DType state, bool amsgrad,
                              bool master, const OptimArgs& args);
FLM_LAUNCHER int launch_lion(const LaunchTable& lt, DType param, DType state, bool amsgrad,
                             bool master, const OptimArgs& args);
// x *= *scale; x = clamp(x, lo, hi) (multi_tensor_scale.cu, multi_tensor_clamp.cu).
FLM_LAUNCHER int launch_multi_tensor_scale(const LaunchTable& lt, DType dtype, const float* scale);
FLM_LAUNCHER int launch_multi_tensor_clamp(const LaunchTable& lt, DType dtype, float lo, float hi);
// The norm: per-chunk partials, then one finalise writing [norm, coef, flag] (multi_tensor_norm.cu).
FLM_LAUNCHER int launch_multi_tensor_norm_partials(const LaunchTable& lt, DType dtype, int kind,
                                                   float p, float* partials);
FLM_LAUNCHER int launch_multi_tensor_norm_finalize(const float* partials, int64_t n, int kind,
                                                   float p, float max_norm, float* out,
                                                   void* stream);

}  // namespace flm
