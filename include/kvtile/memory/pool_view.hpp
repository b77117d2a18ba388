// kvtile/memory/pool_view.hpp: where one layer's K and V blocks are, as kernels see them.
//
// A trivially copyable, non-owning view passed by value to every kernel (CPU and CUDA): the K
// and V base pointers, the strides of blocks, slots and heads (64-bit: a pool may hold more than
// 2^31 elements), and the pool's shape. Block storage (block_storage.hpp) hands one out per
// layer; the paging layer pairs it with a page table (paging/paged_view.hpp).
//
// The codec (kv_codec.hpp) says how stored elements decode: identity (T as is; the view is
// exactly the pointers and strides) or fp8_e4m3<ScalePolicy> (T = e4m3 bytes; the view also
// carries the scales: per-head scale pointers, or where a block's per-token scales start).
#pragma once

#include <cstdint>

#include "kvtile/core/config.hpp"
#include "kvtile/memory/kv_codec.hpp"

KVTILE_NAMESPACE_BEGIN

// Order of a block's elements: NHD = [page_size, num_kv_heads, head_dim] (token major),
// HND = [num_kv_heads, page_size, head_dim] (head major; one head's tokens are contiguous).
enum class kv_layout : unsigned char { nhd, hnd };

namespace memory {

template <class T, kv_codec Codec = identity>
struct kv_pool_view;

// One layer's K and V pools: block b, slot s, head h starts at k + offset(b, s, h), and its
// head_dim elements are contiguous. T is the stored element (Codec::storage<compute type>).
// The identity codec's view is just the pointers and strides (an aggregate, brace-initialised
// in that order); other codecs' views add their fields after these (the specialisation below).
template <class T>
struct kv_pool_view<T, identity> {
  using element_type = T;
  using codec = identity;

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
  // The codec's scales of (block, slot, head): none here.
  KVTILE_HOST_DEVICE float k_scale_at(std::int32_t, std::int32_t, std::int32_t) const { return 1.f; }
  KVTILE_HOST_DEVICE float v_scale_at(std::int32_t, std::int32_t, std::int32_t) const { return 1.f; }

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

// A quantised pool (fp8_e4m3<ScalePolicy>): the identity view's fields, then the codec's
// (Codec::pool_fields: per-head scale pointers, or where a block's per-token scales start).
template <class T, kv_codec Codec>
struct kv_pool_view : kv_pool_view<T, identity>, Codec::pool_fields {
  using codec = Codec;

  // The scales of (block, slot, head): the layer's head scale for per_head, the stored float
  // for per_token_head.
  KVTILE_HOST_DEVICE float k_scale_at(std::int32_t block, std::int32_t slot, std::int32_t head) const {
    return scale_at(this->k, block, slot, head, true);
  }
  KVTILE_HOST_DEVICE float v_scale_at(std::int32_t block, std::int32_t slot, std::int32_t head) const {
    return scale_at(this->v, block, slot, head, false);
  }
  // Where the per_token_head scale of (block, slot, head) lives in the pool `base` (k or v).
  KVTILE_HOST_DEVICE float* scale_ptr(T* base, std::int32_t block, std::int32_t slot, std::int32_t head) const
    requires per_token_scales<Codec>
  {
    auto* b = reinterpret_cast<unsigned char*>(base) + std::int64_t(block) * this->stride_block * std::int64_t(sizeof(T)) +
              this->scale_offset;
    return reinterpret_cast<float*>(b) + std::int64_t(head) * this->page_size + slot;
  }

  // As the identity view's make; the block also holds Codec::block_extra_bytes (per-token
  // scales after its elements) unless `block_elems` says otherwise.
  static constexpr kv_pool_view make(T* k, T* v, kv_layout layout, std::int32_t num_blocks, std::int32_t page_size,
                                     std::int32_t num_kv_heads, std::int32_t head_dim, std::int64_t block_elems = 0) {
    const std::int64_t elems = std::int64_t(page_size) * num_kv_heads * head_dim;
    kv_pool_view p{};
    static_cast<kv_pool_view<T, identity>&>(p) = kv_pool_view<T, identity>::make(
        k, v, layout, num_blocks, page_size, num_kv_heads, head_dim,
        block_elems ? block_elems : elems + Codec::block_extra_bytes(page_size, num_kv_heads) / std::int64_t(sizeof(T)));
    if constexpr (per_token_scales<Codec>) p.scale_offset = elems * std::int64_t(sizeof(T));
    return p;
  }

 private:
  KVTILE_HOST_DEVICE float scale_at(T* base, std::int32_t block, std::int32_t slot, std::int32_t head, bool is_k) const {
    if constexpr (per_token_scales<Codec>) {
      (void)is_k;
      return *scale_ptr(base, block, slot, head);
    } else {
      (void)base, (void)block, (void)slot;
      return is_k ? this->k_scale[head] : this->v_scale[head];
    }
  }
};

// A view of other pools k, v (of U) with `pool`'s shape and strides in elements (a float copy of
// an fp8 pool, say), identity codec.
template <class U, class T, class Codec>
constexpr kv_pool_view<U> pool_as(const kv_pool_view<T, Codec>& pool, U* k, U* v) {
  kv_pool_view<U> p{};
  p.k = k;
  p.v = v;
  p.stride_block = pool.stride_block;
  p.stride_token = pool.stride_token;
  p.stride_head = pool.stride_head;
  p.num_blocks = pool.num_blocks;
  p.page_size = pool.page_size;
  p.num_kv_heads = pool.num_kv_heads;
  p.head_dim = pool.head_dim;
  return p;
}

}  // namespace memory
KVTILE_NAMESPACE_END
