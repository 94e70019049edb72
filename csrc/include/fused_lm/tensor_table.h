// The device-resident tensor table that drives every multi-tensor kernel.
//
// A multi-tensor launch processes L parallel lists of tensors (e.g. params, grads, exp_avg,
// exp_avg_sq) whose i-th entries have the same number of elements. Instead of passing addresses
// by value in kernel arguments (Apex's approach, which caps a launch at a few dozen tensors and
// forces many launches), the host builds two int64 tables once, uploads them, and caches them
// until the tensors change (fused_lm/ops/_multi_tensor.py builds them):
//
//   table  (n_tensors, L + 2):  [addr_0, ..., addr_{L-1}, numel, group]
//   chunks (n_chunks, 2):       [tensor index, first element]   (chunk_size elements each)
//
// One thread block (CUDA), one program (Triton) or one OpenMP iteration (CPU) handles one chunk,
// so a step is ONE launch whatever the number of tensors, and big tensors are spread over many
// blocks. `group` indexes a small device table of per-param-group hyperparameters.
#pragma once
#include <cstdint>

#include "macros.h"

namespace flm {

struct TensorTable {
  const int64_t* table;   // (n_tensors, lists + 2)
  const int64_t* chunks;  // (n_chunks, 2)
  int64_t lists;          // L
  int64_t chunk_size;

  FLM_HD const int64_t* row(int64_t tensor) const { return table + tensor * (lists + 2); }
};

// The slice of one tensor that one chunk covers: elements [begin, end).
struct ChunkView {
  const int64_t* row;
  int64_t tensor;  // index of the tensor in the table (stable across steps: table order)
  int64_t begin;
  int64_t end;
  int64_t group;

  FLM_HD void* ptr(int list) const { return reinterpret_cast<void*>(row[list]); }
};

FLM_HD ChunkView chunk_view(const TensorTable& t, int64_t chunk) {
  const int64_t tensor = t.chunks[2 * chunk];
  const int64_t begin = t.chunks[2 * chunk + 1];
  const int64_t* row = t.row(tensor);
  const int64_t numel = row[t.lists];
  const int64_t end = begin + t.chunk_size < numel ? begin + t.chunk_size : numel;
  return ChunkView{row, tensor, begin, end, row[t.lists + 1]};
}

}  // namespace flm
