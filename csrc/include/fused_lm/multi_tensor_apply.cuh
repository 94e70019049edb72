// Multi-tensor apply for CUDA: one launch over every chunk of every tensor in a TensorTable.
//
// An elementwise Op provides
//   static constexpr int kLists;              number of parallel tensor lists
//   static constexpr unsigned kWriteMask;      bit l set => list l is written back
//   struct Ctx { bool skip; ... };             per-chunk context (hyperparameters of the group)
//   Ctx context(const ChunkView& c) const;     once per chunk: e.g. the hyperparameters of
//                                              group c.group, the step of tensor c.tensor;
//                                              ctx.skip = true skips the chunk (found_inf)
//   void operator()(const Ctx&, float* v, int64_t index) const;
//                                              float32 math on the kLists values of one element,
//                                              `index` is the element's index in its tensor
// The same Op runs on the CPU through cpu_multi_tensor.h, so both backends share the math.
//
// Memory access: each thread owns kILP consecutive elements per step. When every list's pointer
// and the chunk start are aligned to kILP elements, loads and stores are single vector accesses
// (16 bytes for float32 with kILP = 4); otherwise a scalar path with bounds checks handles the
// chunk. All tensor offsets are int64, so tensors beyond 2^31 elements work.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "dtypes.h"
#include "launch.h"
#include "tensor_table.h"

namespace flm {

constexpr int kILP = 4;
constexpr int kBlockThreads = 256;

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename... Ts, size_t... I>
__device__ __forceinline__ bool all_aligned(const ChunkView& c, std::index_sequence<I...>) {
  return ((reinterpret_cast<uintptr_t>(static_cast<const Ts*>(c.ptr(I)) + c.begin) %
               (sizeof(Ts) * kILP) == 0) && ...);
}

template <typename T>
__device__ __forceinline__ void load_vec(float (&dst)[kILP], const void* base, int64_t i) {
  const Vec<T, kILP> x = *reinterpret_cast<const Vec<T, kILP>*>(static_cast<const T*>(base) + i);
#pragma unroll
  for (int k = 0; k < kILP; ++k) dst[k] = to_float(x.v[k]);
}

template <typename T>
__device__ __forceinline__ void store_vec(const float (&src)[kILP], void* base, int64_t i) {
  Vec<T, kILP> x;
#pragma unroll
  for (int k = 0; k < kILP; ++k) x.v[k] = from_float<T>(src[k]);
  *reinterpret_cast<Vec<T, kILP>*>(static_cast<T*>(base) + i) = x;
}

template <typename Op, typename... Ts, size_t... I>
__device__ __forceinline__ void step_vector(const Op& op, const typename Op::Ctx& ctx,
                                            const ChunkView& c, int64_t i,
                                            std::index_sequence<I...>) {
  float v[Op::kLists][kILP];
  (load_vec<Ts>(v[I], c.ptr(I), i), ...);
#pragma unroll
  for (int k = 0; k < kILP; ++k) {
    float e[Op::kLists];
    ((e[I] = v[I][k]), ...);
    op(ctx, e, i + k);
    ((v[I][k] = e[I]), ...);
  }
  (((Op::kWriteMask >> I) & 1u ? store_vec<Ts>(v[I], c.ptr(I), i) : void()), ...);
}

template <typename Op, typename... Ts, size_t... I>
__device__ __forceinline__ void step_scalar(const Op& op, const typename Op::Ctx& ctx,
                                            const ChunkView& c, int64_t i,
                                            std::index_sequence<I...>) {
#pragma unroll
  for (int k = 0; k < kILP; ++k) {
    const int64_t j = i + k;
    if (j < c.end) {
      float e[Op::kLists];
      ((e[I] = to_float(static_cast<const Ts*>(c.ptr(I))[j])), ...);
      op(ctx, e, j);
      (((Op::kWriteMask >> I) & 1u ? void(static_cast<Ts*>(c.ptr(I))[j] = from_float<Ts>(e[I]))
                                   : void()),
       ...);
    }
  }
}

template <typename Op, typename... Ts>
__global__ void __launch_bounds__(kBlockThreads)
multi_tensor_apply_kernel(TensorTable table, Op op) {
  static_assert(sizeof...(Ts) == Op::kLists, "one storage type per list");
  using Seq = std::make_index_sequence<sizeof...(Ts)>;
  const ChunkView c = chunk_view(table, blockIdx.x);
  const typename Op::Ctx ctx = op.context(c);
  if (ctx.skip) return;
  const int64_t stride = int64_t(blockDim.x) * kILP;
  const bool vec = all_aligned<Ts...>(c, Seq{});
  for (int64_t i = c.begin + int64_t(threadIdx.x) * kILP; i < c.end; i += stride) {
    if (vec && i + kILP <= c.end) {
      step_vector<Op, Ts...>(op, ctx, c, i, Seq{});
    } else {
      step_scalar<Op, Ts...>(op, ctx, c, i, Seq{});
    }
  }
}

// Launches Op over `n_chunks` chunks on `stream`. Returns the CUDA error of the launch.
template <typename Op, typename... Ts>
cudaError_t multi_tensor_apply(const TensorTable& table, int64_t n_chunks, const Op& op,
                               cudaStream_t stream) {
  if (n_chunks == 0) return cudaSuccess;
  if (n_chunks > kMaxGridX) return cudaErrorInvalidConfiguration;   // one block per chunk
  multi_tensor_apply_kernel<Op, Ts...>
      <<<static_cast<unsigned>(n_chunks), kBlockThreads, 0, stream>>>(table, op);
  return cudaGetLastError();
}

}  // namespace flm
