// kvtile/paging/page_table_export.hpp: many page tables -> one kernel-facing page table.
//
// The exports own host vectors (upload them to the GPU as they are) and hand out the
// trivially-copyable views of paged_view.hpp. bind() pairs a table with a layer's pool and
// rejects a mismatch (page size, a block id outside the pool) with an error naming the values.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "kvtile/core/error.hpp"
#include "kvtile/paging/page_table.hpp"
#include "kvtile/paging/paged_view.hpp"

KVTILE_NAMESPACE_BEGIN
namespace paging {

namespace detail {
inline std::int32_t checked_len(const page_table& t, std::size_t b) {
  KVTILE_REQUIRE(t.num_tokens() <= std::numeric_limits<std::int32_t>::max(), errc::out_of_range, "sequence ", b,
                 " has ", t.num_tokens(), " tokens; kernel views hold at most 2^31-1");
  return std::int32_t(t.num_tokens());
}
template <class Table>
void check_bind(const Table& t, std::int32_t pool_page_size, std::int32_t pool_blocks) {
  KVTILE_REQUIRE(t.batch() == 0 || t.page_size == pool_page_size, errc::invalid_argument, "page table built for page_size ",
                 t.page_size, " bound to a pool with page_size ", pool_page_size);
  KVTILE_REQUIRE(t.max_block_id < pool_blocks, errc::out_of_range, "page table holds block ", t.max_block_id,
                 " but the pool has ", pool_blocks, " blocks");
}
}  // namespace detail

struct csr_page_table_host {
  std::vector<std::int32_t> indptr;         // [batch + 1]
  std::vector<std::int32_t> indices;        // [indptr.back()]
  std::vector<std::int32_t> last_page_len;  // [batch]
  std::int32_t page_size = 0;
  std::int32_t max_block_id = -1;

  std::int32_t batch() const { return std::int32_t(last_page_len.size()); }
  csr_page_table view() const { return {indptr.data(), indices.data(), last_page_len.data(), batch()}; }
};

struct padded_page_table_host {
  std::vector<std::int32_t> block_table;  // [batch, max_blocks]; unused entries are -1
  std::vector<std::int32_t> kv_lens;      // [batch]
  std::int32_t max_blocks = 0;
  std::int32_t page_size = 0;
  std::int32_t max_block_id = -1;

  std::int32_t batch() const { return std::int32_t(kv_lens.size()); }
  padded_page_table view() const { return {block_table.data(), kv_lens.data(), batch(), max_blocks}; }
};

inline csr_page_table_host to_csr(std::span<const page_table* const> tables) {
  csr_page_table_host out;
  out.page_size = tables.empty() ? 0 : tables[0]->page_size();
  out.indptr.reserve(tables.size() + 1);
  out.last_page_len.reserve(tables.size());
  std::int64_t nnz = 0;
  for (std::size_t b = 0; b < tables.size(); ++b) {
    KVTILE_REQUIRE(tables[b]->page_size() == out.page_size, errc::invalid_argument, "sequence ", b, " has page_size ",
                   tables[b]->page_size(), ", sequence 0 has ", out.page_size);
    detail::checked_len(*tables[b], b);
    nnz += tables[b]->num_blocks();
  }
  KVTILE_REQUIRE(nnz <= std::numeric_limits<std::int32_t>::max(), errc::out_of_range, "the batch holds ", nnz,
                 " blocks; CSR indices are 32-bit");
  out.indices.reserve(std::size_t(nnz));
  out.indptr.push_back(0);
  for (const page_table* t : tables) {
    for (block_id blk : t->blocks()) {
      out.indices.push_back(blk);
      out.max_block_id = std::max(out.max_block_id, blk);
    }
    out.indptr.push_back(std::int32_t(out.indices.size()));
    out.last_page_len.push_back(t->last_page_len());
  }
  return out;
}

// max_blocks = 0 picks the longest table's block count; a smaller max_blocks than a table
// needs is an error naming both.
inline padded_page_table_host to_padded(std::span<const page_table* const> tables, std::int32_t max_blocks = 0) {
  KVTILE_REQUIRE(max_blocks >= 0, errc::invalid_argument, "max_blocks must be >= 0, got ", max_blocks);
  padded_page_table_host out;
  out.page_size = tables.empty() ? 0 : tables[0]->page_size();
  std::int32_t longest = 0;
  for (std::size_t b = 0; b < tables.size(); ++b) {
    KVTILE_REQUIRE(tables[b]->page_size() == out.page_size, errc::invalid_argument, "sequence ", b, " has page_size ",
                   tables[b]->page_size(), ", sequence 0 has ", out.page_size);
    detail::checked_len(*tables[b], b);
    longest = std::max(longest, tables[b]->num_blocks());
    KVTILE_REQUIRE(max_blocks == 0 || tables[b]->num_blocks() <= max_blocks, errc::invalid_argument, "sequence ", b,
                   " needs ", tables[b]->num_blocks(), " blocks but the padded table has max_blocks ", max_blocks);
  }
  out.max_blocks = max_blocks ? max_blocks : longest;
  out.block_table.assign(tables.size() * std::size_t(out.max_blocks), -1);
  out.kv_lens.reserve(tables.size());
  for (std::size_t b = 0; b < tables.size(); ++b) {
    const auto blocks = tables[b]->blocks();
    for (std::size_t i = 0; i < blocks.size(); ++i) {
      out.block_table[b * std::size_t(out.max_blocks) + i] = blocks[i];
      out.max_block_id = std::max(out.max_block_id, blocks[i]);
    }
    out.kv_lens.push_back(std::int32_t(tables[b]->num_tokens()));
  }
  return out;
}

// A layer's pool with a table: checked, then the kernel-facing paged_kv. The host table must
// outlive the view (for a GPU kernel, bind the uploaded copy's pointers instead: see view()).
template <class T>
paged_kv<T, csr_page_table> bind(const kv_pool_view<T>& pool, const csr_page_table_host& table) {
  detail::check_bind(table, pool.page_size, pool.num_blocks);
  return {pool, table.view()};
}
template <class T>
paged_kv<T, padded_page_table> bind(const kv_pool_view<T>& pool, const padded_page_table_host& table) {
  detail::check_bind(table, pool.page_size, pool.num_blocks);
  return {pool, table.view()};
}

}  // namespace paging
KVTILE_NAMESPACE_END
