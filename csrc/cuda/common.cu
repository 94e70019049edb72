#include <cuda_runtime.h>

#include "fused_lm/launch.h"

namespace flm {
const char* cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }
}  // namespace flm
