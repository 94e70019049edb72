// Helpers for the torch-facing bindings (host compiler only; never included by .cu files).
#pragma once
#include <torch/library.h>
#include <ATen/core/Tensor.h>

#include "launch.h"

namespace flm {

inline DType dtype_code(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return DType::kFloat32;
    case c10::ScalarType::BFloat16: return DType::kBFloat16;
    case c10::ScalarType::Half: return DType::kFloat16;
    default:
      TORCH_CHECK(false, "fused_lm: unsupported dtype ", t,
                  "; expected float32, bfloat16 or float16");
  }
}

// Validates the (table, chunks) pair built by fused_lm/ops/_multi_tensor.py.
inline LaunchTable launch_table(const at::Tensor& table, const at::Tensor& chunks, int64_t lists,
                                int64_t chunk_size, int64_t stream) {
  TORCH_CHECK(table.scalar_type() == c10::ScalarType::Long && table.dim() == 2 &&
                  table.size(1) == lists + 2 && table.is_contiguous(),
              "fused_lm: tensor table must be a contiguous int64 (n, ", lists + 2, ") tensor, got ",
              table.scalar_type(), " ", table.sizes());
  TORCH_CHECK(chunks.scalar_type() == c10::ScalarType::Long && chunks.dim() == 2 &&
                  chunks.size(1) == 2 && chunks.is_contiguous(),
              "fused_lm: chunk table must be a contiguous int64 (n, 2) tensor, got ",
              chunks.scalar_type(), " ", chunks.sizes());
  TORCH_CHECK(table.device() == chunks.device(), "fused_lm: tables on different devices");
  TORCH_CHECK(chunk_size > 0, "fused_lm: chunk_size must be positive");
  TORCH_CHECK(!table.is_cuda() || chunks.size(0) <= kMaxGridX, "fused_lm: ", chunks.size(0),
              " chunks of ", chunk_size, " elements exceed the ", kMaxGridX,
              " blocks of a CUDA launch grid; expected fewer elements per launch or a larger "
              "chunk_size");
  return LaunchTable{table.data_ptr<int64_t>(), chunks.data_ptr<int64_t>(), lists,
                     chunks.size(0), chunk_size, reinterpret_cast<void*>(stream)};
}

inline void check_scalar(const at::Tensor& s, const at::Tensor& like, const char* name) {
  TORCH_CHECK(s.numel() == 1 && s.scalar_type() == c10::ScalarType::Float,
              "fused_lm: ", name, " must be a one-element float32 tensor, got ", s.scalar_type(),
              " with ", s.numel(), " elements");
  TORCH_CHECK(s.device() == like.device(), "fused_lm: ", name, " is on ", s.device(),
              " but the tensors are on ", like.device());
}

}  // namespace flm
