// kvtile/core/numeric.hpp: the 16-bit storage types (fp16, bf16) and float conversion.
//
// kvtile::half and kvtile::bfloat16 are plain 2-byte values with the IEEE binary16 and bfloat16
// bit layouts, so they need no CUDA headers and are layout-compatible with __half and
// __nv_bfloat16 (CUDA kernels reinterpret them). Arithmetic is always done in float.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kvtile/core/config.hpp"

KVTILE_NAMESPACE_BEGIN

namespace detail {
KVTILE_HOST_DEVICE KVTILE_FORCEINLINE std::uint32_t float_bits(float f) {
#if KVTILE_IS_DEVICE_PASS
  return __float_as_uint(f);
#else
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
KVTILE_HOST_DEVICE KVTILE_FORCEINLINE float bits_float(std::uint32_t u) {
#if KVTILE_IS_DEVICE_PASS
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}
}  // namespace detail

struct bfloat16 {
  std::uint16_t bits;

  bfloat16() = default;
  KVTILE_HOST_DEVICE explicit bfloat16(float f) : bits(from_float(f)) {}
  KVTILE_HOST_DEVICE explicit operator float() const { return detail::bits_float(std::uint32_t(bits) << 16); }

  // Round to nearest, ties to even; NaN stays a (quiet) NaN.
  KVTILE_HOST_DEVICE static std::uint16_t from_float(float f) {
    std::uint32_t u = detail::float_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return std::uint16_t((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return std::uint16_t(u >> 16);
  }
};

struct half {
  std::uint16_t bits;

  half() = default;
  KVTILE_HOST_DEVICE explicit half(float f) : bits(from_float(f)) {}
  KVTILE_HOST_DEVICE explicit operator float() const { return to_float(bits); }

  KVTILE_HOST_DEVICE static float to_float(std::uint16_t h) {
    const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
    const std::uint32_t exp = (h >> 10) & 0x1fu;
    std::uint32_t man = h & 0x3ffu;
    if (exp == 0x1f) return detail::bits_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
    if (exp != 0) return detail::bits_float(sign | ((exp + 112u) << 23) | (man << 13));
    if (man == 0) return detail::bits_float(sign);
    // Subnormal: value = man * 2^-24.
    float v = float(man) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }

  // Round to nearest, ties to even, with subnormals, overflow to infinity, NaN kept.
  KVTILE_HOST_DEVICE static std::uint16_t from_float(float f) {
    const std::uint32_t u = detail::float_bits(f);
    const std::uint16_t sign = std::uint16_t((u >> 16) & 0x8000u);
    const std::uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return std::uint16_t(sign | 0x7e00u);
    if (a >= 0x477ff000u) return std::uint16_t(sign | 0x7c00u);  // rounds to >= 65520: inf
    if (a < 0x38800000u) {                                     // below 2^-14: subnormal or 0
      if (a < 0x33000000u) return sign;                        // below 2^-25: rounds to 0
      const std::uint32_t e = a >> 23;
      const std::uint32_t m = (a & 0x7fffffu) | 0x800000u;
      const std::uint32_t shift = 126u - e;  // 14 + (113 - e) ... bits to drop from 24-bit m
      std::uint32_t r = m >> shift;
      const std::uint32_t rem = m & ((1u << shift) - 1u);
      const std::uint32_t halfway = 1u << (shift - 1u);
      if (rem > halfway || (rem == halfway && (r & 1u))) ++r;
      return std::uint16_t(sign | r);
    }
    std::uint32_t r = a - 0x38000000u;  // rebias exponent 127 -> 15
    r += 0xfffu + ((r >> 13) & 1u);
    return std::uint16_t(sign | (r >> 13));
  }
};

static_assert(sizeof(half) == 2 && std::is_trivially_copyable_v<half>);
static_assert(sizeof(bfloat16) == 2 && std::is_trivially_copyable_v<bfloat16>);

// to_float / from_float for every element type kvtile stores: float, double, half, bfloat16.
KVTILE_HOST_DEVICE KVTILE_FORCEINLINE float to_float(float x) { return x; }
KVTILE_HOST_DEVICE KVTILE_FORCEINLINE float to_float(half x) { return float(x); }
KVTILE_HOST_DEVICE KVTILE_FORCEINLINE float to_float(bfloat16 x) { return float(x); }
KVTILE_HOST_DEVICE KVTILE_FORCEINLINE double to_double(double x) { return x; }
template <class T>
KVTILE_HOST_DEVICE KVTILE_FORCEINLINE double to_double(T x) { return double(to_float(x)); }

template <class T>
KVTILE_HOST_DEVICE KVTILE_FORCEINLINE T from_float(float x) {
  if constexpr (std::is_same_v<T, float>) return x;
  else if constexpr (std::is_same_v<T, double>) return double(x);
  else return T(x);
}

// The element types attention kernels accept for Q, K, V and O.
template <class T>
concept element_type = std::is_same_v<T, float> || std::is_same_v<T, half> || std::is_same_v<T, bfloat16>;

template <class T>
inline constexpr const char* element_name =
    std::is_same_v<T, float> ? "fp32" : std::is_same_v<T, half> ? "fp16" : std::is_same_v<T, bfloat16> ? "bf16" : "?";

KVTILE_NAMESPACE_END
