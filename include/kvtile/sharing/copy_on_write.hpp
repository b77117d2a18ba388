// kvtile/sharing/copy_on_write.hpp: reference-counted blocks with copy-on-write.
//
// fork() shares every block of a sequence (one increment per block; nothing is allocated).
// When a sequence appends into a shared, partially filled last block, the cache gives it a
// fresh block and records (src, dst, filled tokens) here. Copies are run later in one batch
// (host memcpy or one GPU kernel) and then finished with finish_pending().
//
// Why a batch stays race-free when run in parallel:
//  - a pending copy pins its source: when no page table holds the source any more it is not
//    freed until the copy has run, so it cannot be reused as another copy's destination;
//  - a destination freed before its copy ran (its sequence was truncated or freed) cancels the
//    copy, so a reused block is never overwritten by a stale copy;
//  - the cache refuses fork() while copies are pending, so a destination (whose content is not
//    there yet) is never shared and never becomes a source.
#pragma once

#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "kvtile/sharing/sharing_policy.hpp"

KVTILE_NAMESPACE_BEGIN
namespace sharing {

class copy_on_write {
 public:
  static constexpr bool can_fork = true;
  static constexpr bool counts_references = true;

  copy_on_write() = default;
  // A copy reserves pending_ again (a vector copy does not), so record_copy never allocates.
  copy_on_write(const copy_on_write& o)
      : refcount_(o.refcount_), pins_(o.pins_), pending_of_dst_(o.pending_of_dst_) {
    pending_.reserve(refcount_.size());
    pending_.assign(o.pending_.begin(), o.pending_.end());
  }
  copy_on_write& operator=(const copy_on_write& o) {
    if (this != &o) *this = copy_on_write(o);
    return *this;
  }
  // Moved from: no blocks, nothing pending.
  copy_on_write(copy_on_write&& o) noexcept
      : refcount_(std::move(o.refcount_)), pins_(std::move(o.pins_)), pending_of_dst_(std::move(o.pending_of_dst_)),
        pending_(std::move(o.pending_)) {
    o.clear();
  }
  copy_on_write& operator=(copy_on_write&& o) noexcept {
    if (this != &o) {
      refcount_ = std::move(o.refcount_);
      pins_ = std::move(o.pins_);
      pending_of_dst_ = std::move(o.pending_of_dst_);
      pending_ = std::move(o.pending_);
      o.clear();
    }
    return *this;
  }

  void reset(std::int32_t num_blocks) {
    refcount_.assign(std::size_t(num_blocks), 0);
    pins_.assign(std::size_t(num_blocks), 0);
    pending_of_dst_.assign(std::size_t(num_blocks), -1);
    pending_.clear();
    pending_.reserve(std::size_t(num_blocks));  // at most one pending copy per destination block
  }

  void on_allocate(block_id b) noexcept { refcount_[std::size_t(b)] = 1; }
  void share(block_id b) noexcept { ++refcount_[std::size_t(b)]; }
  bool is_shared(block_id b) const noexcept { return refcount_[std::size_t(b)] > 1; }
  std::uint32_t refcount(block_id b) const noexcept { return refcount_[std::size_t(b)]; }
  std::uint32_t pins(block_id b) const noexcept { return pins_[std::size_t(b)]; }

  // One page table dropped b; free_block(x) is called for every block that must go back to the
  // allocator now: b itself, and the source of b's pending copy if that copy was its last pin.
  template <class FreeFn>
  void release(block_id b, FreeFn&& free_block) {
    if (--refcount_[std::size_t(b)] != 0) return;
    if (const std::int32_t i = pending_of_dst_[std::size_t(b)]; i >= 0) {
      const block_id src = cancel(i);
      if (pins_[std::size_t(src)] == 0 && refcount_[std::size_t(src)] == 0) free_block(src);
    }
    if (pins_[std::size_t(b)] == 0) free_block(b);
  }

  // The caller's page table swaps src (shared) for dst (fresh, already on_allocate'd).
  void record_copy(block_id src, block_id dst, std::int32_t num_tokens) noexcept {
    --refcount_[std::size_t(src)];  // stays >= 1: src was shared
    ++pins_[std::size_t(src)];
    pending_of_dst_[std::size_t(dst)] = std::int32_t(pending_.size());
    pending_.push_back({src, dst, num_tokens});  // capacity reserved in reset(): never reallocates
  }

  std::span<const block_copy> pending() const noexcept { return pending_; }
  bool has_pending() const noexcept { return !pending_.empty(); }

  template <class FreeFn>
  void finish_pending(FreeFn&& free_block) {
    for (const auto& c : pending_) {
      pending_of_dst_[std::size_t(c.dst)] = -1;
      if (--pins_[std::size_t(c.src)] == 0 && refcount_[std::size_t(c.src)] == 0) free_block(c.src);
    }
    pending_.clear();
  }

 private:
  void clear() noexcept {
    refcount_.clear();
    pins_.clear();
    pending_of_dst_.clear();
    pending_.clear();
  }
  // Remove pending copy i (its destination was freed): swap with the last, unpin the source.
  block_id cancel(std::int32_t i) noexcept {
    const block_copy c = pending_[std::size_t(i)];
    pending_of_dst_[std::size_t(c.dst)] = -1;
    --pins_[std::size_t(c.src)];
    const std::size_t last = pending_.size() - 1;
    if (std::size_t(i) != last) {
      pending_[std::size_t(i)] = pending_[last];
      pending_of_dst_[std::size_t(pending_[std::size_t(i)].dst)] = i;
    }
    pending_.pop_back();
    return c.src;
  }

  std::vector<std::uint32_t> refcount_;       // [num_blocks]: page tables holding the block
  std::vector<std::uint32_t> pins_;           // [num_blocks]: pending copies reading the block
  std::vector<std::int32_t> pending_of_dst_;  // [num_blocks]: index in pending_ of the copy into it, or -1
  std::vector<block_copy> pending_;
};

static_assert(sharing_policy<copy_on_write>, "copy_on_write must satisfy sharing_policy");

}  // namespace sharing
KVTILE_NAMESPACE_END
