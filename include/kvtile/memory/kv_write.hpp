// kvtile/memory/kv_write.hpp: write new tokens' K and V into their slots (host memory).
//
// slot_mapping[i] = block * page_size + slot_in_block is where token i goes (as returned by
// the cache's append); a negative slot means "skip" (padding tokens). The new K and V are
// [num_tokens, num_kv_heads, head_dim] with `token_stride` elements between tokens and heads
// contiguous.
#pragma once

#include <cstdint>
#include <cstring>

#include "kvtile/core/error.hpp"
#include "kvtile/memory/pool_view.hpp"

KVTILE_NAMESPACE_BEGIN
namespace memory {

template <class T>
void check_kv_write(const memory::kv_pool_view<T>& pool, std::int64_t token_stride, const std::int64_t* slots,
                    std::int32_t num_tokens) {
  KVTILE_REQUIRE(num_tokens >= 0, errc::invalid_argument, "num_tokens must be >= 0, got ", num_tokens);
  KVTILE_REQUIRE(token_stride >= std::int64_t(pool.num_kv_heads) * pool.head_dim, errc::invalid_argument,
                 "token_stride ", token_stride, " is smaller than num_kv_heads * head_dim = ",
                 std::int64_t(pool.num_kv_heads) * pool.head_dim);
  (void)slots;
}

// Checks every slot before writing anything: a slot outside the pool is an error naming it.
template <class T>
void write_kv_host(const memory::kv_pool_view<T>& pool, const T* k, const T* v, std::int64_t token_stride,
                   const std::int64_t* slots, std::int32_t num_tokens) {
  check_kv_write(pool, token_stride, slots, num_tokens);
  const std::int64_t num_slots = std::int64_t(pool.num_blocks) * pool.page_size;
  for (std::int32_t i = 0; i < num_tokens; ++i)
    KVTILE_REQUIRE(slots[i] < num_slots, errc::out_of_range, "slot_mapping[", i, "] = ", slots[i],
                   " is outside the pool's ", num_slots, " slots");
  const std::size_t row = std::size_t(pool.head_dim) * sizeof(T);
  for (std::int32_t i = 0; i < num_tokens; ++i) {
    if (slots[i] < 0) continue;
    const auto block = std::int32_t(slots[i] / pool.page_size);
    const auto slot = std::int32_t(slots[i] % pool.page_size);
    for (std::int32_t h = 0; h < pool.num_kv_heads; ++h) {
      const std::int64_t src = std::int64_t(i) * token_stride + std::int64_t(h) * pool.head_dim;
      std::memcpy(pool.k_at(block, slot, h), k + src, row);
      std::memcpy(pool.v_at(block, slot, h), v + src, row);
    }
  }
}

}  // namespace memory
KVTILE_NAMESPACE_END
