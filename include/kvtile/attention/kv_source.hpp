// kvtile/attention/kv_source.hpp: what attention kernels read K and V through.
//
// Dense (attention::dense_kv) and paged (paging::paged_kv) sources answer the same questions,
// so a kernel or the reference is written once for both:
//   batch()                  number of sequences
//   kv_len(b)                keys of sequence b
//   token_offset(b, t, h)    where key/value t of sequence b, head h starts (64-bit), relative
//   k_base(), v_base()       to these base pointers; head_dim elements follow contiguously
#pragma once

#include <concepts>
#include <cstdint>

#include "kvtile/attention/dense_view.hpp"
#include "kvtile/paging/paged_view.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention {

template <class S>
concept kv_source = std::is_trivially_copyable_v<S> && requires(const S s, std::int32_t i) {
  { s.batch() } -> std::convertible_to<std::int32_t>;
  { s.kv_len(i) } -> std::convertible_to<std::int32_t>;
  { s.token_offset(i, i, i) } -> std::same_as<std::int64_t>;
  s.k_base();
  s.v_base();
};

static_assert(kv_source<dense_kv<float>>);
static_assert(kv_source<paging::paged_kv<float, paging::csr_page_table>>);
static_assert(kv_source<paging::paged_kv<float, paging::padded_page_table>>);

}  // namespace attention
KVTILE_NAMESPACE_END
