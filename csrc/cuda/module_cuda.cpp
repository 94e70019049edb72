// Python module of the CUDA extension fused_lm._C_cuda. Its ops are CUDA implementations
// registered with TORCH_LIBRARY_IMPL(fused_lm, CUDA, ...) for schemas defined by fused_lm._C,
// which must therefore be imported first (fused_lm/_ext.py does).
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
  m.attr("archs") = FLM_ARCHS;  // e.g. "80_90"
}
