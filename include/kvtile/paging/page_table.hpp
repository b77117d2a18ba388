// kvtile/paging/page_table.hpp: one sequence's logical-to-physical block map.
//
// Token t of the sequence lives in block blocks()[t / page_size], slot t % page_size; its
// global slot (the slot mapping entry kernels write through) is block * page_size + slot.
// The page table only records; which blocks it gets, and whether a block is shared, is decided
// by the cache that owns it.
#pragma once

#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "kvtile/core/checked.hpp"
#include "kvtile/core/error.hpp"
#include "kvtile/memory/block_allocator.hpp"

KVTILE_NAMESPACE_BEGIN
namespace paging {

using memory::block_id;

class page_table {
 public:
  page_table() = default;
  explicit page_table(std::int32_t page_size) : page_size_(page_size) {
    KVTILE_REQUIRE(page_size > 0, errc::invalid_argument, "page_size must be positive, got ", page_size);
  }

  page_table(const page_table&) = default;
  page_table& operator=(const page_table&) = default;
  // A moved-from table is empty (no blocks, no tokens), not a length without blocks.
  page_table(page_table&& o) noexcept
      : blocks_(std::move(o.blocks_)), num_tokens_(std::exchange(o.num_tokens_, 0)), page_size_(o.page_size_) {
    o.blocks_.clear();
  }
  page_table& operator=(page_table&& o) noexcept {
    if (this != &o) {
      blocks_ = std::move(o.blocks_);
      o.blocks_.clear();
      num_tokens_ = std::exchange(o.num_tokens_, 0);
      page_size_ = o.page_size_;
    }
    return *this;
  }

  std::int32_t page_size() const { return page_size_; }
  std::int64_t num_tokens() const { return num_tokens_; }
  std::int32_t num_blocks() const { return std::int32_t(blocks_.size()); }
  std::span<const block_id> blocks() const { return blocks_; }
  block_id block(std::int32_t i) const { return blocks_[std::size_t(i)]; }
  block_id last_block() const { return blocks_.back(); }
  // Tokens in the last block: 1..page_size, or 0 for an empty table.
  std::int32_t last_page_len() const {
    return blocks_.empty() ? 0 : std::int32_t(num_tokens_ - std::int64_t(blocks_.size() - 1) * page_size_);
  }
  // Free slots left in the last block.
  std::int32_t tail_room() const { return std::int32_t(std::int64_t(blocks_.size()) * page_size_ - num_tokens_); }
  // Blocks needed to hold n >= 0 tokens (no n + page_size - 1: n may be near 2^63).
  std::int64_t blocks_for(std::int64_t n) const { return ceil_div_nonneg(n, std::int64_t(page_size_)); }
  std::int64_t slot(std::int64_t t) const {
    return std::int64_t(blocks_[std::size_t(t / page_size_)]) * page_size_ + t % page_size_;
  }

  // Mutators for the owning cache; they check nothing beyond what keeps the table consistent.
  void reserve(std::size_t blocks) { blocks_.reserve(blocks); }
  void push_block(block_id b) { blocks_.push_back(b); }  // call reserve() first for no-throw
  void pop_block() { blocks_.pop_back(); }
  void set_block(std::int32_t i, block_id b) { blocks_[std::size_t(i)] = b; }
  void set_num_tokens(std::int64_t n) { num_tokens_ = n; }
  void clear() {
    blocks_.clear();
    num_tokens_ = 0;
  }

 private:
  std::vector<block_id> blocks_;
  std::int64_t num_tokens_ = 0;
  std::int32_t page_size_ = 16;
};

}  // namespace paging
KVTILE_NAMESPACE_END
