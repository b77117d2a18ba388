// kvtile/memory/kv_dequantize.hpp: an fp8 pool's values in float, on the host.
//
// dequantize(pool) decodes every (block, slot, head) row of a host fp8 pool view through its
// codec (e4m3 value x scale) into float pools with the same offsets, so anything that reads a
// kv_pool_view<float> (the fp64 reference, the CPU attention backend) reads what an fp8 kernel
// computes with. For tests and CPU users of fp8 caches; a copy, not a kernel.
#pragma once

#include <cstdint>
#include <vector>

#include "kvtile/core/error.hpp"
#include "kvtile/memory/kv_codec.hpp"
#include "kvtile/memory/pool_view.hpp"

KVTILE_NAMESPACE_BEGIN
namespace memory {

struct dequantized_pool {
  std::vector<float> k, v;  // [num_blocks * stride_block], the scales' bytes left 0
  kv_pool_view<float> view;

  dequantized_pool() = default;
  dequantized_pool(const dequantized_pool&) = delete;  // view points into k and v
  dequantized_pool& operator=(const dequantized_pool&) = delete;
  dequantized_pool(dequantized_pool&&) = default;  // vectors keep their buffers when moved
  dequantized_pool& operator=(dequantized_pool&&) = default;
};

template <class Codec>
dequantized_pool dequantize(const kv_pool_view<e4m3, Codec>& pool) {
  KVTILE_REQUIRE(pool.num_blocks >= 0 && pool.page_size > 0 && pool.num_kv_heads > 0 && pool.head_dim > 0,
                 errc::invalid_argument, "dequantize: a pool of ", pool.num_blocks, " blocks, page ", pool.page_size,
                 ", ", pool.num_kv_heads, " heads, head_dim ", pool.head_dim);
  if constexpr (per_head_scales<Codec>)
    KVTILE_REQUIRE(pool.k_scale && pool.v_scale, errc::invalid_argument, "dequantize: a per-head fp8 pool without scales");
  dequantized_pool d;
  const std::size_t n = std::size_t(pool.num_blocks) * std::size_t(pool.stride_block);
  d.k.assign(n, 0.f);
  d.v.assign(n, 0.f);
  for (std::int32_t b = 0; b < pool.num_blocks; ++b)
    for (std::int32_t s = 0; s < pool.page_size; ++s)
      for (std::int32_t h = 0; h < pool.num_kv_heads; ++h) {
        const std::int64_t off = pool.offset(b, s, h);
        const float ks = pool.k_scale_at(b, s, h), vs = pool.v_scale_at(b, s, h);
        for (std::int32_t x = 0; x < pool.head_dim; ++x) {
          d.k[std::size_t(off + x)] = fp8::decode_e4m3(pool.k[off + x].bits) * ks;
          d.v[std::size_t(off + x)] = fp8::decode_e4m3(pool.v[off + x].bits) * vs;
        }
      }
  d.view = pool_as<float>(pool, d.k.data(), d.v.data());
  return d;
}

}  // namespace memory
KVTILE_NAMESPACE_END
