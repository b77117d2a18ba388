// kvtile/sharing/sharing_policy.hpp: how (and whether) blocks are shared between sequences.
//
// The cache asks its sharing policy four things per block: a block was allocated; a page
// table dropped it (may it go back to the allocator?); a fork wants to share it; must a write
// into it be redirected to a private copy first? Policies in kvtile:
//   no_sharing      (this file) no reference counts at all: an empty type, every call a
//                   constant; fork is not available (a compile-time error)
//   copy_on_write   (sharing/copy_on_write.hpp) a reference count per block; fork shares every
//                   block; the first write into a shared block records a (src, dst) copy
#pragma once

#include <concepts>
#include <cstdint>
#include <span>

#include "kvtile/core/config.hpp"
#include "kvtile/memory/block_allocator.hpp"
#include "kvtile/memory/block_copy.hpp"

KVTILE_NAMESPACE_BEGIN
namespace sharing {

using memory::block_copy;
using memory::block_id;

// S::can_fork: fork() is offered; S::counts_references: refcount(b) is meaningful.
// on_allocate(b): b was just allocated to one page table.
// release(b, free_fn): one page table dropped b; calls free_fn(x) for each block x that must go
//   back to the allocator now (b, or a block b's release unpinned).
// share(b): one more page table holds b (fork).
// is_shared(b): a write into b must first copy it (more than one holder).
// record_copy(src, dst, n): a page table swapped its shared src for the fresh dst whose first n
//   slots must be copied from src; src stays allocated until the copy is done.
// pending(): copies recorded and not yet run; finish_pending(free_fn): they ran; calls
//   free_fn(b) for each source that no page table holds any more.
template <class S>
concept sharing_policy = std::default_initializable<S> &&
    requires(S s, const S cs, block_id b, std::int32_t n, void (*free_fn)(block_id)) {
      { S::can_fork } -> std::convertible_to<bool>;
      { S::counts_references } -> std::convertible_to<bool>;
      s.reset(n);
      s.on_allocate(b);
      s.release(b, free_fn);
      { cs.is_shared(b) } -> std::same_as<bool>;
      { cs.refcount(b) } -> std::convertible_to<std::int64_t>;
      { cs.pending() } -> std::convertible_to<std::span<const block_copy>>;
      s.finish_pending(free_fn);
    };

// Every block has exactly one holder; nothing to count, nothing to copy.
struct no_sharing {
  static constexpr bool can_fork = false;
  static constexpr bool counts_references = false;
  void reset(std::int32_t) noexcept {}
  void on_allocate(block_id) noexcept {}
  template <class F>
  void release(block_id b, F&& free_block) {
    free_block(b);
  }
  bool is_shared(block_id) const noexcept { return false; }
  std::int32_t refcount(block_id) const noexcept { return 1; }
  std::span<const block_copy> pending() const noexcept { return {}; }
  template <class F>
  void finish_pending(F&&) noexcept {}
};

static_assert(sharing_policy<no_sharing>, "no_sharing must satisfy sharing_policy");
static_assert(std::is_empty_v<no_sharing>, "no_sharing must cost nothing");

}  // namespace sharing
KVTILE_NAMESPACE_END
