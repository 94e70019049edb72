// multi_tensor_norm on the CPU: the same two passes and NormOp as csrc/cuda/multi_tensor_norm.cu.
// Partials: an OpenMP loop over chunks, each reduced to one float32 (SIMD reduction for the sum
// kinds). Finalise: one loop over the partials. Schemas: fused_lm/schemas.h.
#include "fused_lm/multi_tensor_norm.h"
#include "fused_lm/tensor_table.h"
#include "fused_lm/dtypes.h"
#include "fused_lm/torch_utils.h"

namespace {

template <flm::NormKind K, typename T>
void partials_cpu(const flm::TensorTable& tt, int64_t n_chunks, flm::NormOp<K> op, float* out) {
#pragma omp parallel for schedule(dynamic, 4)
  for (int64_t k = 0; k < n_chunks; ++k) {
    const flm::ChunkView c = flm::chunk_view(tt, k);
    const T* x = static_cast<const T*>(c.ptr(0));
    float acc = op.identity();
    if constexpr (flm::NormOp<K>::kIsSum) {
#pragma omp simd reduction(+ : acc)
      for (int64_t j = c.begin; j < c.end; ++j) acc = op.accumulate(acc, flm::to_float(x[j]));
    } else {
      for (int64_t j = c.begin; j < c.end; ++j) acc = op.accumulate(acc, flm::to_float(x[j]));
    }
    out[k] = acc;
  }
}

template <typename T>
void partials_dispatch(const flm::TensorTable& tt, int64_t n, int64_t kind, float p, float* out) {
  using flm::NormKind;
  switch (static_cast<NormKind>(kind)) {
    case NormKind::kSumAbs: partials_cpu<NormKind::kSumAbs, T>(tt, n, {p}, out); break;
    case NormKind::kSumSq: partials_cpu<NormKind::kSumSq, T>(tt, n, {p}, out); break;
    case NormKind::kSumPow: partials_cpu<NormKind::kSumPow, T>(tt, n, {p}, out); break;
    case NormKind::kMaxAbs: partials_cpu<NormKind::kMaxAbs, T>(tt, n, {p}, out); break;
    case NormKind::kMinAbs: partials_cpu<NormKind::kMinAbs, T>(tt, n, {p}, out); break;
  }
}

template <flm::NormKind K>
void finalize_cpu(const float* partials, int64_t n, flm::NormOp<K> op, float max_norm, float* out) {
  float acc = op.identity();
  for (int64_t i = 0; i < n; ++i) acc = op.combine(acc, partials[i]);
  const float norm = op.finish(acc);
  out[0] = norm;
  out[1] = flm::clip_coefficient(norm, max_norm);
  out[2] = flm::nonfinite_flag(norm);
}

void check_kind(int64_t kind) {
  TORCH_CHECK(kind >= 0 && kind <= 4, "fused_lm: norm kind must be in [0, 4], got ", kind);
}

void norm_partials_cpu(const at::Tensor& table, const at::Tensor& chunks, int64_t chunk_size,
                       c10::ScalarType dtype, const at::Tensor& partials, int64_t kind, double p,
                       int64_t /*stream*/) {
  check_kind(kind);
  TORCH_CHECK(table.device().is_cpu(), "fused_lm: CPU kernel got a table on ", table.device());
  const flm::DType code = flm::dtype_code(dtype);
  const flm::LaunchTable lt = flm::launch_table(table, chunks, 1, chunk_size, 0);
  TORCH_CHECK(partials.scalar_type() == c10::ScalarType::Float && partials.is_contiguous() &&
                  partials.numel() == lt.n_chunks && partials.device().is_cpu(),
              "fused_lm: partials must be a contiguous float32 CPU tensor of ", lt.n_chunks,
              " elements, got ", partials.scalar_type(), " with ", partials.numel(), " on ",
              partials.device());
  const flm::TensorTable tt{lt.table, lt.chunks, 1, chunk_size};
  float* out = partials.data_ptr<float>();
  const float pf = static_cast<float>(p);
  flm::dispatch_dtype(code, [&](auto t) {
    partials_dispatch<decltype(t)>(tt, lt.n_chunks, kind, pf, out);
  });
}

void norm_finalize_cpu(const at::Tensor& partials, const at::Tensor& out, int64_t kind, double p,
                       double max_norm, int64_t /*stream*/) {
  check_kind(kind);
  TORCH_CHECK(partials.scalar_type() == c10::ScalarType::Float && partials.is_contiguous() &&
                  partials.device().is_cpu(),
              "fused_lm: partials must be a contiguous float32 CPU tensor");
  TORCH_CHECK(out.scalar_type() == c10::ScalarType::Float && out.numel() == 3 &&
                  out.is_contiguous() && out.device().is_cpu(),
              "fused_lm: out must be a contiguous float32 CPU tensor of 3 elements (norm, "
              "coefficient, non-finite flag)");
  using flm::NormKind;
  const float* in = partials.data_ptr<float>();
  const int64_t n = partials.numel();
  float* o = out.data_ptr<float>();
  const float pf = static_cast<float>(p), mn = static_cast<float>(max_norm);
  switch (static_cast<NormKind>(kind)) {
    case NormKind::kSumAbs: finalize_cpu<NormKind::kSumAbs>(in, n, {pf}, mn, o); break;
    case NormKind::kSumSq: finalize_cpu<NormKind::kSumSq>(in, n, {pf}, mn, o); break;
    case NormKind::kSumPow: finalize_cpu<NormKind::kSumPow>(in, n, {pf}, mn, o); break;
    case NormKind::kMaxAbs: finalize_cpu<NormKind::kMaxAbs>(in, n, {pf}, mn, o); break;
    case NormKind::kMinAbs: finalize_cpu<NormKind::kMinAbs>(in, n, {pf}, mn, o); break;
  }
}

}  // namespace


TORCH_LIBRARY_IMPL(fused_lm, CPU, m) {
  m.impl("multi_tensor_norm_partials_", &norm_partials_cpu);
  m.impl("multi_tensor_norm_finalize_", &norm_finalize_cpu);
}
