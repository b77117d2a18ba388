// kvtile/caching/sink_window_eviction.hpp: StreamingLLM's cache: attention sinks plus a recent
// window, so a sequence streams past any length in bounded memory.
//
// A sequence keeps its first `sinks` tokens (rounded up to whole blocks: the sink blocks) and
// its most recent `window` tokens; whole blocks between them go back to the allocator by
// editing the page table (kv_block_manager::drop_blocks): no K/V is copied, where the original
// implementation concatenates tensors every step. After evict() a sequence holds at most
// max_blocks() = sink blocks + ceil(window / page_size) + 1 blocks, whatever its length.
//
// Attention over such a cache uses positions *inside the cache*: keys are stored before
// rotation, and the rotary variant (attention/variant.hpp, rotary<causal_mask>) rotates key j
// at its index j in the cache and the queries at the cache's end, as StreamingLLM does
// (rotating at text positions past the trained length is what breaks models). The cache's
// num_tokens() is the kept length; the text position is num_tokens() plus the evicted tokens,
// which evict() returns for callers that track it.
//
// Composition: blocks dropped from a shared or prefix-cached sequence are released like any
// other (a fork keeps its own reference; an indexed block stays cached). Publish a prompt to the
// prefix cache before its sequence evicts: K/V computed after an eviction no longer depend on
// the whole text.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>

#include "kvtile/core/error.hpp"
#include "kvtile/paging/page_table.hpp"

KVTILE_NAMESPACE_BEGIN
namespace caching {

class sink_window_eviction {
 public:
  // Checked against the pool the sequences live in: one sequence's kept blocks must fit in it.
  sink_window_eviction(std::int64_t sinks, std::int64_t window, std::int32_t page_size, std::int32_t pool_blocks)
      : sinks_(sinks), window_(window), page_size_(page_size) {
    KVTILE_REQUIRE(page_size > 0, errc::invalid_argument, "page_size must be positive, got ", page_size);
    KVTILE_REQUIRE(sinks >= 0, errc::invalid_argument, "sinks must be >= 0, got ", sinks);
    KVTILE_REQUIRE(window > 0, errc::invalid_argument, "window must be positive, got ", window);
    KVTILE_REQUIRE(max_blocks() <= pool_blocks, errc::invalid_argument, "sinks ", sinks, " + window ", window,
                   " tokens need up to ", max_blocks(), " blocks of ", page_size, " tokens; the pool has ",
                   pool_blocks);
  }

  std::int64_t sinks() const { return sinks_; }
  std::int64_t window() const { return window_; }
  std::int32_t sink_blocks() const { return std::int32_t((sinks_ + page_size_ - 1) / page_size_); }
  // The most blocks a sequence holds after evict(): sink blocks, the window's blocks, and one
  // for a window that does not start on a block boundary.
  std::int64_t max_blocks() const { return sink_blocks() + (window_ + page_size_ - 1) / page_size_ + 1; }

  // The blocks of table t to drop: [first, first + count), every block after the sink blocks
  // whose tokens are all older than the `window` most recent ones.
  std::pair<std::int32_t, std::int32_t> victims(const paging::page_table& t) const {
    const std::int32_t first = sink_blocks();
    std::int32_t count = 0;
    // block first + count ends at token (first + count + 1) * page_size; it may go when that end
    // is at or before the window's start (num_tokens - window)
    while (first + count + 1 < t.num_blocks() &&
           std::int64_t(first + count + 1) * page_size_ <= t.num_tokens() - window_)
      ++count;
    return {first, count};
  }

  // Drop sequence id's evictable blocks; returns the number of tokens evicted.
  template <class Manager>
  std::int64_t evict(Manager& m, std::uint64_t id) const {
    KVTILE_REQUIRE(m.page_size() == page_size_, errc::invalid_argument, "eviction built for page_size ", page_size_,
                   " used on a cache with page_size ", m.page_size());
    const auto [first, count] = victims(m.table(id));
    m.drop_blocks(id, first, count);
    return std::int64_t(count) * page_size_;
  }

 private:
  std::int64_t sinks_;
  std::int64_t window_;
  std::int32_t page_size_;
};

}  // namespace caching
KVTILE_NAMESPACE_END
