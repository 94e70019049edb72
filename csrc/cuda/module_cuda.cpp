// Python module of the CUDA extension fused_lm._C_cuda. Its ops are CUDA implementations
// registered with TORCH_LIBRARY_IMPL(fused_lm, CUDA, ...) for the schemas of
// csrc/include/fused_lm/schemas.h, which fused_lm._C defines: this module imports fused_lm._C
// when it loads, so the dependency is explicit (an ImportError naming _C, not ops without
// schemas).
#include <torch/extension.h>

#define FLM_STR2(x) #x
#define FLM_STR(x) FLM_STR2(x)
#ifdef FUSED_LM_ARCHS
#define FLM_ARCHS FLM_STR(FUSED_LM_ARCHS)
#else
#define FLM_ARCHS "unknown"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_lm CUDA kernels";
  pybind11::module_::import("fused_lm._C");
  m.attr("archs") = FLM_ARCHS;  // e.g. "80_90"
}
