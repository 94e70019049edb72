// Kernels that test the emulator itself (tests/test_cuda_emulated.py, through emu_selftest): the
// lane rules of the warp intrinsics, block barriers, shared memory, and every error it must
// report. Plain CUDA (nvcc compiles it as well); the launch arguments come from the test.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

namespace {

// out[t] = what thread t receives from a shuffle (mode 0 idx, 1 up, 2 down, 3 xor, 4 xor of a
// double) of a value identifying its sender.
__global__ void shuffle_kernel(int mode, int b, int width, double* out) {
  const int v = int(threadIdx.x);
  double r = -1;
  switch (mode) {
    case 0: r = __shfl_sync(0xffffffffu, v, b, width); break;
    case 1: r = __shfl_up_sync(0xffffffffu, v, unsigned(b), width); break;
    case 2: r = __shfl_down_sync(0xffffffffu, v, unsigned(b), width); break;
    case 3: r = __shfl_xor_sync(0xffffffffu, v, b, width); break;
    case 4: r = __shfl_xor_sync(0xffffffffu, v + 0.25, b, width); break;
  }
  out[threadIdx.x] = r;
}

// Votes over the full warp, and over the low half-warp only with that half's mask.
__global__ void vote_kernel(unsigned* out) {
  const unsigned t = threadIdx.x, lane = t % 32;
  const int p = (t * 7 + 3) % 5 < 2;
  out[4 * t] = __ballot_sync(0xffffffffu, p);
  out[4 * t + 1] = __any_sync(0xffffffffu, t == 40);
  out[4 * t + 2] = __all_sync(0xffffffffu, p || t < 32);
  out[4 * t + 3] = lane < 16 ? __ballot_sync(0x0000ffffu, p) : 0u;
}

// Barrier votes and a shared-memory tree sum over a 3-d block (threads numbered x-fastest).
__global__ void block_kernel(int* out) {
  __shared__ int s[1024];
  const unsigned n = blockDim.x * blockDim.y * blockDim.z;
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int count = __syncthreads_count(t % 3 == 0);
  const int all = __syncthreads_and(t < n);
  const int any = __syncthreads_or(t == n - 1);
  s[t] = int(t);
  __syncthreads();
  for (unsigned k = 512; k > 0; k >>= 1) {
    if (t < k && t + k < n) s[t] += s[t + k];
    __syncthreads();
  }
  if (t == 0) {
    out[4 * blockIdx.x] = count;
    out[4 * blockIdx.x + 1] = all;
    out[4 * blockIdx.x + 2] = any;
    out[4 * blockIdx.x + 3] = s[0];
  }
}

// Atomics from every thread of every block.
__global__ void atomic_kernel(int* out) {
  const int t = int(threadIdx.x + blockDim.x * blockIdx.x);
  atomicAdd(&out[0], 1);
  atomicMax(&out[1], t);
  atomicMin(&out[2], -t);
  atomicOr(reinterpret_cast<unsigned*>(&out[3]), 1u << (t % 32));
  atomicAdd(reinterpret_cast<float*>(&out[4]), 0.5f);
  atomicCAS(&out[5], 0, 7);
  atomicExch(&out[6], 3);
}

// A missing barrier: each thread writes its slot and reads its neighbour's.
__global__ void race_kernel(int* out) {
  __shared__ int s[64];
  s[threadIdx.x] = int(threadIdx.x);
  out[threadIdx.x] = s[(threadIdx.x + 1) % 64];
}

// Lanes named in a mask that exited, or do not exist in a partial warp, take no part: reading
// their value is undefined (the emulator gives all-ones bits).
__global__ void exited_lane_kernel(int* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, int(threadIdx.x), 1);
}
__global__ void missing_lane_kernel(int* out) {
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, int(threadIdx.x), 1);
}

// Each of these breaks one rule the emulator must report.
__global__ void divergent_barrier_kernel(int*) {
  if (threadIdx.x == 5) return;
  __syncthreads();
}
__global__ void two_barriers_kernel(int*) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}
__global__ void outside_mask_kernel(int* out) {
  out[threadIdx.x] = __shfl_sync(0x0000ffffu, 1, 0);
}
__global__ void mask_mismatch_kernel(int* out) {
  const unsigned mask = threadIdx.x < 16 ? 0x0000ffffu : 0xffffffffu;
  out[threadIdx.x] = __ballot_sync(mask, 1);
}
__global__ void bad_width_kernel(int* out) {
  out[threadIdx.x] = __shfl_sync(0xffffffffu, 1, 0, 24);
}
__global__ void deadlock_kernel(int* out) {
  if (threadIdx.x == 0) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_sync(0xffffffffu, 1, 0);
  }
}
__global__ void __launch_bounds__(128) bounded_kernel(int* out) { out[threadIdx.x] = 1; }
__global__ void big_shared_kernel(int* out) {  // launched with 16 KiB of dynamic shared memory
  __shared__ float big[10240];
  big[threadIdx.x] = 1.0f;
  out[0] = int(big[0]);
}
__global__ void empty_kernel(int*) {}

// Faults (the process ends): a write past the end of `x` (n elements), a misaligned float4 load,
// and a recursion deeper than a thread's stack.
__global__ void out_of_bounds_kernel(float* x, int n) { x[n + threadIdx.x] = 1.0f; }
__global__ void misaligned_kernel(float* x, int) {
  x[threadIdx.x] = reinterpret_cast<const float4*>(x + 1)[threadIdx.x].x;
}
__device__ int deep(int d) {
  volatile char pad[4096];
  pad[d % 4096] = char(d);
  return d > 0 ? deep(d - 1) + pad[d % 4096] : 0;
}
__global__ void overflow_kernel(int* out, int depth) { out[threadIdx.x] = deep(depth); }

}  // namespace

// Runs the self-test `name` with grid `g` and block `b` (x, y, z) and `smem` bytes of dynamic
// shared memory; `out` receives its results; returns the launch's CUDA error.
extern "C" __attribute__((visibility("default"))) int emu_selftest(const char* name,
                                                                   const unsigned* g,
                                                                   const unsigned* b, int smem,
                                                                   const int* args, void* out) {
  const dim3 grid(g[0], g[1], g[2]), block(b[0], b[1], b[2]);
  int* o = static_cast<int*>(out);
  float* f = static_cast<float*>(out);
  auto is = [name](const char* n) { return std::strcmp(name, n) == 0; };
  if (is("shuffle"))
    shuffle_kernel<<<grid, block, smem>>>(args[0], args[1], args[2], static_cast<double*>(out));
  else if (is("vote")) vote_kernel<<<grid, block, smem>>>(static_cast<unsigned*>(out));
  else if (is("block")) block_kernel<<<grid, block, smem>>>(o);
  else if (is("atomic")) atomic_kernel<<<grid, block, smem>>>(o);
  else if (is("race")) race_kernel<<<grid, block, smem>>>(o);
  else if (is("divergent_barrier")) divergent_barrier_kernel<<<grid, block, smem>>>(o);
  else if (is("two_barriers")) two_barriers_kernel<<<grid, block, smem>>>(o);
  else if (is("exited_lane")) exited_lane_kernel<<<grid, block, smem>>>(o);
  else if (is("outside_mask")) outside_mask_kernel<<<grid, block, smem>>>(o);
  else if (is("missing_lane")) missing_lane_kernel<<<grid, block, smem>>>(o);
  else if (is("mask_mismatch")) mask_mismatch_kernel<<<grid, block, smem>>>(o);
  else if (is("bad_width")) bad_width_kernel<<<grid, block, smem>>>(o);
  else if (is("deadlock")) deadlock_kernel<<<grid, block, smem>>>(o);
  else if (is("bounded")) bounded_kernel<<<grid, block, smem>>>(o);
  else if (is("big_shared")) big_shared_kernel<<<grid, block, smem>>>(o);
  else if (is("empty")) empty_kernel<<<grid, block, smem>>>(o);
  else if (is("out_of_bounds")) out_of_bounds_kernel<<<grid, block, smem>>>(f, args[0]);
  else if (is("misaligned")) misaligned_kernel<<<grid, block, smem>>>(f, 0);
  else if (is("overflow")) overflow_kernel<<<grid, block, smem>>>(o, args[0]);
  else return -1;
  return cudaGetLastError();
}
