// kvtile/attention/cpu/checks.hpp: argument checks shared by the CPU attention kernels.
//
// Everything a kernel can verify about its arguments before it touches memory: head dims
// against the compiled HeadDim, the GQA group, batch and per-sequence lengths of every tensor,
// and, for paged sources, every page index the kernel will read against the pool. A failed
// check throws kvtile::error naming the value; nothing has been written yet.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "kvtile/attention/dense_view.hpp"
#include "kvtile/attention/kv_source.hpp"
#include "kvtile/core/error.hpp"
#include "kvtile/paging/paged_view.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cpu::detail {

inline void check_ragged(const ragged_layout& l, const char* what) {
  KVTILE_REQUIRE(l.batch >= 0, errc::invalid_argument, what, ": batch must be >= 0, got ", l.batch);
  if (l.indptr) {
    KVTILE_REQUIRE(l.indptr[0] >= 0, errc::invalid_argument, what, ": indptr[0] must be >= 0, got ", l.indptr[0]);
    for (std::int32_t b = 0; b < l.batch; ++b)
      KVTILE_REQUIRE(l.indptr[b + 1] >= l.indptr[b], errc::invalid_argument, what, ": indptr must not decrease, indptr[",
                     b + 1, "] = ", l.indptr[b + 1], " < indptr[", b, "] = ", l.indptr[b]);
  } else {
    KVTILE_REQUIRE(l.len >= 0, errc::invalid_argument, what, ": length must be >= 0, got ", l.len);
  }
}

// A dense tensor shaped like `like` (same batch and per-sequence lengths) with `heads` heads.
template <class T, class U>
void check_like(const dense_tensor<T>& t, const dense_tensor<U>& like, std::int32_t heads, std::int32_t head_dim,
                const char* what) {
  check_ragged(t.layout, what);
  KVTILE_REQUIRE(t.layout.head_dim == head_dim, errc::invalid_argument, what, ": head_dim ", t.layout.head_dim,
                 " differs from the kernel's head dim ", head_dim);
  KVTILE_REQUIRE(t.layout.heads == heads, errc::invalid_argument, what, ": ", t.layout.heads, " heads, expected ", heads);
  KVTILE_REQUIRE(t.layout.batch == like.layout.batch, errc::invalid_argument, what, ": batch ", t.layout.batch,
                 " differs from the query batch ", like.layout.batch);
  for (std::int32_t b = 0; b < t.layout.batch; ++b)
    KVTILE_REQUIRE(t.layout.len_of(b) == like.layout.len_of(b), errc::invalid_argument, what, ": sequence ", b, " has ",
                   t.layout.len_of(b), " tokens, the queries have ", like.layout.len_of(b));
  KVTILE_REQUIRE(t.data != nullptr || t.layout.rows() == 0, errc::invalid_argument, what, ": null data for ",
                 t.layout.rows(), " tokens");
}

// Any other kv_source: only what the concept lets us ask.
template <class Src>
void check_kv_source(const Src& kv, std::int32_t, std::int32_t) {
  for (std::int32_t b = 0; b < kv.batch(); ++b)
    KVTILE_REQUIRE(kv.kv_len(b) >= 0, errc::invalid_argument, "K/V: sequence ", b, " has negative length ", kv.kv_len(b));
}

template <class T>
void check_kv_source(const dense_kv<T>& kv, std::int32_t num_kv_heads, std::int32_t head_dim) {
  check_ragged(kv.layout, "dense K/V");
  KVTILE_REQUIRE(kv.layout.heads == num_kv_heads, errc::invalid_argument, "dense K/V has ", kv.layout.heads,
                 " heads, num_kv_heads is ", num_kv_heads);
  KVTILE_REQUIRE(kv.layout.head_dim == head_dim, errc::invalid_argument, "dense K/V head_dim ", kv.layout.head_dim,
                 " differs from the kernel's head dim ", head_dim);
  KVTILE_REQUIRE((kv.k && kv.v) || kv.layout.rows() == 0, errc::invalid_argument, "dense K/V: null K or V for ",
                 kv.layout.rows(), " tokens");
}

template <class T, class Table>
void check_kv_source(const paging::paged_kv<T, Table>& kv, std::int32_t num_kv_heads, std::int32_t head_dim) {
  const auto& pool = kv.pool;
  KVTILE_REQUIRE(pool.page_size > 0, errc::invalid_argument, "paged K/V: page_size must be positive, got ", pool.page_size);
  KVTILE_REQUIRE(pool.num_kv_heads == num_kv_heads, errc::invalid_argument, "paged K/V pool has ", pool.num_kv_heads,
                 " heads, num_kv_heads is ", num_kv_heads);
  KVTILE_REQUIRE(pool.head_dim == head_dim, errc::invalid_argument, "paged K/V head_dim ", pool.head_dim,
                 " differs from the kernel's head dim ", head_dim);
  KVTILE_REQUIRE(kv.batch() >= 0, errc::invalid_argument, "paged K/V: batch must be >= 0, got ", kv.batch());
  // CSR: the whole indptr first, so no page id is read past indices[indptr[batch]] (the array's
  // length) before a later, decreasing entry is seen.
  if constexpr (std::is_same_v<Table, paging::csr_page_table>) {
    if (kv.batch() > 0)
      for (std::int32_t b = 0; b <= kv.batch(); ++b)
        KVTILE_REQUIRE(kv.table.indptr[b] >= 0 && (b == 0 || kv.table.indptr[b] >= kv.table.indptr[b - 1]),
                       errc::invalid_argument, "paged K/V: indptr[", b, "] = ", kv.table.indptr[b],
                       " (negative or decreasing)");
  }
  for (std::int32_t b = 0; b < kv.batch(); ++b) {
    // Lengths and page counts in 64 bits: len + page_size - 1 passes 2^31 for a sequence near
    // 2^31 tokens, and a wrapped page count would skip the page-id checks below.
    std::int64_t len = 0;
    if constexpr (std::is_same_v<Table, paging::csr_page_table>) {
      // 64-bit difference: indptr entries are untrusted, their int32 difference may wrap.
      const std::int64_t n = std::int64_t(kv.table.indptr[b + 1]) - kv.table.indptr[b];
      KVTILE_REQUIRE(kv.table.indptr[b] >= 0 && n >= 0, errc::invalid_argument, "paged K/V: indptr[", b, "] = ",
                     kv.table.indptr[b], ", indptr[", b + 1, "] = ", kv.table.indptr[b + 1], " (negative or decreasing)");
      if (n > 0)
        KVTILE_REQUIRE(kv.table.last_page_len[b] >= 1 && kv.table.last_page_len[b] <= pool.page_size,
                       errc::invalid_argument, "paged K/V: last_page_len[", b, "] = ", kv.table.last_page_len[b],
                       " outside [1, page_size = ", pool.page_size, "]");
      len = n == 0 ? 0 : (n - 1) * pool.page_size + kv.table.last_page_len[b];
    } else {
      len = kv.kv_len(b);
    }
    if constexpr (std::is_same_v<Table, paging::padded_page_table>)
      KVTILE_REQUIRE(kv.table.kv_lens[b] >= 0 && std::int64_t(kv.table.kv_lens[b]) <=
                                                     std::int64_t(kv.table.max_blocks) * pool.page_size,
                     errc::invalid_argument, "paged K/V: kv_lens[", b, "] = ", kv.table.kv_lens[b],
                     " does not fit max_blocks = ", kv.table.max_blocks, " pages of ", pool.page_size);
    KVTILE_REQUIRE(len >= 0 && len <= std::numeric_limits<std::int32_t>::max(), errc::invalid_argument,
                   "paged K/V: sequence ", b, " has length ", len, ", outside [0, 2^31)");
    const std::int64_t pages = (len + pool.page_size - 1) / pool.page_size;
    for (std::int64_t i = 0; i < pages; ++i) {
      const std::int32_t block = kv.table.block(b, std::int32_t(i));
      KVTILE_REQUIRE(block >= 0 && block < pool.num_blocks, errc::out_of_range, "paged K/V: sequence ", b, " page ", i,
                     " is block ", block, ", outside the pool [0, ", pool.num_blocks, ")");
    }
  }
  KVTILE_REQUIRE((pool.k && pool.v) || pool.num_blocks == 0, errc::invalid_argument, "paged K/V: null K or V pool");
}

// GQA-packed rows (token x group) of one sequence are indexed with int.
inline void check_packed_rows(const ragged_layout& q, std::int32_t group) {
  for (std::int32_t b = 0; b < q.batch; ++b)
    KVTILE_REQUIRE(std::int64_t(q.len_of(b)) * group < (std::int64_t(1) << 31), errc::invalid_argument, "sequence ", b,
                   ": ", q.len_of(b), " queries x GQA group ", group, " exceed 2^31 packed rows");
}

// What every kernel checks: the query tensor, the GQA group, the KV source and its batch.
template <class QT, class Src>
void check_problem(const dense_tensor<QT>& q, const Src& kv, std::int32_t num_kv_heads, float scale,
                   std::int32_t head_dim) {
  check_ragged(q.layout, "queries");
  KVTILE_REQUIRE(q.layout.head_dim == head_dim, errc::invalid_argument, "queries: head_dim ", q.layout.head_dim,
                 " differs from the kernel's head dim ", head_dim);
  KVTILE_REQUIRE(num_kv_heads > 0, errc::invalid_argument, "num_kv_heads must be positive, got ", num_kv_heads);
  KVTILE_REQUIRE(q.layout.heads > 0 && q.layout.heads % num_kv_heads == 0, errc::invalid_argument, "query heads (",
                 q.layout.heads, ") must be a positive multiple of KV heads (", num_kv_heads, ")");
  KVTILE_REQUIRE(kv.batch() == q.layout.batch, errc::invalid_argument, "KV batch ", kv.batch(),
                 " differs from the query batch ", q.layout.batch);
  KVTILE_REQUIRE(std::isfinite(scale), errc::invalid_argument, "softmax scale must be finite, got ", scale);
  KVTILE_REQUIRE(q.data != nullptr || q.layout.rows() == 0, errc::invalid_argument, "queries: null data for ",
                 q.layout.rows(), " tokens");
  check_kv_source(kv, num_kv_heads, head_dim);
}

}  // namespace attention::cpu::detail
KVTILE_NAMESPACE_END
