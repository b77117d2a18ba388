// kvtile/memory/kv_codec.hpp: how stored K/V elements decode to the compute type.
//
// A codec names the element type a pool stores for a compute type T, what else a pool view
// carries to decode it (scales), and how much a block holds beyond its elements:
//
//   identity                       T stored as is (bf16 / fp16 / fp32): today's pools, no cost
//   fp8_e4m3<per_head>             one byte per element (OCP e4m3: 1 sign, 4 exponent bits with
//                                  bias 7, 3 mantissa bits; max 448, no infinities, S.1111.111
//                                  is NaN); value = decode(byte) * scale[layer][head], one scale
//                                  for K and one for V per (layer, KV head), calibrated by the
//                                  user and held where the user keeps them
//   fp8_e4m3<per_token_head>       value = decode(byte) * scale[block][slot][head]: the writer
//                                  picks amax / 448 per token and head; the scales live in the
//                                  block's own storage after its elements, so a block copy
//                                  (copy-on-write) carries them and pages stay self-contained
//
// Block of a per_token_head pool (K and V pools alike), in bytes:
//   [page_size * num_kv_heads * head_dim]  e4m3 elements, NHD or HND as any pool
//   [num_kv_heads][page_size] float         the scales (head major in both layouts: a head's
//                                           scales of a page are contiguous, so a reader of
//                                           that head moves them in one copy)
//   padding to 16 bytes
// A new format is a codec type with the same members (storage, scale_policy / pool_fields,
// block_extra_bytes) plus its decode in the kernels' loaders (docs/design.md).
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "kvtile/core/config.hpp"
#include "kvtile/core/numeric.hpp"

KVTILE_NAMESPACE_BEGIN

// One stored e4m3 element (the bits; no arithmetic: decode with memory::fp8::decode_e4m3).
struct e4m3 {
  std::uint8_t bits;
};
static_assert(sizeof(e4m3) == 1 && std::is_trivially_copyable_v<e4m3>);

namespace memory::fp8 {
KVTILE_HOST_DEVICE KVTILE_FORCEINLINE float decode_e4m3(std::uint8_t c);
}  // namespace memory::fp8

// The stored value, unscaled (a reader multiplies by the pool's scale: kv_pool_view::k_scale_at).
KVTILE_HOST_DEVICE KVTILE_FORCEINLINE float to_float(e4m3 x) { return memory::fp8::decode_e4m3(x.bits); }

namespace memory {
namespace fp8 {

inline constexpr float e4m3_max = 448.f;
inline constexpr std::uint8_t e4m3_nan = 0x7f;

// float -> e4m3, round to nearest even; finite values beyond +-448 and infinities saturate to
// +-448 (as cvt.rn.satfinite does); NaN stays NaN (0x7f with the sign). Host and device.
KVTILE_HOST_DEVICE KVTILE_FORCEINLINE std::uint8_t encode_e4m3(float x) {
  const std::uint32_t u = ::kvtile::detail::float_bits(x);
  const auto sign = std::uint8_t((u >> 24) & 0x80u);
  const std::uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return std::uint8_t(sign | e4m3_nan);
  if (a >= 0x43e00000u) return std::uint8_t(sign | 0x7eu);  // >= 448 (and inf): the largest finite
  if (a < 0x3c800000u) {                                   // below 2^-6: a multiple of 2^-9 (subnormal)
    const std::uint32_t e = a >> 23;
    if (e < 116u) return sign;  // below 2^-11: rounds to zero
    const std::uint32_t m = (a & 0x7fffffu) | 0x800000u;
    const std::uint32_t shift = 141u - e;  // value * 2^9 = m * 2^(e - 141); shift in [21, 25]
    std::uint32_t r = m >> shift;
    const std::uint32_t rem = m & ((1u << shift) - 1u), halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (r & 1u))) ++r;  // r == 8 is the smallest normal, 0x08
    return std::uint8_t(sign | r);
  }
  std::uint32_t r = a - (120u << 23);  // rebias the exponent 127 -> 7
  r += 0x7ffffu + ((r >> 20) & 1u);    // round the 20 dropped mantissa bits, ties to even
  r >>= 20;
  return std::uint8_t(sign | (r > 0x7eu ? 0x7eu : r));
}

// e4m3 -> float, exact. Host and device.
KVTILE_HOST_DEVICE KVTILE_FORCEINLINE float decode_e4m3(std::uint8_t c) {
  const std::uint32_t sign = std::uint32_t(c & 0x80u) << 24;
  const std::uint32_t e = (c >> 3) & 0xfu, m = c & 7u;
  if (e == 15u && m == 7u) return ::kvtile::detail::bits_float(sign | 0x7fc00000u);
  if (e == 0u) {
    const float v = float(m) * 0.001953125f;  // m * 2^-9
    return sign ? -v : v;
  }
  return ::kvtile::detail::bits_float(sign | ((e + 120u) << 23) | (m << 20));
}

// The per_token_head scale of a row of values whose largest magnitude is amax: the row then
// spans the whole e4m3 range. An all-zero (or all-NaN) row gets scale 1, so decoding never
// divides by zero or spreads a NaN to the row's other values.
KVTILE_HOST_DEVICE KVTILE_FORCEINLINE float scale_for_amax(float amax) {
  return (amax > 0.f && amax <= std::numeric_limits<float>::max()) ? amax / e4m3_max : 1.f;
}

}  // namespace fp8

// ---- codecs ------------------------------------------------------------------------------------

// What a pool view carries for a codec (its base class: empty for identity, so
// kv_pool_view<T> keeps its layout).
struct no_scales {};

struct identity {
  template <class T>
  using storage = T;
  static constexpr bool quantized = false;
  using pool_fields = no_scales;
  static constexpr std::int64_t block_extra_bytes(std::int32_t /*page_size*/, std::int32_t /*num_kv_heads*/) { return 0; }
};

// One scale per (layer, KV head) for K and one for V: the view of a layer points at that
// layer's [num_kv_heads] floats, in the memory the pool lives in.
struct per_head {
  struct pool_fields {
    const float* k_scale = nullptr;  // [num_kv_heads]
    const float* v_scale = nullptr;  // [num_kv_heads]
  };
  static constexpr std::int64_t block_extra_bytes(std::int32_t, std::int32_t) { return 0; }
};

// One scale per (block, slot, head) for K and for V, after the block's elements.
struct per_token_head {
  struct pool_fields {
    std::int64_t scale_offset = 0;  // bytes from a block's start to its [num_kv_heads][page_size] floats
  };
  static constexpr std::int64_t block_extra_bytes(std::int32_t page_size, std::int32_t num_kv_heads) {
    return (std::int64_t(page_size) * num_kv_heads * std::int64_t(sizeof(float)) + 15) / 16 * 16;
  }
};

template <class S>
concept scale_policy = std::is_same_v<S, per_head> || std::is_same_v<S, per_token_head>;

template <scale_policy ScalePolicy>
struct fp8_e4m3 {
  template <class T>
  using storage = e4m3;
  using scale_policy = ScalePolicy;
  static constexpr bool quantized = true;
  using pool_fields = typename ScalePolicy::pool_fields;
  static constexpr std::int64_t block_extra_bytes(std::int32_t page_size, std::int32_t num_kv_heads) {
    return ScalePolicy::block_extra_bytes(page_size, num_kv_heads);
  }
};

template <class C>
inline constexpr bool is_fp8_codec = false;
template <class S>
inline constexpr bool is_fp8_codec<fp8_e4m3<S>> = true;

template <class C>
concept kv_codec = std::is_same_v<C, identity> || is_fp8_codec<C>;

template <class C>
inline constexpr bool per_token_scales = false;
template <>
inline constexpr bool per_token_scales<fp8_e4m3<per_token_head>> = true;
template <class C>
inline constexpr bool per_head_scales = false;
template <>
inline constexpr bool per_head_scales<fp8_e4m3<per_head>> = true;

}  // namespace memory
KVTILE_NAMESPACE_END
