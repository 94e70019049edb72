// Stand-in for <cuda_runtime.h>: lets the project's unmodified .cu files compile with g++ and run
// on the CPU under the emulator (csrc/emu/emu.cpp, which holds the design notes). Test-only code:
// setup.py never compiles csrc/emu, and csrc/emu/emulator.py builds it for the tests.
//
// It provides what the kernels use and a little more: the qualifiers, the built-in variables
// (threadIdx, blockIdx, blockDim, gridDim, warpSize), vector types, block barriers, the *_sync
// warp intrinsics, atomics, bit-cast and round-to-nearest intrinsics, and the runtime calls the
// launchers make (cudaGetLastError, error strings). A kernel launch `k<<<g, b, s, st>>>(args)` is
// rewritten by emulator.py into `::emu::Launch<&k>{{__FILE__, __LINE__, g, b, s, st}}(args)`;
// `__shared__` declarations and `__launch_bounds__` are rewritten too (see emulator.py).
// Anything a new kernel needs that is missing here fails to compile: add it here, with a test in
// csrc/emu/selftest.cu.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- qualifiers ----------------------------------------------------------------------------
#define __global__ __attribute__((noinline))  // a kernel stays a frame of its own in reports
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __constant__
#define __managed__
#define __align__(n) __attribute__((aligned(n)))
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

// ---- vector types (CUDA's sizes and alignments: 2- and 4-vectors are aligned to their size, up
// to 16 bytes; 1- and 3-vectors to their element) ---------------------------------------------
#define EMU_VEC(T, N)                                                                         \
  struct alignas(sizeof(T)) N##1 { T x; };                                                    \
  struct alignas(2 * sizeof(T)) N##2 { T x, y; };                                             \
  struct N##3 { T x, y, z; };                                                                 \
  struct alignas(4 * sizeof(T) < 16 ? 4 * sizeof(T) : 16) N##4 { T x, y, z, w; };            \
  inline N##1 make_##N##1(T x) { return {x}; }                                                \
  inline N##2 make_##N##2(T x, T y) { return {x, y}; }                                        \
  inline N##3 make_##N##3(T x, T y, T z) { return {x, y, z}; }                                \
  inline N##4 make_##N##4(T x, T y, T z, T w) { return {x, y, z, w}; }
EMU_VEC(signed char, char)
EMU_VEC(unsigned char, uchar)
EMU_VEC(short, short)
EMU_VEC(unsigned short, ushort)
EMU_VEC(int, int)
EMU_VEC(unsigned int, uint)
EMU_VEC(long, long)
EMU_VEC(unsigned long, ulong)
EMU_VEC(long long, longlong)
EMU_VEC(unsigned long long, ulonglong)
EMU_VEC(float, float)
EMU_VEC(double, double)
#undef EMU_VEC

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

// ---- runtime API (the numeric codes are CUDA's) --------------------------------------------
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotSupported = 801,
  cudaErrorUnknown = 999,
};
typedef cudaError_t cudaError;
typedef struct CUstream_st* cudaStream_t;

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t error);
const char* cudaGetErrorName(cudaError_t error);
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaPeekAtLastError(); }
inline cudaError_t cudaDeviceSynchronize() { return cudaPeekAtLastError(); }

// ---- the emulator's interface to the code it runs (implemented in emu.cpp) -------------------
namespace emu {

struct Builtins {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
// The built-in variables of the CUDA thread running now (one block runs at a time in the process,
// its CUDA threads as fibers; the scheduler updates them on every switch).
extern Builtins builtins;

enum class WarpOp : int { kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kSync };
enum class BlockOp : int { kSync, kCount, kAnd, kOr };

// Suspends the calling CUDA thread until every thread its `mask` names has reached the same warp
// intrinsic (same op, mask, width and call site), then returns its result (see emu.cpp).
uint64_t warp_sync(WarpOp op, unsigned mask, uint64_t value, int b, int width, const char* file,
                   int line);
// Suspends the calling thread until every thread of the block reaches the same __syncthreads*.
int block_sync(BlockOp op, int predicate, const char* file, int line);
// Aborts the launch if blockDim exceeds the kernel's __launch_bounds__ (inserted by emulator.py).
void launch_bounds(long max_threads, long min_blocks = 0, long max_blocks_per_cluster = 0);

// Static __shared__ variables: one slot per declaration (a function-local static), placed in the
// block's shared-memory arena at its first use in each block, filled with 0xff bytes (a NaN for
// floats), so a read before the write that should precede it shows up in the results.
struct SharedSlot {
  uint64_t block = 0;  // block serial number the slot was placed in
  void* ptr = nullptr;
};
void* shared_place(SharedSlot& slot, size_t bytes, size_t align, const char* file, int line);
template <typename T, size_t Align = 16>
T& shared(SharedSlot& slot, const char* file, int line) {
  static_assert(std::is_trivially_destructible<T>::value, "__shared__ of non-trivial type");
  constexpr size_t align = alignof(T) > Align ? alignof(T) : Align;
  return *static_cast<T*>(shared_place(slot, sizeof(T), align, file, line));
}
void* dynamic_shared();  // extern __shared__ T buf[]: the launch's dynamic shared memory

struct Config {
  const char* file;
  int line;
  dim3 grid;
  dim3 block;
  size_t smem = 0;
  cudaStream_t stream = nullptr;
};
using Body = void (*)(void* params);
void run_grid(const char* kernel, const Config& cfg, Body body, void* params);

// `k<<<cfg>>>(args)` becomes `Launch<&k>{cfg}(args)`: operator() takes the kernel's own parameter
// types, so arguments convert exactly as in a CUDA launch (braced initialisers included). The
// arguments are copied once per launch, and each CUDA thread calls the kernel with its own copy.
template <auto K, typename = decltype(K)>
struct Launch;
template <auto K, typename... P>
struct Launch<K, void (*)(P...)> {
  Config cfg;
  // "... [with auto K = <kernel instantiation>; ...]": the name in reports.
  static const char* name() { return __PRETTY_FUNCTION__; }
  void operator()(P... args) const {
    using Params = std::tuple<std::decay_t<P>...>;
    Params params(args...);
    run_grid(name(), cfg, [](void* p) { std::apply(K, *static_cast<Params*>(p)); }, &params);
  }
};

}  // namespace emu

#define threadIdx (static_cast<const uint3&>(::emu::builtins.thread_idx))
#define blockIdx (static_cast<const uint3&>(::emu::builtins.block_idx))
#define blockDim (static_cast<const dim3&>(::emu::builtins.block_dim))
#define gridDim (static_cast<const dim3&>(::emu::builtins.grid_dim))
static constexpr int warpSize = 32;

// ---- barriers and warp intrinsics (call sites recorded for the reports) ---------------------
#define EMU_SITE const char *file = __builtin_FILE(), int line = __builtin_LINE()

inline void __syncthreads(EMU_SITE) { ::emu::block_sync(::emu::BlockOp::kSync, 1, file, line); }
inline int __syncthreads_count(int p, EMU_SITE) {
  return ::emu::block_sync(::emu::BlockOp::kCount, p, file, line);
}
inline int __syncthreads_and(int p, EMU_SITE) {
  return ::emu::block_sync(::emu::BlockOp::kAnd, p, file, line);
}
inline int __syncthreads_or(int p, EMU_SITE) {
  return ::emu::block_sync(::emu::BlockOp::kOr, p, file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, EMU_SITE) {
  ::emu::warp_sync(::emu::WarpOp::kSync, mask, 0, 0, 32, file, line);
}
inline unsigned __ballot_sync(unsigned mask, int p, EMU_SITE) {
  return unsigned(::emu::warp_sync(::emu::WarpOp::kBallot, mask, p != 0, 0, 32, file, line));
}
inline int __any_sync(unsigned mask, int p, EMU_SITE) {
  return int(::emu::warp_sync(::emu::WarpOp::kAny, mask, p != 0, 0, 32, file, line));
}
inline int __all_sync(unsigned mask, int p, EMU_SITE) {
  return int(::emu::warp_sync(::emu::WarpOp::kAll, mask, p != 0, 0, 32, file, line));
}

namespace emu {
// A shuffle moves the bits of a 4- or 8-byte value (CUDA shuffles 8-byte types as two halves
// taken from the same source lane, which is the same thing).
template <typename T>
T shuffle(WarpOp op, unsigned mask, T var, int b, int width, const char* file, int line) {
  static_assert(std::is_trivially_copyable<T>::value && (sizeof(T) == 4 || sizeof(T) == 8),
                "shuffles move 4- or 8-byte values");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = warp_sync(op, mask, bits, b, width, file, line);
  std::memcpy(&var, &bits, sizeof(T));
  return var;
}
}  // namespace emu

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32, EMU_SITE) {
  return ::emu::shuffle(::emu::WarpOp::kShflIdx, mask, var, src_lane, width, file, line);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32, EMU_SITE) {
  return ::emu::shuffle(::emu::WarpOp::kShflUp, mask, var, int(delta), width, file, line);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32, EMU_SITE) {
  return ::emu::shuffle(::emu::WarpOp::kShflDown, mask, var, int(delta), width, file, line);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32, EMU_SITE) {
  return ::emu::shuffle(::emu::WarpOp::kShflXor, mask, var, lane_mask, width, file, line);
}
#undef EMU_SITE

// ---- atomics: the CUDA threads of a launch run on one host thread, one at a time, so a plain
// read-modify-write is atomic; the __atomic builtins keep that true if blocks ever run on several
// host threads. --------------------------------------------------------------------------------
template <typename T, typename F>
T emu_atomic_rmw(T* p, F f) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "4- or 8-byte atomics");
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  U* q = reinterpret_cast<U*>(p);
  U old = __atomic_load_n(q, __ATOMIC_RELAXED), next;
  T o;
  do {
    std::memcpy(&o, &old, sizeof(T));
    const T n = f(o);
    std::memcpy(&next, &n, sizeof(T));
  } while (!__atomic_compare_exchange_n(q, &old, next, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
  return o;
}
#define EMU_ATOMIC(name, result) \
  template <typename T>            \
  T name(T* p, T v) {              \
    return emu_atomic_rmw(p, [v](T o) { return T(result); }); \
  }
EMU_ATOMIC(atomicAdd, o + v)
EMU_ATOMIC(atomicSub, o - v)
EMU_ATOMIC(atomicExch, v)
EMU_ATOMIC(atomicMin, v < o ? v : o)
EMU_ATOMIC(atomicMax, v > o ? v : o)
EMU_ATOMIC(atomicAnd, o & v)
EMU_ATOMIC(atomicOr, o | v)
EMU_ATOMIC(atomicXor, o ^ v)
#undef EMU_ATOMIC
template <typename T>
T atomicCAS(T* p, T cmp, T v) {
  return emu_atomic_rmw(p, [cmp, v](T o) { return o == cmp ? v : o; });
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---- loads, bit casts, integer intrinsics ---------------------------------------------------
template <typename T> T __ldg(const T* p) { return *p; }
inline unsigned __float_as_uint(float x) { unsigned u; std::memcpy(&u, &x, 4); return u; }
inline int __float_as_int(float x) { int u; std::memcpy(&u, &x, 4); return u; }
inline float __uint_as_float(unsigned u) { float x; std::memcpy(&x, &u, 4); return x; }
inline float __int_as_float(int u) { float x; std::memcpy(&x, &u, 4); return x; }
inline long long __double_as_longlong(double x) { long long u; std::memcpy(&u, &x, 8); return u; }
inline double __longlong_as_double(long long u) { double x; std::memcpy(&x, &u, 8); return x; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  return __builtin_bswap32(x);
}

// ---- floating point. Round-to-nearest intrinsics are the IEEE operations; the opaque asm
// keeps g++ from contracting a product into a later addition, as nvcc never contracts __fmul_rn /
// __fadd_rn. The other math functions are the host libm's (correctly rounded or within 1 ulp),
// not the GPU's (a few ulps for powf, exp2f, ...): see README "Tests" for what that means.
template <typename T>
inline T emu_opaque(T x) {
#if defined(__x86_64__)
  __asm__("" : "+x"(x));
#else
  __asm__("" : "+r"(x));
#endif
  return x;
}
inline float __fadd_rn(float a, float b) { return emu_opaque(a + b); }
inline float __fsub_rn(float a, float b) { return emu_opaque(a - b); }
inline float __fmul_rn(float a, float b) { return emu_opaque(a * b); }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return emu_opaque(a + b); }
inline double __dmul_rn(double a, double b) { return emu_opaque(a * b); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __saturatef(float x) { return x != x ? 0.0f : x < 0.0f ? 0.0f : x > 1.0f ? 1.0f : x; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __fdividef(float a, float b) { return a / b; }
