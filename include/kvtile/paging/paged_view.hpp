// kvtile/paging/paged_view.hpp: the kernel-facing, non-owning view of paged K/V.
//
// Kernels (CPU and CUDA) never see the bookkeeping objects; they get these trivially-copyable
// structs by value: where a layer's K and V blocks are (memory::kv_pool_view, also known here as
// paging::kv_pool_view), and which physical blocks each sequence uses, in one of two formats:
//   csr_page_table     indptr [batch+1], indices [nnz], last_page_len [batch]  (FlashInfer style)
//   padded_page_table  block_table [batch, max_blocks], kv_lens [batch]         (vLLM style)
// Both answer the same three questions: kv_len(b), num_blocks(b), block(b, i).
// Offsets into the pool are 64-bit: a pool may hold more than 2^31 elements.
#pragma once

#include <concepts>
#include <cstdint>
#include <type_traits>

#include "kvtile/core/config.hpp"
#include "kvtile/memory/pool_view.hpp"

KVTILE_NAMESPACE_BEGIN

namespace paging {

// The pool view lives in memory/ (the layer below); paging's kernel-facing views pair it with a
// page table under the names they always had.
using memory::kv_pool_view;

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

// What a paged attention kernel receives: the pools of one layer and a page table. T is the
// compute type; the pools store Codec::storage<T> (T itself for identity, e4m3 for fp8).
template <class T, page_table_format Table, memory::kv_codec Codec = memory::identity>
struct paged_kv {
  using storage_type = typename Codec::template storage<T>;
  using codec = Codec;
  kv_pool_view<storage_type, Codec> pool;
  Table table;

  KVTILE_HOST_DEVICE std::int32_t batch() const { return table.batch; }
  KVTILE_HOST_DEVICE std::int32_t kv_len(std::int32_t b) const { return table.kv_len(b, pool.page_size); }
  // Token t of sequence b, head h: where its K (and V, at the same offset) starts.
  KVTILE_HOST_DEVICE std::int64_t token_offset(std::int32_t b, std::int32_t t, std::int32_t h) const {
    return pool.offset(table.block(b, t / pool.page_size), t % pool.page_size, h);
  }
  // The codec's scales of token t of sequence b, head h (1 for identity pools): the value of
  // element x is to_float(k_base()[token_offset(b, t, h) + x]) * k_scale(b, t, h).
  KVTILE_HOST_DEVICE float k_scale(std::int32_t b, std::int32_t t, std::int32_t h) const {
    return pool.k_scale_at(table.block(b, t / pool.page_size), t % pool.page_size, h);
  }
  KVTILE_HOST_DEVICE float v_scale(std::int32_t b, std::int32_t t, std::int32_t h) const {
    return pool.v_scale_at(table.block(b, t / pool.page_size), t % pool.page_size, h);
  }
  KVTILE_HOST_DEVICE storage_type* k_base() const { return pool.k; }
  KVTILE_HOST_DEVICE storage_type* v_base() const { return pool.v; }
};

static_assert(page_table_format<csr_page_table> && page_table_format<padded_page_table>);
static_assert(std::is_trivially_copyable_v<paged_kv<float, csr_page_table>>);

}  // namespace paging
KVTILE_NAMESPACE_END
