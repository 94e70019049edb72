// multi_tensor_norm on CUDA: the global p-norm of a TensorTable in two launches.
//
//   partials kernel   one block per chunk: each thread reduces kILP-wide vector loads (16 bytes
//                     for float32 when aligned) with NormOp::term/combine, then a warp-shuffle +
//                     shared-memory block reduction writes ONE float32 per chunk.
//   finalise kernel   one block reduces every partial (of every dtype bucket of the device),
//                     writes out = [norm, clip coefficient, 1 if the norm is not finite else 0]
//                     (the last two are what an optimizer step with max_grad_norm reads).
//
// Bytes moved: numel * sizeof(T) read (+ 4 bytes per chunk of 16384 elements, negligible), so the
// partials pass should run at the read bandwidth of the GPU.
#include "fused_lm/launchers.h"
#include "fused_lm/multi_tensor_apply.cuh"
#include "fused_lm/multi_tensor_norm.h"

namespace flm {

namespace {

constexpr int kFinalThreads = 1024;

template <typename Op, int kThreads>
__device__ __forceinline__ float block_reduce(const Op& op, float v) {
  __shared__ float warp_out[kThreads / 32];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = op.combine(v, __shfl_xor_sync(0xffffffffu, v, off));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_out[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? warp_out[lane] : op.identity();
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = op.combine(v, __shfl_xor_sync(0xffffffffu, v, off));
  }
  return v;  // valid in thread 0
}

template <NormKind K, typename T>
__global__ void __launch_bounds__(kBlockThreads)
norm_partials_kernel(TensorTable table, NormOp<K> op, float* __restrict__ partials) {
  const ChunkView c = chunk_view(table, blockIdx.x);
  const T* x = static_cast<const T*>(c.ptr(0));
  float acc = op.identity();
  const int64_t stride = int64_t(kBlockThreads) * kILP;
  const bool vec = reinterpret_cast<uintptr_t>(x + c.begin) % (sizeof(T) * kILP) == 0;
  int64_t i = c.begin + int64_t(threadIdx.x) * kILP;
  if (vec) {
    // kUnroll independent vector loads in flight per thread before any arithmetic: the pass is
    // bound by DRAM latency x bytes in flight, not by the few flops per element.
    constexpr int kUnroll = 4;
    for (; i + (kUnroll - 1) * stride + kILP <= c.end; i += kUnroll * stride) {
      float v[kUnroll][kILP];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) load_vec<T>(v[u], x, i + u * stride);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int k = 0; k < kILP; ++k) acc = op.accumulate(acc, v[u][k]);
    }
  }
  for (; i < c.end; i += stride) {
    if (vec && i + kILP <= c.end) {
      float v[kILP];
      load_vec<T>(v, x, i);
#pragma unroll
      for (int k = 0; k < kILP; ++k) acc = op.accumulate(acc, v[k]);
    } else {
#pragma unroll
      for (int k = 0; k < kILP; ++k) {
        if (i + k < c.end) acc = op.accumulate(acc, to_float(x[i + k]));
      }
    }
  }
  acc = block_reduce<NormOp<K>, kBlockThreads>(op, acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

template <NormKind K>
__global__ void __launch_bounds__(kFinalThreads)
norm_finalize_kernel(const float* __restrict__ partials, int64_t n, NormOp<K> op, float max_norm,
                     float* __restrict__ out) {
  float acc = op.identity();
  for (int64_t i = threadIdx.x; i < n; i += kFinalThreads) acc = op.combine(acc, partials[i]);
  acc = block_reduce<NormOp<K>, kFinalThreads>(op, acc);
  if (threadIdx.x == 0) {
    const float norm = op.finish(acc);
    out[0] = norm;
    out[1] = clip_coefficient(norm, max_norm);
    out[2] = nonfinite_flag(norm);
  }
}

template <typename T>
cudaError_t launch_partials(const TensorTable& tt, int64_t n_chunks, NormKind kind, float p,
                            float* partials, cudaStream_t stream) {
  if (n_chunks > kMaxGridX) return cudaErrorInvalidConfiguration;   // one block per chunk
  const unsigned grid = static_cast<unsigned>(n_chunks);
  switch (kind) {
    case NormKind::kSumAbs:
      norm_partials_kernel<NormKind::kSumAbs, T><<<grid, kBlockThreads, 0, stream>>>(tt, {p}, partials); break;
    case NormKind::kSumSq:
      norm_partials_kernel<NormKind::kSumSq, T><<<grid, kBlockThreads, 0, stream>>>(tt, {p}, partials); break;
    case NormKind::kSumPow:
      norm_partials_kernel<NormKind::kSumPow, T><<<grid, kBlockThreads, 0, stream>>>(tt, {p}, partials); break;
    case NormKind::kMaxAbs:
      norm_partials_kernel<NormKind::kMaxAbs, T><<<grid, kBlockThreads, 0, stream>>>(tt, {p}, partials); break;
    case NormKind::kMinAbs:
      norm_partials_kernel<NormKind::kMinAbs, T><<<grid, kBlockThreads, 0, stream>>>(tt, {p}, partials); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

int launch_multi_tensor_norm_partials(const LaunchTable& lt, DType dtype, int kind, float p,
                                      float* partials) {
  if (lt.n_chunks == 0) return 0;
  const TensorTable tt{lt.table, lt.chunks, lt.lists, lt.chunk_size};
  auto stream = static_cast<cudaStream_t>(lt.stream);
  const NormKind k = static_cast<NormKind>(kind);
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_dtype(dtype, [&](auto t) {
    err = launch_partials<decltype(t)>(tt, lt.n_chunks, k, p, partials, stream);
  });
  return err;
}

int launch_multi_tensor_norm_finalize(const float* partials, int64_t n, int kind, float p,
                                      float max_norm, float* out, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  switch (static_cast<NormKind>(kind)) {
    case NormKind::kSumAbs:
      norm_finalize_kernel<NormKind::kSumAbs><<<1, kFinalThreads, 0, stream>>>(partials, n, {p}, max_norm, out); break;
    case NormKind::kSumSq:
      norm_finalize_kernel<NormKind::kSumSq><<<1, kFinalThreads, 0, stream>>>(partials, n, {p}, max_norm, out); break;
    case NormKind::kSumPow:
      norm_finalize_kernel<NormKind::kSumPow><<<1, kFinalThreads, 0, stream>>>(partials, n, {p}, max_norm, out); break;
    case NormKind::kMaxAbs:
      norm_finalize_kernel<NormKind::kMaxAbs><<<1, kFinalThreads, 0, stream>>>(partials, n, {p}, max_norm, out); break;
    case NormKind::kMinAbs:
      norm_finalize_kernel<NormKind::kMinAbs><<<1, kFinalThreads, 0, stream>>>(partials, n, {p}, max_norm, out); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace flm
