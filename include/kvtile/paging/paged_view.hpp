// kvtile/paging/paged_view.hpp: the kernel-facing, non-owning view of paged K/V.
//
// Kernels (CPU and CUDA) never see the bookkeeping objects; they get these trivially-copyable
// structs by value: where a layer's K and V blocks are (kv_pool_view), and which physical
// blocks each sequence uses, in one of two common formats:
//   csr_page_table     indptr [batch+1], indices [nnz], last_page_len [batch]  (FlashInfer style)
//   padded_page_table  block_table [batch, max_blocks], kv_lens [batch]         (vLLM style)
// Both answer the same three questions: kv_len(b), num_blocks(b), block(b, i).
// Offsets into the pool are 64-bit: a pool may hold more than 2^31 elements.
#pragma once

#include <concepts>
#include <cstdint>
#include <type_traits>

#include "kvtile/core/config.hpp"

KVTILE_NAMESPACE_BEGIN

// Order of a block's elements: NHD = [page_size, num_kv_heads, head_dim] (token major),
// HND = [num_kv_heads, page_size, head_dim] (head major; one head's tokens are contiguous).
enum class kv_layout : unsigned char { nhd, hnd };

namespace paging {

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

struct csr_page_table {
  const std::int32_t* indptr = nullptr;         // [batch + 1]: sequence b owns indices[indptr[b] .. indptr[b+1])
  const std::int32_t* indices = nullptr;        // [indptr[batch]]: physical block ids in logical order
  const std::int32_t* last_page_len = nullptr;  // [batch]: tokens in each sequence's last block (1..page_size)
  std::int32_t batch = 0;

  KVTILE_HOST_DEVICE std::int32_t num_blocks(std::int32_t b) const { return indptr[b + 1] - indptr[b]; }
  KVTILE_HOST_DEVICE std::int32_t block(std::int32_t b, std::int32_t i) const { return indices[indptr[b] + i]; }
  KVTILE_HOST_DEVICE std::int32_t kv_len(std::int32_t b, std::int32_t page_size) const {
    // Callers check that the length fits int32 (see attention/cpu/checks.hpp); the product is 64-bit.
    const std::int32_t n = num_blocks(b);
    return n == 0 ? 0 : std::int32_t(std::int64_t(n - 1) * page_size + last_page_len[b]);
  }
};

struct padded_page_table {
  const std::int32_t* block_table = nullptr;  // [batch, max_blocks], row-major; unused entries ignored
  const std::int32_t* kv_lens = nullptr;      // [batch]
  std::int32_t batch = 0;
  std::int32_t max_blocks = 0;

  KVTILE_HOST_DEVICE std::int32_t num_blocks(std::int32_t b, std::int32_t page_size) const {
    return std::int32_t((std::int64_t(kv_lens[b]) + page_size - 1) / page_size);  // 64-bit: no wrap near 2^31
  }
  KVTILE_HOST_DEVICE std::int32_t block(std::int32_t b, std::int32_t i) const {
    return block_table[std::int64_t(b) * max_blocks + i];
  }
  KVTILE_HOST_DEVICE std::int32_t kv_len(std::int32_t b, std::int32_t /*page_size*/) const { return kv_lens[b]; }
};

template <class P>
concept page_table_format = std::is_trivially_copyable_v<P> && requires(const P p, std::int32_t i) {
  { p.block(i, i) } -> std::same_as<std::int32_t>;
  { p.kv_len(i, i) } -> std::same_as<std::int32_t>;
  { p.batch } -> std::convertible_to<std::int32_t>;
};

// What a paged attention kernel receives: the pools of one layer and a page table.
template <class T, page_table_format Table>
struct paged_kv {
  kv_pool_view<T> pool;
  Table table;

  KVTILE_HOST_DEVICE std::int32_t batch() const { return table.batch; }
  KVTILE_HOST_DEVICE std::int32_t kv_len(std::int32_t b) const { return table.kv_len(b, pool.page_size); }
  // Token t of sequence b, head h: where its K (and V, at the same offset) starts.
  KVTILE_HOST_DEVICE std::int64_t token_offset(std::int32_t b, std::int32_t t, std::int32_t h) const {
    return pool.offset(table.block(b, t / pool.page_size), t % pool.page_size, h);
  }
  KVTILE_HOST_DEVICE T* k_base() const { return pool.k; }
  KVTILE_HOST_DEVICE T* v_base() const { return pool.v; }
};

static_assert(page_table_format<csr_page_table> && page_table_format<padded_page_table>);
static_assert(std::is_trivially_copyable_v<paged_kv<float, csr_page_table>>);

}  // namespace paging
KVTILE_NAMESPACE_END
