// Portability macros shared by the CUDA (.cu) and CPU (.cpp) translation units.
// The optimizer math lives in __host__ __device__ functors so that the CPU extension runs the
// very same arithmetic as the GPU kernels (DESIGN.md, "Backends").
#pragma once

#if defined(__CUDACC__)
#define FLM_HD __host__ __device__ __forceinline__
#define FLM_DEVICE __device__ __forceinline__
#define FLM_RESTRICT __restrict__
#else
#define FLM_HD inline __attribute__((always_inline))
#define FLM_DEVICE inline
#define FLM_RESTRICT __restrict__
#endif

#include <cmath>

namespace flm {

// a * b + c rounded once (IEEE fused multiply-add) on the host and the device. The extensions are
// built without implicit contraction (setup.py), so an FMA happens exactly where this is written.
FLM_HD float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

}  // namespace flm
