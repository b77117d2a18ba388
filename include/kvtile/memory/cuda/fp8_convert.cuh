// kvtile/memory/cuda/fp8_convert.cuh: e4m3 -> fp16 / bf16 in registers, four values at a time.
//
// Every e4m3 value is exact in fp16 and in bf16, so the conversion loses nothing; scales are
// applied elsewhere (to scores and probabilities, see attention/cuda/paged/kernel.cuh).
//   sm_89+: cvt.rn.f16x2.e4m3x2 (two values per instruction).
//   sm_80:  integer ops: the e4m3 bits shifted into an fp16's (sign to bit 15, exponent and
//           mantissa one bit right of the top byte) give the value times 2^-8 for normals and
//           subnormals alike (fp16's exponent bias is 8 more than e4m3's), so one fp16x2
//           multiply by 2^8 finishes it; the NaN code S.1111.111 is then mapped to NaN.
// bf16 goes through fp16 -> fp32 -> bf16, exact.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kvtile/core/config.hpp"
#include "kvtile/core/numeric.hpp"

KVTILE_NAMESPACE_BEGIN
namespace memory::cuda {

// Four e4m3 values (byte i of x is value i) -> two fp16x2 words: lo = {v0, v1}, hi = {v2, v3}
// (value 0 in the low half).
KVTILE_DEVICE KVTILE_FORCEINLINE void e4m3x4_to_half2x2(std::uint32_t x, std::uint32_t& lo, std::uint32_t& hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm("{\n\t.reg .b16 a, b;\n\tmov.b32 {a, b}, %2;\n\tcvt.rn.f16x2.e4m3x2 %0, a;\n\tcvt.rn.f16x2.e4m3x2 %1, b;\n\t}"
      : "=r"(lo), "=r"(hi)
      : "r"(x));
#else
  auto pair = [](std::uint32_t u) {  // u: the two bytes at bits 8..15 and 24..31
    std::uint32_t h = (u & 0x80008000u) | ((u & 0x7f007f00u) >> 1);
    __half2 v = __hmul2(*reinterpret_cast<__half2*>(&h), __float2half2_rn(256.f));
    std::uint32_t r = *reinterpret_cast<std::uint32_t*>(&v);
    return r | (__vcmpeq2(u & 0x7f007f00u, 0x7f007f00u) & 0x7e007e00u);  // S.1111.111: NaN
  };
  lo = pair(__byte_perm(x, 0u, 0x1404u));  // bytes 0, 1 to the top of each half
  hi = pair(__byte_perm(x, 0u, 0x3424u));  // bytes 2, 3
#endif
}

// Four e4m3 values -> two words of T pairs (T = kvtile::half or kvtile::bfloat16).
template <class T>
KVTILE_DEVICE KVTILE_FORCEINLINE void e4m3x4_to(std::uint32_t x, std::uint32_t& lo, std::uint32_t& hi) {
  e4m3x4_to_half2x2(x, lo, hi);
  if constexpr (std::is_same_v<T, kvtile::bfloat16>) {
    auto to_bf16 = [](std::uint32_t h) {
      const float2 f = __half22float2(*reinterpret_cast<__half2*>(&h));
      __nv_bfloat162 b = __floats2bfloat162_rn(f.x, f.y);
      return *reinterpret_cast<std::uint32_t*>(&b);
    };
    lo = to_bf16(lo);
    hi = to_bf16(hi);
  }
}

// 16 e4m3 values (one 16-byte chunk) -> 16 T values (two 16-byte chunks).
template <class T>
KVTILE_DEVICE KVTILE_FORCEINLINE void e4m3x16_to(const uint4& in, uint4& out0, uint4& out1) {
  e4m3x4_to<T>(in.x, out0.x, out0.y);
  e4m3x4_to<T>(in.y, out0.z, out0.w);
  e4m3x4_to<T>(in.z, out1.x, out1.y);
  e4m3x4_to<T>(in.w, out1.z, out1.w);
}

// 16 e4m3 values times `scale` (in fp32, one rounding to T) -> 16 T values: a per-token scale
// applied to the elements as they are converted.
template <class T>
KVTILE_DEVICE KVTILE_FORCEINLINE void e4m3x16_to_scaled(const uint4& in, float scale, uint4& out0, uint4& out1) {
  auto word = [&](std::uint32_t h) {  // fp16 pair -> fp32 -> times scale -> T pair
    const float2 f = __half22float2(*reinterpret_cast<__half2*>(&h));
    if constexpr (std::is_same_v<T, kvtile::bfloat16>) {
      __nv_bfloat162 b = __floats2bfloat162_rn(f.x * scale, f.y * scale);
      return *reinterpret_cast<std::uint32_t*>(&b);
    } else {
      __half2 b = __floats2half2_rn(f.x * scale, f.y * scale);
      return *reinterpret_cast<std::uint32_t*>(&b);
    }
  };
  std::uint32_t h[8];
  e4m3x4_to_half2x2(in.x, h[0], h[1]);
  e4m3x4_to_half2x2(in.y, h[2], h[3]);
  e4m3x4_to_half2x2(in.z, h[4], h[5]);
  e4m3x4_to_half2x2(in.w, h[6], h[7]);
  out0 = make_uint4(word(h[0]), word(h[1]), word(h[2]), word(h[3]));
  out1 = make_uint4(word(h[4]), word(h[5]), word(h[6]), word(h[7]));
}

}  // namespace memory::cuda
KVTILE_NAMESPACE_END
