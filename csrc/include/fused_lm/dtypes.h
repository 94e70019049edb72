// Storage types and float32 conversions used by every kernel, on the host and on the device.
//
// Arithmetic is always float32; bf16/fp16 are storage formats only. Conversions are written with
// integer bit operations (round-to-nearest-even, NaN kept quiet) instead of CUDA intrinsics, so the
// CPU extension produces bit-identical results to the CUDA kernels. They cost a handful of integer
// ops per element, negligible next to the DRAM traffic of these bandwidth-bound kernels.
#pragma once
#include <cstdint>
#include <cstring>

#include "macros.h"

namespace flm {

struct bf16 { uint16_t bits; };
struct fp16 { uint16_t bits; };

FLM_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u; std::memcpy(&u, &f, 4); return u;
#endif
}
FLM_HD float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f; std::memcpy(&f, &u, 4); return f;
#endif
}

FLM_HD float to_float(float x) { return x; }
FLM_HD float to_float(bf16 x) { return bits_f32(uint32_t(x.bits) << 16); }

// IEEE binary16 -> binary32, exact.
FLM_HD float to_float(fp16 x) {
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24 is exact in float32
    const float mag = float(mant) * 5.9604644775390625e-08f;
    return bits_f32(f32_bits(mag) | sign);
  }
  if (exp == 31) return bits_f32(sign | 0x7f800000u | (mant << 13));
  return bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}

template <typename T> FLM_HD T from_float(float x);

template <> FLM_HD float from_float<float>(float x) { return x; }

// binary32 -> bfloat16, round to nearest even; NaN stays a (quiet) NaN.
template <> FLM_HD bf16 from_float<bf16>(float x) {
  const uint32_t u = f32_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x0040u)};
  const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
  return bf16{uint16_t(rounded >> 16)};
}

// binary32 -> binary16, round to nearest even, overflow to inf, gradual underflow.
template <> FLM_HD fp16 from_float<fp16>(float x) {
  uint32_t u = f32_bits(x);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  uint32_t out;
  if (u >= 0x47800000u) {             // |x| >= 65536, inf or NaN
    out = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (u < 0x38800000u) {        // |x| < 2^-14: result is subnormal or zero.
    // Adding 0.5 (2^-1) aligns the half subnormal grid (2^-24) with the float ulp of 2^-1,
    // so the float adder performs the round-to-nearest-even for us.
    const float shifted = bits_f32(u) + 0.5f;
    out = f32_bits(shifted) - 0x3f000000u;
  } else {
    const uint32_t odd = (u >> 13) & 1u;
    u += 0xc8000fffu + odd;            // rebias exponent (-112 << 23) and add rounding bias
    out = u >> 13;                     // may carry into the exponent: rounds up to inf correctly
  }
  return fp16{uint16_t(out | sign)};
}

}  // namespace flm
