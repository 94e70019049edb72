// Python module of the CPU extension fused_lm._C. The ops themselves are registered with
// torch.library (the schemas in fused_lm/schemas.h, defined here; TORCH_LIBRARY_IMPL in each op
// family's file) and called as
// torch.ops.fused_lm.<name>; this module reports how it was built and holds the host helpers
// whose Python twin would cost microseconds per tensor (optim_addresses, multi_tensor_info).
#include <torch/extension.h>

#include "fused_lm/schemas.h"
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

// One step's addresses of an optimizer bucket (fused_lm/optim/_base.py): for a list of plain
// parameters, a (3, n) int64 CPU tensor [param addresses; grad addresses (param.grad); param
// numels], or None when any parameter or gradient is not a plain dense tensor, a gradient is
// missing or differs from its parameter in dtype, shape or device, the parameters differ in
// dtype or device, or (`contiguous`) one of them is not contiguous. None sends the caller to
// its Python path, which raises or re-routes; the checks are the ones that path makes, so a
// non-None result may be compared with the addresses a validated table was built from.
pybind11::object optim_addresses(const pybind11::list& params, bool contiguous) {
  const Py_ssize_t n = PyList_GET_SIZE(params.ptr());
  at::Tensor out = at::empty({3, static_cast<int64_t>(n)}, at::kLong);
  int64_t* pa = out.data_ptr<int64_t>();
  int64_t* ga = pa + n;
  int64_t* numel = ga + n;
  const auto plain = [contiguous](const at::Tensor& t) {
    return t.defined() && t.layout() == c10::kStrided && t.has_storage() &&
           !t.key_set().has(c10::DispatchKey::Python) && (!contiguous || t.is_contiguous());
  };
  at::ScalarType dtype = at::kFloat;
  c10::Device device(c10::kCPU);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* obj = PyList_GET_ITEM(params.ptr(), i);
    if (!THPVariable_Check(obj)) return pybind11::none();
    const at::Tensor& p = THPVariable_Unpack(obj);
    if (!plain(p)) return pybind11::none();
    if (i == 0) {
      dtype = p.scalar_type();
      device = p.device();
    } else if (p.scalar_type() != dtype || p.device() != device) {
      return pybind11::none();
    }
    const at::Tensor& g = p.grad();
    if (!plain(g) || g.scalar_type() != dtype || g.device() != device || g.sizes() != p.sizes())
      return pybind11::none();
    pa[i] = reinterpret_cast<int64_t>(p.data_ptr());
    ga[i] = reinterpret_cast<int64_t>(g.data_ptr());
    numel[i] = p.numel();
  }
  return pybind11::reinterpret_steal<pybind11::object>(THPVariable_Wrap(std::move(out)));
}

// What the multi-tensor norm / scale / clamp paths (fused_lm/ops/_multi_tensor.py tensor_info)
// need of a list of tensors, in one pass: a (4, n) int64 CPU tensor [addresses; numels; dtype
// codes (c10::ScalarType values); contiguous (0/1)], or None when an item is not a plain tensor
// (a subclass with a Python dispatch key, e.g. DTensor), is not dense (strided, with storage, no
// negative bit), is not real floating point, or the tensors are not all on one CPU or CUDA
// device. None sends the caller to its Python path, which raises the error or takes the
// general route (several devices, subclasses).
pybind11::object multi_tensor_info(const pybind11::list& tensors) {
  const Py_ssize_t n = PyList_GET_SIZE(tensors.ptr());
  at::Tensor out = at::empty({4, static_cast<int64_t>(n)}, at::kLong);
  int64_t* addr = out.data_ptr<int64_t>();
  int64_t* numel = addr + n;
  int64_t* code = numel + n;
  int64_t* contig = code + n;
  c10::Device device(c10::kCPU);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* obj = PyList_GET_ITEM(tensors.ptr(), i);
    if (!THPVariable_Check(obj)) return pybind11::none();
    const at::Tensor& t = THPVariable_Unpack(obj);
    if (!t.defined() || t.layout() != c10::kStrided || !t.has_storage() ||
        t.key_set().has(c10::DispatchKey::Python) || t.is_neg() ||
        !at::isFloatingType(t.scalar_type()))
      return pybind11::none();
    if (i == 0) {
      device = t.device();
      if (!device.is_cpu() && !device.is_cuda()) return pybind11::none();
    } else if (t.device() != device) {
      return pybind11::none();
    }
    addr[i] = reinterpret_cast<int64_t>(t.data_ptr());
    numel[i] = t.numel();
    code[i] = static_cast<int64_t>(t.scalar_type());
    contig[i] = t.is_contiguous() ? 1 : 0;
  }
  return pybind11::reinterpret_steal<pybind11::object>(THPVariable_Wrap(std::move(out)));
}
}  // namespace

// Every op's schema (schemas.h); the implementations register per file (TORCH_LIBRARY_IMPL).
TORCH_LIBRARY_FRAGMENT(fused_lm, m) {
  for (const char* schema : flm::kSchemas) m.def(schema);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_lm CPU kernels (OpenMP + SIMD)";
  m.def("build_info", &build_info, "how the CPU extension was compiled");
  m.def("optim_addresses", &optim_addresses, pybind11::arg("params"), pybind11::arg("contiguous"),
        "(3, n) int64 [param addresses; grad addresses; numels] of plain params with valid "
        "grads, else None");
  m.def("multi_tensor_info", &multi_tensor_info, pybind11::arg("tensors"),
        "(4, n) int64 [addresses; numels; dtype codes; contiguous] of plain dense real floating "
        "tensors on one CPU or CUDA device, else None");
}
