// kvtile/memory/block_allocator.hpp: what every block allocator policy provides.
//
// A block allocator hands out ids of fixed-size KV blocks from a pool of `capacity` blocks
// (ids [0, capacity)). It knows nothing about what a block holds or who shares it; reference
// counts live in the sharing policy. Policies in kvtile:
//   lifo_allocator        free list, last freed is first reused; O(1) allocate and free
//   lowest_id_allocator   always the lowest free id (keeps the used part of the pool compact);
//                         O(log64 capacity) allocate and free (a 64-ary bit tree, 3 levels for 262k blocks)
// Both detect a double free and an id outside the pool, and allocate n blocks all or nothing.
#pragma once

#include <concepts>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "kvtile/core/config.hpp"
#include "kvtile/core/error.hpp"

KVTILE_NAMESPACE_BEGIN
namespace memory {

using block_id = std::int32_t;

struct allocator_stats {
  std::int32_t capacity = 0;    // blocks in the pool
  std::int32_t free = 0;        // blocks available now
  std::int32_t used = 0;        // capacity - free
  std::int32_t high_water = 0;  // most blocks ever in use at once since construction
};

// allocate() throws errc::out_of_blocks when empty; allocate(out) fills every entry of `out`
// or, when fewer blocks are free, throws errc::out_of_blocks and allocates nothing;
// free(b) throws errc::out_of_range for an id outside the pool and errc::double_free for a
// free block, changing nothing.
template <class A>
concept block_allocator = std::constructible_from<A, std::int32_t> &&
    requires(A a, const A ca, block_id b, std::span<block_id> out) {
      { a.allocate() } -> std::same_as<block_id>;
      a.allocate(out);
      a.free(b);
      { ca.is_free(b) } -> std::same_as<bool>;
      { ca.num_free() } -> std::same_as<std::int32_t>;
      { ca.capacity() } -> std::same_as<std::int32_t>;
      { ca.stats() } -> std::same_as<allocator_stats>;
    };

namespace detail {
// What both allocators share: the checked allocate / free (all or nothing, double-free and
// range detection), the free bitmap and the counters. The policy `Derived` supplies the order:
// take() hands out one free id (the count was checked), put_back(b) returns a freed one.
template <class Derived>
class allocator_accounting {
 public:
  explicit allocator_accounting(std::int32_t capacity) : capacity_(capacity), free_count_(capacity) {
    KVTILE_REQUIRE(capacity >= 0, errc::invalid_argument, "block pool capacity must be >= 0, got ", capacity);
    is_free_.assign(std::size_t(capacity), 1);
  }
  // Copies are independent pools. A moved-from allocator is an empty pool (capacity 0): every
  // allocate is out_of_blocks, every free out_of_range.
  allocator_accounting(const allocator_accounting&) = default;
  allocator_accounting& operator=(const allocator_accounting&) = default;
  allocator_accounting(allocator_accounting&& o) noexcept
      : is_free_(std::move(o.is_free_)), capacity_(std::exchange(o.capacity_, 0)),
        free_count_(std::exchange(o.free_count_, 0)), high_water_(std::exchange(o.high_water_, 0)) {
    o.is_free_.clear();
  }
  allocator_accounting& operator=(allocator_accounting&& o) noexcept {
    if (this != &o) {
      is_free_ = std::move(o.is_free_);
      o.is_free_.clear();
      capacity_ = std::exchange(o.capacity_, 0);
      free_count_ = std::exchange(o.free_count_, 0);
      high_water_ = std::exchange(o.high_water_, 0);
    }
    return *this;
  }
  std::int32_t capacity() const { return capacity_; }
  std::int32_t num_free() const { return free_count_; }
  bool is_free(block_id b) const { return b >= 0 && b < capacity_ && is_free_[std::size_t(b)] != 0; }
  allocator_stats stats() const { return {capacity_, free_count_, capacity_ - free_count_, high_water_}; }

  block_id allocate() {
    require_available(1);
    return take_one();
  }
  // All or nothing: either every entry of `out` gets a block or none is taken.
  void allocate(std::span<block_id> out) {
    require_available(std::int64_t(out.size()));
    for (auto& b : out) b = take_one();
  }
  void free(block_id b) {
    require_freeable(b);
    is_free_[std::size_t(b)] = 1;
    ++free_count_;
    static_cast<Derived*>(this)->put_back(b);
  }

 private:
  void require_available(std::int64_t n) const {
    KVTILE_REQUIRE(n >= 0, errc::invalid_argument, "cannot allocate a negative number of blocks: ", n);
    KVTILE_REQUIRE(n <= free_count_, errc::out_of_blocks, "asked for ", n, " blocks, ", free_count_, " of ",
                   capacity_, " are free");
  }
  void require_freeable(block_id b) const {
    KVTILE_REQUIRE(b >= 0 && b < capacity_, errc::out_of_range, "block id ", b, " is outside the pool [0, ",
                   capacity_, ")");
    KVTILE_REQUIRE(!is_free_[std::size_t(b)], errc::double_free, "block ", b, " is already free");
  }
  block_id take_one() {
    const block_id b = static_cast<Derived*>(this)->take();
    is_free_[std::size_t(b)] = 0;
    --free_count_;
    if (capacity_ - free_count_ > high_water_) high_water_ = capacity_ - free_count_;
    return b;
  }

  std::vector<unsigned char> is_free_;  // [capacity]
  std::int32_t capacity_ = 0;
  std::int32_t free_count_ = 0;
  std::int32_t high_water_ = 0;
};
}  // namespace detail

}  // namespace memory
KVTILE_NAMESPACE_END
