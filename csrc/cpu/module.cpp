// Python module of the CPU extension fused_lm._C. The ops themselves are registered with
// torch.library (TORCH_LIBRARY_FRAGMENT in each op family's file) and called as
// torch.ops.fused_lm.<name>; this module only reports how it was built.
#include <torch/extension.h>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {
pybind11::dict build_info() {
  pybind11::dict d;
#ifdef _OPENMP
  d["openmp"] = true;
  d["max_threads"] = omp_get_max_threads();
#else
  d["openmp"] = false;
  d["max_threads"] = 1;
#endif
#if defined(__AVX512F__)
  d["simd"] = "avx512";
#elif defined(__AVX2__)
  d["simd"] = "avx2";
#elif defined(__ARM_NEON)
  d["simd"] = "neon";
#else
  d["simd"] = "baseline";
#endif
  return d;
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_lm CPU kernels (OpenMP + SIMD)";
  m.def("build_info", &build_info, "how the CPU extension was compiled");
}
