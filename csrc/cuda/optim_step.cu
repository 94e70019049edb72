// The step-count increment of the optimizers: one tiny launch over a bucket's step counters
// (float32 0-d tensors, torch's state['step'], listed by address). Adds 0 when `skip` is set
// (found_inf), so a skipped step leaves the counts, hence the bias corrections, untouched.
#include "optim_common.cuh"

namespace flm {

__global__ void step_increment_kernel(const int64_t* __restrict__ step_table, int64_t n,
                                      const float* __restrict__ skip) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float inc = *skip != 0.0f ? 0.0f : 1.0f;
  *reinterpret_cast<float*>(step_table[i]) += inc;
}

cudaError_t launch_step_increment(const OptimArgs& args, cudaStream_t stream) {
  if (args.n_tensors == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const unsigned blocks = static_cast<unsigned>((args.n_tensors + kThreads - 1) / kThreads);
  step_increment_kernel<<<blocks, kThreads, 0, stream>>>(args.step_table, args.n_tensors, args.skip);
  return cudaGetLastError();
}

}  // namespace flm
