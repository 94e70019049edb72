// The plain-C++ boundary between the torch bindings (*.cpp, compiled by the host compiler with
// torch's CPU headers) and the CUDA kernels (*.cu, compiled by nvcc with no torch header at all).
// Keeping torch out of the .cu files keeps them fast to compile and lets the same sources build
// against the CPU wheel of torch, which ships no c10/cuda or ATen/cuda headers.
#pragma once
#include <cstdint>

#include "dtypes.h"

namespace flm {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// The one dtype dispatch: calls f(T{}) with T the storage type of `d` (float, bf16, fp16); false
// for a value outside the enum (the torch bindings only make valid ones: dtype_code).
template <typename F>
bool dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::kFloat32: f(float{}); return true;
    case DType::kBFloat16: f(bf16{}); return true;
    case DType::kFloat16: f(fp16{}); return true;
  }
  return false;
}

struct LaunchTable {
  const int64_t* table;   // device pointer, (n_tensors, lists + 2), see tensor_table.h
  const int64_t* chunks;  // device pointer, (n_chunks, 2)
  int64_t lists;
  int64_t n_chunks;
  int64_t chunk_size;
  void* stream;           // cudaStream_t, from torch.cuda.current_stream().cuda_stream
};

// Returns a static message for a cudaError_t code (defined in csrc/cuda/common.cu).
const char* cuda_error_string(int code);

// Number of elements one chunk covers; the Python table builder uses the same value.
constexpr int64_t kDefaultChunk = 16384;

// Blocks on grid.x of one launch (CUDA's limit; the multi-tensor kernels put one block per chunk
// there, as the Triton launchers do: MAX_GRID_X in fused_lm/ops/_multi_tensor.py).
constexpr int64_t kMaxGridX = 2147483647;

}  // namespace flm
