// kvtile/memory/block_copy.hpp: the byte-level description of a model's K/V pools, a batch of
// block copies, and their host implementation.
//
// Copy-on-write produces (src, dst, num_tokens) triples; one triple copies the first
// `num_tokens` slots of block src into block dst, in every layer, K and V. Only filled slots
// are copied: a partial block's unused slots may be written concurrently by the sequence that
// still owns src (it appends in place), and copying them would also waste bandwidth.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>

#include "kvtile/core/config.hpp"
#include "kvtile/core/error.hpp"
#include "kvtile/memory/pool_view.hpp"

KVTILE_NAMESPACE_BEGIN
namespace memory {

struct block_copy {
  std::int32_t src = 0;
  std::int32_t dst = 0;
  std::int32_t num_tokens = 0;  // filled slots of src to copy, 1..page_size
  friend constexpr bool operator==(const block_copy&, const block_copy&) = default;
};

// All layers' K and V pools, in bytes (copies do not care about the element type). Layer l,
// block b of K starts at k + l * stride_layer + b * stride_block. Within a block, slot s of
// head h starts at s * stride_token + h * stride_head and holds head_bytes contiguous bytes.
struct kv_pool_set {
  std::byte* k = nullptr;
  std::byte* v = nullptr;
  std::int64_t stride_layer = 0;  // bytes
  std::int64_t stride_block = 0;
  std::int64_t stride_token = 0;
  std::int64_t stride_head = 0;
  std::int32_t num_layers = 0;
  std::int32_t num_blocks = 0;
  std::int32_t page_size = 0;
  std::int32_t num_kv_heads = 0;
  std::int64_t head_bytes = 0;  // 64-bit: head_dim * sizeof(T) may pass 2^31
  kv_layout layout = kv_layout::nhd;
  // Per-token scales stored in each block after its elements (fp8_e4m3<per_token_head>):
  // [num_kv_heads][page_size] floats from scale_offset; scale_token_bytes: one token's scales
  // (num_kv_heads floats), 0: none.
  std::int64_t scale_offset = 0;
  std::int64_t scale_token_bytes = 0;

  KVTILE_HOST_DEVICE bool has_scales() const { return scale_token_bytes > 0; }
  // The scales of every block as a pool set of their own: head major, one float per token and
  // head (a run of num_tokens floats per head of a filled block), which every copy routine runs
  // after the elements.
  KVTILE_HOST_DEVICE kv_pool_set scales() const {
    kv_pool_set s = *this;
    s.k = k + scale_offset;
    s.v = v + scale_offset;
    s.stride_token = std::int64_t(sizeof(float));
    s.stride_head = std::int64_t(page_size) * std::int64_t(sizeof(float));
    s.head_bytes = std::int64_t(sizeof(float));
    s.layout = kv_layout::hnd;
    s.scale_offset = s.scale_token_bytes = 0;
    return s;
  }

  // The filled part of a block with n tokens is `segments` runs of `segment_bytes` each,
  // `segment_stride` apart: one run for NHD (token major), one per head for HND.
  KVTILE_HOST_DEVICE std::int32_t segments() const { return layout == kv_layout::nhd ? 1 : num_kv_heads; }
  KVTILE_HOST_DEVICE std::int64_t segment_stride() const { return layout == kv_layout::nhd ? 0 : stride_head; }
  KVTILE_HOST_DEVICE std::int64_t segment_bytes(std::int32_t n) const {
    return layout == kv_layout::nhd ? std::int64_t(n) * stride_token : std::int64_t(n) * head_bytes;
  }
};

// Rejects a copy naming a block outside the pool or a token count outside [1, page_size]
// before anything is copied.
inline void check_block_copies(const kv_pool_set& pools, std::span<const block_copy> copies) {
  for (std::size_t i = 0; i < copies.size(); ++i) {
    const auto& c = copies[i];
    KVTILE_REQUIRE(c.src >= 0 && c.src < pools.num_blocks && c.dst >= 0 && c.dst < pools.num_blocks,
                   errc::out_of_range, "block copy ", i, " (", c.src, " -> ", c.dst, ") names a block outside [0, ",
                   pools.num_blocks, ")");
    KVTILE_REQUIRE(c.num_tokens >= 1 && c.num_tokens <= pools.page_size, errc::out_of_range, "block copy ", i,
                   " copies ", c.num_tokens, " tokens; a block holds 1..", pools.page_size);
    KVTILE_REQUIRE(c.src != c.dst, errc::invalid_argument, "block copy ", i, " copies block ", c.src, " onto itself");
  }
}

// Host memory: memcpy of each filled run, every layer, K and V.
inline void copy_blocks_host(const kv_pool_set& pools, std::span<const block_copy> copies) {
  check_block_copies(pools, copies);
  const std::int32_t segs = pools.segments();
  for (const auto& c : copies) {
    const std::int64_t bytes = pools.segment_bytes(c.num_tokens);
    for (std::int32_t l = 0; l < pools.num_layers; ++l) {
      for (std::byte* base : {pools.k, pools.v}) {
        std::byte* layer = base + std::int64_t(l) * pools.stride_layer;
        for (std::int32_t s = 0; s < segs; ++s) {
          const std::int64_t off = std::int64_t(s) * pools.segment_stride();
          std::memcpy(layer + std::int64_t(c.dst) * pools.stride_block + off,
                      layer + std::int64_t(c.src) * pools.stride_block + off, std::size_t(bytes));
        }
      }
    }
  }
  if (pools.has_scales()) copy_blocks_host(pools.scales(), copies);
}

}  // namespace memory
KVTILE_NAMESPACE_END
