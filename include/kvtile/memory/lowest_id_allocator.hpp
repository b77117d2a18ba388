// kvtile/memory/lowest_id_allocator.hpp: always hands out the lowest free block id.
//
// Keeps the used part of the pool compact (a pool can later be shrunk from the top, and
// neighbouring sequences land in neighbouring memory). The free set is a 64-ary tree of bit
// words: a set bit in level 0 means "this block is free", a set bit in level k+1 means "word i
// of level k has a set bit". Finding the lowest free id is one count-trailing-zeros per level,
// so allocate and free cost O(log64 capacity): 3 levels cover 262,144 blocks.
#pragma once

#include <bit>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "kvtile/memory/block_allocator.hpp"

KVTILE_NAMESPACE_BEGIN
namespace memory {

class lowest_id_allocator : public detail::allocator_accounting<lowest_id_allocator> {
 public:
  explicit lowest_id_allocator(std::int32_t capacity) : allocator_accounting(capacity) {
    std::int64_t n = capacity;
    do {
      const std::int64_t words = (n + 63) / 64;
      std::vector<std::uint64_t> level(std::size_t(words), 0);
      for (std::int64_t i = 0; i < n; ++i) level[std::size_t(i / 64)] |= std::uint64_t(1) << (i % 64);
      levels_.push_back(std::move(level));
      n = words;
    } while (n > 1);
  }
  lowest_id_allocator(const lowest_id_allocator&) = default;
  lowest_id_allocator& operator=(const lowest_id_allocator&) = default;
  // Moved from: an empty pool (the base's counters are zero, so take() is never reached).
  lowest_id_allocator(lowest_id_allocator&& o) noexcept : allocator_accounting(std::move(o)), levels_(std::move(o.levels_)) {
    o.levels_.clear();
  }
  lowest_id_allocator& operator=(lowest_id_allocator&& o) noexcept {
    allocator_accounting::operator=(std::move(o));
    if (this != &o) {
      levels_ = std::move(o.levels_);
      o.levels_.clear();
    }
    return *this;
  }

 private:
  friend allocator_accounting;
  void put_back(block_id b) {
    std::int64_t i = b;
    for (auto& level : levels_) {
      auto& word = level[std::size_t(i / 64)];
      const bool was_empty = word == 0;
      word |= std::uint64_t(1) << (i % 64);
      if (!was_empty) break;  // the levels above already know this word has a free bit
      i /= 64;
    }
  }
  block_id take() {
    // Walk down from the root, taking the lowest set bit at each level.
    std::int64_t i = 0;
    for (std::size_t k = levels_.size(); k-- > 0;) i = i * 64 + std::countr_zero(levels_[k][std::size_t(i)]);
    const block_id b = block_id(i);
    // Clear the bit, and its parents' bits while words become empty.
    for (auto& level : levels_) {
      auto& word = level[std::size_t(i / 64)];
      word &= ~(std::uint64_t(1) << (i % 64));
      if (word != 0) break;
      i /= 64;
    }
    return b;
  }
  std::vector<std::vector<std::uint64_t>> levels_;  // levels_[0]: one bit per block
};

static_assert(block_allocator<lowest_id_allocator>, "lowest_id_allocator must satisfy block_allocator");

}  // namespace memory
KVTILE_NAMESPACE_END
