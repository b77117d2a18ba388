// kvtile/memory/pool_view.hpp: where one layer's K and V blocks are, as kernels see them.
//
// A trivially copyable, non-owning view passed by value to every kernel (CPU and CUDA): the K
// and V base pointers, the strides of blocks, slots and heads (64-bit: a pool may hold more than
// 2^31 elements), and the pool's shape. Block storage (block_storage.hpp) hands one out per
// layer; the paging layer pairs it with a page table (paging/paged_view.hpp).
#pragma once

#include <cstdint>

#include "kvtile/core/config.hpp"

KVTILE_NAMESPACE_BEGIN

// Order of a block's elements: NHD = [page_size, num_kv_heads, head_dim] (token major),
// HND = [num_kv_heads, page_size, head_dim] (head major; one head's tokens are contiguous).
enum class kv_layout : unsigned char { nhd, hnd };

namespace memory {

// One layer's K and V pools: block b, slot s, head h starts at k + offset(b, s, h), and its
// head_dim elements are contiguous.
template <class T>
struct kv_pool_view {
  T* k = nullptr;
  T* v = nullptr;
  std::int64_t stride_block = 0;  // elements between consecutive blocks
  std::int64_t stride_token = 0;  // elements between consecutive slots of a block
  std::int64_t stride_head = 0;   // elements between consecutive heads
  std::int32_t num_blocks = 0;    // blocks in the pool (valid ids are [0, num_blocks))
  std::int32_t page_size = 0;     // tokens per block
  std::int32_t num_kv_heads = 0;
  std::int32_t head_dim = 0;

  KVTILE_HOST_DEVICE std::int64_t offset(std::int32_t block, std::int32_t slot, std::int32_t head) const {
    return std::int64_t(block) * stride_block + std::int64_t(slot) * stride_token + std::int64_t(head) * stride_head;
  }
  KVTILE_HOST_DEVICE T* k_at(std::int32_t block, std::int32_t slot, std::int32_t head) const { return k + offset(block, slot, head); }
  KVTILE_HOST_DEVICE T* v_at(std::int32_t block, std::int32_t slot, std::int32_t head) const { return v + offset(block, slot, head); }

  // Contiguous pools in either layout; `block_elems` may exceed one block's elements (padding).
  static constexpr kv_pool_view make(T* k, T* v, kv_layout layout, std::int32_t num_blocks, std::int32_t page_size,
                                     std::int32_t num_kv_heads, std::int32_t head_dim, std::int64_t block_elems = 0) {
    kv_pool_view p;
    p.k = k;
    p.v = v;
    p.num_blocks = num_blocks;
    p.page_size = page_size;
    p.num_kv_heads = num_kv_heads;
    p.head_dim = head_dim;
    p.stride_block = block_elems ? block_elems : std::int64_t(page_size) * num_kv_heads * head_dim;
    if (layout == kv_layout::nhd) {
      p.stride_token = std::int64_t(num_kv_heads) * head_dim;
      p.stride_head = head_dim;
    } else {
      p.stride_token = head_dim;
      p.stride_head = std::int64_t(page_size) * head_dim;
    }
    return p;
  }
};

}  // namespace memory
KVTILE_NAMESPACE_END
