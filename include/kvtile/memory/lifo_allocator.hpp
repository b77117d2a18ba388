// kvtile/memory/lifo_allocator.hpp: a free list used as a stack; O(1) allocate and free.
//
// The most recently freed block is reused first (it is the likeliest to still be in cache).
// A fresh pool hands out ids 0, 1, 2, ... in order.
#pragma once

#include <span>
#include <utility>
#include <vector>

#include "kvtile/memory/block_allocator.hpp"

KVTILE_NAMESPACE_BEGIN
namespace memory {

class lifo_allocator : public detail::allocator_accounting<lifo_allocator> {
 public:
  explicit lifo_allocator(std::int32_t capacity) : allocator_accounting(capacity) {
    stack_.reserve(std::size_t(capacity));
    for (std::int32_t b = capacity - 1; b >= 0; --b) stack_.push_back(b);
  }
  // A copy reserves the full capacity again (a vector copy does not), so free() never allocates.
  lifo_allocator(const lifo_allocator& o) : allocator_accounting(o) {
    stack_.reserve(std::size_t(o.capacity()));
    stack_.assign(o.stack_.begin(), o.stack_.end());
  }
  lifo_allocator& operator=(const lifo_allocator& o) {
    if (this != &o) *this = lifo_allocator(o);
    return *this;
  }
  lifo_allocator(lifo_allocator&& o) noexcept : allocator_accounting(std::move(o)), stack_(std::move(o.stack_)) {
    o.stack_.clear();
  }
  lifo_allocator& operator=(lifo_allocator&& o) noexcept {
    allocator_accounting::operator=(std::move(o));
    if (this != &o) {
      stack_ = std::move(o.stack_);
      o.stack_.clear();
    }
    return *this;
  }

 private:
  friend allocator_accounting;
  block_id take() {
    const block_id b = stack_.back();
    stack_.pop_back();
    return b;
  }
  void put_back(block_id b) { stack_.push_back(b); }  // capacity reserved: never reallocates
  std::vector<block_id> stack_;  // free ids; top = next to hand out
};

static_assert(block_allocator<lifo_allocator>, "lifo_allocator must satisfy block_allocator");

}  // namespace memory
KVTILE_NAMESPACE_END
