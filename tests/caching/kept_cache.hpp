// Test helper: the [sinks + window] cache that sink_window_eviction promises, built explicitly
// from a sequence's text K/V, for comparing attention over the evicted paged cache with
// attention over exactly the tokens it should have kept (cache position = index here).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "kvtile/caching/sink_window_eviction.hpp"

namespace kvtile_test {

// Appends sequence b's kept tokens to dense_k / dense_v ([tokens, hk * d] rows, text order:
// the first whole sink blocks of the text, then its last kept - sink tokens) and their count
// to kv_indptr. text_k / text_v: [text_len, hk * d] of that sequence.
template <class T>
void append_kept_cache(const kvtile::caching::sink_window_eviction& ev, std::int64_t kept, std::int64_t page,
                       const std::vector<T>& text_k, const std::vector<T>& text_v, std::int64_t row,
                       std::vector<T>& dense_k, std::vector<T>& dense_v, std::vector<std::int32_t>& kv_indptr) {
  const std::int64_t text_len = std::int64_t(text_k.size()) / row;
  const std::int64_t sink_tokens = std::min<std::int64_t>(std::int64_t(ev.sink_blocks()) * page, kept);
  for (std::int64_t i = 0; i < kept; ++i) {
    const std::int64_t t = i < sink_tokens ? i : text_len - (kept - i);
    dense_k.insert(dense_k.end(), text_k.begin() + t * row, text_k.begin() + (t + 1) * row);
    dense_v.insert(dense_v.end(), text_v.begin() + t * row, text_v.begin() + (t + 1) * row);
  }
  kv_indptr.push_back(kv_indptr.back() + std::int32_t(kept));
}

}  // namespace kvtile_test
