// kvtile/caching/lru_list.hpp: an intrusive least-recently-used list over block ids.
//
// The links are two arrays indexed by block id ([capacity] each), so push, remove and pop are
// O(1) with no allocation after construction. The front is the least recently pushed id.
#pragma once

#include <cstdint>
#include <vector>

#include "kvtile/core/config.hpp"
#include "kvtile/memory/block_allocator.hpp"

KVTILE_NAMESPACE_BEGIN
namespace caching {

using memory::block_id;

class lru_list {
 public:
  lru_list() = default;
  explicit lru_list(std::int32_t capacity) : prev_(std::size_t(capacity), absent), next_(std::size_t(capacity), absent) {}

  std::int32_t size() const noexcept { return size_; }
  bool empty() const noexcept { return size_ == 0; }
  bool contains(block_id b) const noexcept { return prev_[std::size_t(b)] != absent; }
  block_id front() const noexcept { return head_; }  // -1 when empty
  // Next towards the back, -1 after the back (for walking the list in order).
  block_id next(block_id b) const noexcept { return next_[std::size_t(b)]; }

  // b must not be in the list.
  void push_back(block_id b) noexcept {
    prev_[std::size_t(b)] = tail_;
    next_[std::size_t(b)] = none;
    if (tail_ == none) head_ = b;
    else next_[std::size_t(tail_)] = b;
    tail_ = b;
    ++size_;
  }
  // b must be in the list.
  void remove(block_id b) noexcept {
    const block_id p = prev_[std::size_t(b)], n = next_[std::size_t(b)];
    if (p == none) head_ = n;
    else next_[std::size_t(p)] = n;
    if (n == none) tail_ = p;
    else prev_[std::size_t(n)] = p;
    prev_[std::size_t(b)] = next_[std::size_t(b)] = absent;
    --size_;
  }
  // The list must not be empty.
  block_id pop_front() noexcept {
    const block_id b = head_;
    remove(b);
    return b;
  }

 private:
  static constexpr block_id none = -1;    // end of the list
  static constexpr block_id absent = -2;  // prev_ of an id not in the list
  std::vector<block_id> prev_;            // [capacity]
  std::vector<block_id> next_;            // [capacity]
  block_id head_ = none;
  block_id tail_ = none;
  std::int32_t size_ = 0;
};

}  // namespace caching
KVTILE_NAMESPACE_END
