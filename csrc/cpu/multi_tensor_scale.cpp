// multi_tensor_scale_ on the CPU: x_i *= s over a TensorTable, ScaleOp from functors.h.
// Also defines the op schema (the CPU extension is always built; _C_cuda adds a CUDA kernel).
#include "fused_lm/cpu_multi_tensor.h"
#include "fused_lm/functors.h"
#include "fused_lm/torch_utils.h"

namespace {

void multi_tensor_scale_cpu(at::TensorList tensors, const at::Tensor& table,
                            const at::Tensor& chunks, int64_t chunk_size, const at::Tensor& scale,
                            int64_t /*stream*/) {
  if (tensors.empty()) return;
  TORCH_CHECK(table.device().is_cpu(), "fused_lm: CPU kernel got a table on ", table.device());
  flm::check_scalar(scale, tensors[0], "scale");
  const flm::LaunchTable lt = flm::launch_table(table, chunks, 1, chunk_size, 0);
  const flm::TensorTable tt{lt.table, lt.chunks, 1, chunk_size};
  const flm::ScaleOp op{scale.data_ptr<float>()};
  switch (flm::dtype_code(tensors[0].scalar_type())) {
    case flm::DType::kFloat32: flm::cpu_multi_tensor_apply<flm::ScaleOp, float>(tt, lt.n_chunks, op); break;
    case flm::DType::kBFloat16: flm::cpu_multi_tensor_apply<flm::ScaleOp, flm::bf16>(tt, lt.n_chunks, op); break;
    case flm::DType::kFloat16: flm::cpu_multi_tensor_apply<flm::ScaleOp, flm::fp16>(tt, lt.n_chunks, op); break;
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_lm, m) {
  m.def("multi_tensor_scale_(Tensor(a!)[] tensors, Tensor table, Tensor chunks, int chunk_size, "
        "Tensor scale, int stream) -> ()");
}

TORCH_LIBRARY_IMPL(fused_lm, CPU, m) { m.impl("multi_tensor_scale_", &multi_tensor_scale_cpu); }
