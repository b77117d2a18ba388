// kvtile/memory/kv_write.hpp: write new tokens' K and V into their slots (host memory).
//
// slot_mapping[i] = block * page_size + slot_in_block is where token i goes (as returned by
// the cache's append); a negative slot means "skip" (padding tokens). The new K and V are
// [num_tokens, num_kv_heads, head_dim] with `token_stride` elements between tokens and heads
// contiguous.
//
// The pool's codec (kv_codec.hpp) decides what is stored: identity copies the elements; fp8
// pools quantise on the way in (the codec is a compile-time choice, part of the view's type):
//   fp8_e4m3<per_token_head>  scale = amax / 448 of the token-head's head_dim values (1 for an
//                             all-zero row), stored beside the block; elements = e4m3(x / scale)
//   fp8_e4m3<per_head>        the view's calibrated scales; values beyond 448 * scale saturate
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kvtile/core/error.hpp"
#include "kvtile/core/numeric.hpp"
#include "kvtile/memory/pool_view.hpp"

KVTILE_NAMESPACE_BEGIN
namespace memory {

template <class S, class Codec>
void check_kv_write(const memory::kv_pool_view<S, Codec>& pool, std::int64_t token_stride, const std::int64_t* slots,
                    std::int32_t num_tokens) {
  KVTILE_REQUIRE(num_tokens >= 0, errc::invalid_argument, "num_tokens must be >= 0, got ", num_tokens);
  KVTILE_REQUIRE(token_stride >= std::int64_t(pool.num_kv_heads) * pool.head_dim, errc::invalid_argument,
                 "token_stride ", token_stride, " is smaller than num_kv_heads * head_dim = ",
                 std::int64_t(pool.num_kv_heads) * pool.head_dim);
  if constexpr (per_head_scales<Codec>)
    KVTILE_REQUIRE(num_tokens == 0 || (pool.k_scale && pool.v_scale), errc::invalid_argument,
                   "write_kv: an fp8 per-head pool needs its K and V scales (k_scale ", pool.k_scale, ", v_scale ",
                   pool.v_scale, "); set them with block_storage::set_head_scales");
  (void)slots;
}

namespace detail {
// One token-head row of d values into an fp8 pool: returns the scale used.
template <class T>
float quantize_row(const T* src, std::int32_t d, std::uint8_t* dst, float scale) {
  for (std::int32_t x = 0; x < d; ++x) dst[x] = fp8::encode_e4m3(to_float(src[x]) / scale);
  return scale;
}
template <class T>
float row_amax(const T* src, std::int32_t d) {
  float a = 0.f;
  for (std::int32_t x = 0; x < d; ++x) a = std::fmax(a, std::fabs(to_float(src[x])));
  return a;
}
}  // namespace detail

// Checks every slot before writing anything: a slot outside the pool is an error naming it.
// T: the new K/V's type (for identity pools, the pool's own element type).
template <class T, class S, class Codec>
void write_kv_host(const memory::kv_pool_view<S, Codec>& pool, const T* k, const T* v, std::int64_t token_stride,
                   const std::int64_t* slots, std::int32_t num_tokens) {
  static_assert(Codec::quantized || std::is_same_v<S, T>, "write_kv: an identity pool stores the new K/V's own type");
  check_kv_write(pool, token_stride, slots, num_tokens);
  const std::int64_t num_slots = std::int64_t(pool.num_blocks) * pool.page_size;
  for (std::int32_t i = 0; i < num_tokens; ++i)
    KVTILE_REQUIRE(slots[i] < num_slots, errc::out_of_range, "slot_mapping[", i, "] = ", slots[i],
                   " is outside the pool's ", num_slots, " slots");
  if constexpr (per_head_scales<Codec>)
    for (std::int32_t h = 0; h < pool.num_kv_heads; ++h)
      KVTILE_REQUIRE(pool.k_scale[h] > 0.f && pool.v_scale[h] > 0.f && std::isfinite(pool.k_scale[h]) &&
                         std::isfinite(pool.v_scale[h]),
                     errc::invalid_argument, "write_kv: the fp8 scales of KV head ", h, " must be positive and finite, got k ",
                     pool.k_scale[h], ", v ", pool.v_scale[h]);
  const std::size_t row = std::size_t(pool.head_dim) * sizeof(S);
  for (std::int32_t i = 0; i < num_tokens; ++i) {
    if (slots[i] < 0) continue;
    const auto block = std::int32_t(slots[i] / pool.page_size);
    const auto slot = std::int32_t(slots[i] % pool.page_size);
    for (std::int32_t h = 0; h < pool.num_kv_heads; ++h) {
      const std::int64_t src = std::int64_t(i) * token_stride + std::int64_t(h) * pool.head_dim;
      if constexpr (!Codec::quantized) {
        std::memcpy(pool.k_at(block, slot, h), k + src, row);
        std::memcpy(pool.v_at(block, slot, h), v + src, row);
      } else {
        auto* kd = reinterpret_cast<std::uint8_t*>(pool.k_at(block, slot, h));
        auto* vd = reinterpret_cast<std::uint8_t*>(pool.v_at(block, slot, h));
        if constexpr (per_token_scales<Codec>) {
          *pool.scale_ptr(pool.k, block, slot, h) =
              detail::quantize_row(k + src, pool.head_dim, kd, fp8::scale_for_amax(detail::row_amax(k + src, pool.head_dim)));
          *pool.scale_ptr(pool.v, block, slot, h) =
              detail::quantize_row(v + src, pool.head_dim, vd, fp8::scale_for_amax(detail::row_amax(v + src, pool.head_dim)));
        } else {
          detail::quantize_row(k + src, pool.head_dim, kd, pool.k_scale[h]);
          detail::quantize_row(v + src, pool.head_dim, vd, pool.v_scale[h]);
        }
      }
    }
  }
}

}  // namespace memory
KVTILE_NAMESPACE_END
