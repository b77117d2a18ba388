// kvtile/kv_cache.hpp: the paged KV cache, composed from policies.
//
//   kv_block_manager<Allocator, Sharing>         the bookkeeping alone: sequences, their page
//                                                tables, reference counts, pending copies
//   paged_kv_cache<T, Layout, Allocator, Sharing, Memory>
//                                                the bookkeeping plus the K/V pools of every layer
//
// Swapping one policy is one line, through the with_* aliases:
//   using cache   = kvtile::paged_kv_cache<kvtile::bfloat16>;                // defaults
//   using compact = cache::with_allocator<kvtile::memory::lowest_id_allocator>;
//   using on_gpu  = cache::with_memory<kvtile::memory::cuda::device_memory>;  // needs nvcc
//
// One step of a serving loop: mutate (create / append / fork / truncate / free), then
// run_pending_copies(), then write the new tokens' K/V through the slot mappings that append
// returned. fork() is refused while copies are pending (the destinations' contents are not
// there yet); fork after the step's K/V are written.
//
// Every operation checks all of its input and the pool's capacity before it changes anything:
// an error (a kvtile::error naming the value) leaves the cache exactly as it was.
//
// A step that appends to many sequences asks can_append(requests) whether it fits, or runs
// append_batch(requests): every append of the batch, or (an error) none of them. A watermark
// keeps that many blocks free after the step (room for the next decode steps).
//
// Sequence ids are (generation << 32) | slot. A freed id is never valid again: when a slot's
// generation would pass its 2^GenerationBits - 1 limit (after 2^32 create / free cycles of
// that slot by default), the slot is retired instead of reused.
//
// Copies of a manager are independent. A moved-from manager or cache is empty (no blocks, no
// sequences) and refuses create(); every other call is an error naming the id, or a no-op.
// Cost: O(1) per block touched. fork costs one reference-count increment per block of the
// sequence plus a copy of its block list (no allocation of blocks, no per-block hashing).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "kvtile/core/checked.hpp"
#include "kvtile/core/error.hpp"
#include "kvtile/memory/block_allocator.hpp"
#include "kvtile/memory/block_storage.hpp"
#include "kvtile/memory/lifo_allocator.hpp"
#include "kvtile/memory/memory_policy.hpp"
#include "kvtile/paging/page_table.hpp"
#include "kvtile/paging/page_table_export.hpp"
#include "kvtile/sharing/copy_on_write.hpp"
#include "kvtile/sharing/sharing_policy.hpp"

KVTILE_NAMESPACE_BEGIN

// (generation << 32) | slot: a freed sequence's id is never valid again.
using sequence_id = std::uint64_t;

// One append of a step: num_tokens new tokens at the end of sequence id.
struct append_request {
  sequence_id id = 0;
  std::int64_t num_tokens = 0;
};

// GenerationBits (1..32): width of the generation part of an id; below 32 only to test the
// slot retirement without 2^32 cycles.
template <memory::block_allocator Allocator = memory::lifo_allocator,
          sharing::sharing_policy Sharing = sharing::copy_on_write, unsigned GenerationBits = 32>
class kv_block_manager {
  static_assert(GenerationBits >= 1 && GenerationBits <= 32, "GenerationBits must be in [1, 32]");

 public:
  using allocator_type = Allocator;
  using sharing_type = Sharing;
  using block_id = memory::block_id;
  // The last generation a slot hands out; freeing it retires the slot.
  static constexpr std::uint64_t max_generation = (std::uint64_t(1) << GenerationBits) - 1;

  kv_block_manager(std::int32_t num_blocks, std::int32_t page_size) : allocator_(num_blocks), page_size_(page_size) {
    KVTILE_REQUIRE(page_size > 0, errc::invalid_argument, "page_size must be positive, got ", page_size);
    sharing_.reset(num_blocks);
    scratch_.resize(std::size_t(num_blocks) + 1);
  }
  // Copies reserve what no-throw paths rely on (a vector copy keeps no spare capacity).
  kv_block_manager(const kv_block_manager& o)
      : allocator_(o.allocator_), sharing_(o.sharing_), seqs_(o.seqs_), scratch_(o.scratch_), page_size_(o.page_size_),
        live_(o.live_), moved_from_(o.moved_from_) {
    free_slots_.reserve(seqs_.size());
    free_slots_.assign(o.free_slots_.begin(), o.free_slots_.end());
  }
  kv_block_manager& operator=(const kv_block_manager& o) {
    if (this != &o) *this = kv_block_manager(o);
    return *this;
  }
  kv_block_manager(kv_block_manager&& o) noexcept
      : allocator_(std::move(o.allocator_)), sharing_(std::move(o.sharing_)), seqs_(std::move(o.seqs_)),
        free_slots_(std::move(o.free_slots_)), scratch_(std::move(o.scratch_)), page_size_(o.page_size_),
        live_(o.live_), moved_from_(o.moved_from_) {
    o.become_moved_from();
  }
  kv_block_manager& operator=(kv_block_manager&& o) noexcept {
    if (this != &o) {
      allocator_ = std::move(o.allocator_);
      sharing_ = std::move(o.sharing_);
      seqs_ = std::move(o.seqs_);
      free_slots_ = std::move(o.free_slots_);
      scratch_ = std::move(o.scratch_);
      page_size_ = o.page_size_;
      live_ = o.live_;
      moved_from_ = o.moved_from_;
      o.become_moved_from();
    }
    return *this;
  }

  std::int32_t page_size() const { return page_size_; }
  std::int32_t num_blocks() const { return allocator_.capacity(); }
  memory::allocator_stats stats() const { return allocator_.stats(); }
  std::int32_t num_free_blocks() const { return allocator_.num_free(); }
  std::int32_t num_sequences() const { return live_; }
  const Allocator& allocator() const { return allocator_; }
  // For allocator policies with an index of their own (caching::prefix_caching_allocator's
  // publish); blocks are allocated and freed through the manager only.
  Allocator& allocator() { return allocator_; }
  const Sharing& sharing() const { return sharing_; }
  std::int64_t refcount(block_id b) const {
    check_block(b);
    return allocator_.is_free(b) ? 0 : std::int64_t(sharing_.refcount(b));
  }

  // ---- sequences -------------------------------------------------------------------------
  sequence_id create() {
    KVTILE_REQUIRE(!moved_from_, errc::invalid_argument, "create() on a moved-from cache (it holds no blocks)");
    if (free_slots_.empty()) {
      KVTILE_REQUIRE(seqs_.size() < 0xffffffffu, errc::out_of_range, "too many sequences: ", seqs_.size());
      free_slots_.reserve(seqs_.size() + 1);  // free() never allocates
      seqs_.push_back(entry{paging::page_table(page_size_), 0, true});
      ++live_;
      return make_id(std::uint32_t(seqs_.size() - 1), 0);
    }
    const std::uint32_t slot = free_slots_.back();
    free_slots_.pop_back();
    seqs_[slot].live = true;
    ++live_;
    return make_id(slot, seqs_[slot].generation);
  }

  bool contains(sequence_id id) const { return find(id) != nullptr; }
  const paging::page_table& table(sequence_id id) const { return lookup(id, "table").table; }
  std::int64_t num_tokens(sequence_id id) const { return lookup(id, "num_tokens").table.num_tokens(); }
  // The live sequences, in slot order.
  std::vector<sequence_id> sequences() const {
    std::vector<sequence_id> ids;
    for (std::size_t s = 0; s < seqs_.size(); ++s)
      if (seqs_[s].live) ids.push_back(make_id(std::uint32_t(s), seqs_[s].generation));
    return ids;
  }

  // Append n tokens to sequence id; slots[i] receives the global slot (block * page_size +
  // offset) of the i-th new token. Blocks are allocated on demand. When the last block is
  // shared and partly filled, the sequence gets a private copy first (one pending copy).
  void append(sequence_id id, std::int64_t n, std::span<std::int64_t> slots) {
    entry& e = lookup(id, "append to");
    KVTILE_REQUIRE(std::int64_t(slots.size()) >= n, errc::invalid_argument, "slot mapping of ", slots.size(),
                   " entries cannot hold ", n, " new tokens");
    const append_plan p = plan_append(e, id, n, /*shared_dropped=*/0);
    KVTILE_REQUIRE(p.needed() <= allocator_.num_free(), errc::out_of_blocks, "appending ", n, " tokens to sequence ", id,
                   " needs ", p.needed(), " blocks, ", allocator_.num_free(), " are free");
    e.table.reserve(std::size_t(e.table.num_blocks() + p.new_blocks));  // may throw; nothing changed yet
    commit_append(e, p, n, slots.data());
  }
  // The pool is checked before the slot mapping is allocated: a request too large for the pool
  // is out_of_blocks, whatever its size.
  std::vector<std::int64_t> append(sequence_id id, std::int64_t n) {
    const append_plan p = plan_append(lookup(id, "append to"), id, n, 0);
    KVTILE_REQUIRE(p.needed() <= allocator_.num_free(), errc::out_of_blocks, "appending ", n, " tokens to sequence ", id,
                   " needs ", p.needed(), " blocks, ", allocator_.num_free(), " are free");
    std::vector<std::int64_t> slots(static_cast<std::size_t>(n));
    append(id, n, slots);
    return slots;
  }

  // ---- steps: many appends, all or nothing -------------------------------------------------
  // Blocks the batch would allocate, run in order (a copy-on-write counted once per shared block
  // it really copies). Checks every request: known id, num_tokens >= 0, no sequence twice.
  std::int64_t blocks_needed(std::span<const append_request> reqs) const {
    std::vector<block_dropped> dropped;
    return plan_batch(reqs, dropped, nullptr);
  }
  // Whether append_batch(reqs, slots, watermark) would succeed: the batch's blocks fit and
  // `watermark` blocks stay free after it. Throws for a malformed request.
  bool can_append(std::span<const append_request> reqs, std::int32_t watermark = 0) const {
    KVTILE_REQUIRE(watermark >= 0, errc::invalid_argument, "watermark must be >= 0, got ", watermark);
    return blocks_needed(reqs) <= std::int64_t(allocator_.num_free()) - watermark;
  }
  // Append to every sequence of the batch, in order; slots receives the requests' slot mappings
  // one after the other (sum of num_tokens entries). On any error (a bad request, too few free
  // blocks above the watermark) nothing has changed.
  void append_batch(std::span<const append_request> reqs, std::span<std::int64_t> slots, std::int32_t watermark = 0) {
    KVTILE_REQUIRE(watermark >= 0, errc::invalid_argument, "watermark must be >= 0, got ", watermark);
    std::vector<block_dropped> dropped;
    std::vector<append_plan> plans(reqs.size());
    std::int64_t tokens = 0;
    const std::int64_t needed = plan_batch(reqs, dropped, plans.data(), &tokens);
    KVTILE_REQUIRE(needed <= std::int64_t(allocator_.num_free()) - watermark, errc::out_of_blocks, "the batch of ",
                   reqs.size(), " appends needs ", needed, " blocks, ", allocator_.num_free(), " are free, watermark ",
                   watermark);
    KVTILE_REQUIRE(std::int64_t(slots.size()) >= tokens, errc::invalid_argument, "slot mapping of ", slots.size(),
                   " entries cannot hold the batch's ", tokens, " new tokens");
    for (std::size_t r = 0; r < reqs.size(); ++r) {  // may throw; nothing changed yet
      entry& e = seqs_[slot_of(reqs[r].id)];
      e.table.reserve(std::size_t(e.table.num_blocks() + plans[r].new_blocks));
    }
    std::int64_t at = 0;
    for (std::size_t r = 0; r < reqs.size(); ++r) {  // nothing throws: blocks and capacity are there
      // The plans ran the batch in order (a tail shared by two requests' sequences is copied
      // by the first only), so they match what each append finds.
      commit_append(seqs_[slot_of(reqs[r].id)], plans[r], reqs[r].num_tokens, slots.data() + at);
      at += reqs[r].num_tokens;
    }
  }
  std::vector<std::int64_t> append_batch(std::span<const append_request> reqs, std::int32_t watermark = 0) {
    KVTILE_REQUIRE(can_append(reqs, watermark), errc::out_of_blocks, "the batch of ", reqs.size(), " appends needs ",
                   blocks_needed(reqs), " blocks, ", allocator_.num_free(), " are free, watermark ", watermark);
    std::int64_t tokens = 0;
    for (const auto& r : reqs) tokens += r.num_tokens;  // each checked >= 0; the sum fits (the pool holds them)
    std::vector<std::int64_t> slots(static_cast<std::size_t>(tokens));
    append_batch(reqs, slots, watermark);
    return slots;
  }

  // A new sequence sharing every block of `parent`; allocates no block.
  sequence_id fork(sequence_id parent) {
    static_assert(Sharing::can_fork, "fork() needs a sharing policy that shares blocks (sharing::copy_on_write)");
    const entry& p = lookup(parent, "fork");
    KVTILE_REQUIRE(sharing_.pending().empty(), errc::invalid_argument, "fork of sequence ", parent, " while ",
                   sharing_.pending().size(), " block copies are pending: run them (and write the step's K/V) first");
    paging::page_table copy = p.table;  // may throw; nothing changed yet
    const sequence_id child = create();
    entry& c = seqs_[slot_of(child)];
    c.table = std::move(copy);
    for (block_id b : c.table.blocks()) sharing_.share(b);
    return child;
  }

  // Append whole blocks that already hold K/V (a cached prompt prefix: caching/prefix_cache.hpp)
  // to sequence id, whose length must be a multiple of page_size. A held block is shared
  // (refcount + 1); a block the allocator keeps cached (held by no one) is taken back from it.
  void attach(sequence_id id, std::span<const block_id> blocks) {
    static_assert(Sharing::can_fork, "attach() needs a sharing policy that shares blocks (sharing::copy_on_write)");
    entry& e = lookup(id, "attach blocks to");
    paging::page_table& t = e.table;
    KVTILE_REQUIRE(t.tail_room() == 0, errc::invalid_argument, "attach to sequence ", id, " of ", t.num_tokens(),
                   " tokens: its last block is partly filled");
    std::vector<block_id> sorted(blocks.begin(), blocks.end());  // may throw; nothing changed yet
    std::sort(sorted.begin(), sorted.end());
    for (std::size_t i = 0; i < sorted.size(); ++i) {
      const block_id b = sorted[i];
      check_block(b);
      KVTILE_REQUIRE(i == 0 || sorted[i - 1] != b, errc::invalid_argument, "attach of block ", b, " twice");
      if (allocator_.is_free(b)) {
        if constexpr (requires { allocator_.is_cached(b); })
          KVTILE_REQUIRE(allocator_.is_cached(b), errc::invalid_argument, "attach of block ", b,
                         ": it is free (holds no K/V)");
        else
          KVTILE_FAIL(errc::invalid_argument, "attach of block ", b, ": it is free (holds no K/V)");
      }
    }
    for (const auto& c : sharing_.pending())
      KVTILE_REQUIRE(!std::binary_search(sorted.begin(), sorted.end(), c.dst), errc::invalid_argument,
                     "attach of block ", c.dst, ": its copy-on-write copy has not run yet");
    t.reserve(std::size_t(t.num_blocks()) + blocks.size());  // may throw; nothing changed yet
    for (block_id b : blocks) {
      if (allocator_.is_free(b)) {
        if constexpr (requires { allocator_.take(b); }) {
          allocator_.take(b);
          sharing_.on_allocate(b);
        }
      } else {
        sharing_.share(b);
      }
      t.push_block(b);
    }
    t.set_num_tokens(t.num_tokens() + std::int64_t(blocks.size()) * page_size_);
  }

  // Remove the full blocks [first, first + count) from the middle of sequence id's page table
  // and release them: the blocks after them move up, the length shrinks by count * page_size.
  // No K/V moves (eviction: caching/sink_window_eviction.hpp). The last block stays.
  void drop_blocks(sequence_id id, std::int32_t first, std::int32_t count) {
    entry& e = lookup(id, "drop blocks of");
    paging::page_table& t = e.table;
    KVTILE_REQUIRE(first >= 0 && count >= 0 && (count == 0 || std::int64_t(first) + count < t.num_blocks()),
                   errc::out_of_range,
                   "drop of blocks [", first, ", ", std::int64_t(first) + count, ") of sequence ", id,
                   ": it has ", t.num_blocks(), " blocks and the last one stays");
    if (count == 0) return;
    for (std::int32_t i = first; i < first + count; ++i) release(t.block(i));
    for (std::int32_t i = first; i + count < t.num_blocks(); ++i) t.set_block(i, t.block(i + count));
    for (std::int32_t i = 0; i < count; ++i) t.pop_block();
    t.set_num_tokens(t.num_tokens() - std::int64_t(count) * page_size_);
    e.dropped += std::int64_t(count) * page_size_;
  }
  // Tokens drop_blocks removed from sequence id: its cache no longer holds its text contiguously.
  std::int64_t dropped_tokens(sequence_id id) const { return lookup(id, "dropped tokens of").dropped; }

  // Keep the first n tokens; blocks no longer needed are released.
  void truncate(sequence_id id, std::int64_t n) {
    entry& e = lookup(id, "truncate");
    KVTILE_REQUIRE(n >= 0 && n <= e.table.num_tokens(), errc::out_of_range, "truncate sequence ", id, " to ", n,
                   " tokens: it has ", e.table.num_tokens());
    const std::int64_t keep = e.table.blocks_for(n);
    while (e.table.num_blocks() > keep) {
      release(e.table.last_block());
      e.table.pop_block();
    }
    e.table.set_num_tokens(n);
  }

  // Release every block of the sequence; the id becomes invalid.
  void free(sequence_id id) {
    const std::uint32_t slot = slot_of(id);
    KVTILE_REQUIRE(!(slot < seqs_.size() && generation_of(id) < seqs_[slot].generation), errc::double_free,
                   "sequence ", id, " is already freed");
    entry& e = lookup(id, "free");
    for (std::int32_t i = e.table.num_blocks(); i-- > 0;) release(e.table.block(i));
    e.table.clear();
    e.dropped = 0;
    e.live = false;
    ++e.generation;
    --live_;
    // A slot past its last generation is retired: every id it ever had stays stale.
    if (e.generation <= max_generation) free_slots_.push_back(slot);  // capacity reserved in create()
  }
  // Slots retired after their last generation (each cost one entry, never reused).
  std::int64_t num_retired_slots() const {
    std::int64_t n = 0;
    for (const auto& e : seqs_) n += e.generation > max_generation;
    return n;
  }

  // ---- copy-on-write -----------------------------------------------------------------------
  std::span<const memory::block_copy> pending_copies() const { return sharing_.pending(); }
  // The pending copies have run: their sources may be freed now.
  void finish_copies() {
    sharing_.finish_pending([this](block_id b) { allocator_.free(b); });
  }

  // ---- kernel-facing tables ----------------------------------------------------------------
  paging::csr_page_table_host to_csr(std::span<const sequence_id> ids) const { return paging::to_csr(tables(ids)); }
  paging::padded_page_table_host to_padded(std::span<const sequence_id> ids, std::int32_t max_blocks = 0) const {
    return paging::to_padded(tables(ids), max_blocks);
  }

  // Throws errc::internal naming the first broken invariant: free + used = pool size; each
  // block's reference count equals the number of page tables holding it; no block is both free
  // and held; no allocated block is unreachable; every table holds exactly the blocks its length
  // needs; each pending copy's destination is held once and its source is pinned.
  void check_invariants() const {
    const std::int32_t cap = allocator_.capacity();
    std::vector<std::int64_t> holders(std::size_t(cap), 0);
    std::int64_t live = 0;
    for (std::size_t s = 0; s < seqs_.size(); ++s) {
      const auto& e = seqs_[s];
      if (!e.live) {
        KVTILE_REQUIRE(e.table.num_blocks() == 0, errc::internal, "freed sequence slot ", s, " still holds blocks");
        continue;
      }
      ++live;
      KVTILE_REQUIRE(e.table.num_blocks() == e.table.blocks_for(e.table.num_tokens()), errc::internal, "sequence slot ",
                     s, " has ", e.table.num_tokens(), " tokens in ", e.table.num_blocks(), " blocks");
      for (block_id b : e.table.blocks()) {
        KVTILE_REQUIRE(b >= 0 && b < cap, errc::internal, "sequence slot ", s, " holds block ", b, " outside the pool");
        ++holders[std::size_t(b)];
      }
    }
    KVTILE_REQUIRE(live == live_, errc::internal, live, " live sequences, counted ", live_);
    std::vector<std::int64_t> pins(std::size_t(cap), 0);
    for (const auto& c : sharing_.pending()) {
      ++pins[std::size_t(c.src)];
      KVTILE_REQUIRE(holders[std::size_t(c.dst)] == 1, errc::internal, "copy destination ", c.dst, " has ",
                     holders[std::size_t(c.dst)], " holders");
    }
    std::int32_t free_count = 0;
    for (block_id b = 0; b < cap; ++b) {
      const auto h = holders[std::size_t(b)];
      const bool is_free = allocator_.is_free(b);
      free_count += is_free;
      KVTILE_REQUIRE(!(is_free && h > 0), errc::internal, "block ", b, " is free and held by ", h, " sequences");
      KVTILE_REQUIRE(is_free || h > 0 || pins[std::size_t(b)] > 0, errc::internal, "block ", b,
                     " is allocated but neither held nor pinned by a pending copy (leaked)");
      if constexpr (Sharing::counts_references) {
        KVTILE_REQUIRE(std::int64_t(sharing_.refcount(b)) == h, errc::internal, "block ", b, " has refcount ",
                       sharing_.refcount(b), " but ", h, " holders");
        if constexpr (requires { sharing_.pins(b); })
          KVTILE_REQUIRE(std::int64_t(sharing_.pins(b)) == pins[std::size_t(b)], errc::internal, "block ", b,
                         " has ", sharing_.pins(b), " pins but ", pins[std::size_t(b)], " pending copies read it");
      } else {
        KVTILE_REQUIRE(h <= 1, errc::internal, "block ", b, " is held by ", h, " sequences without sharing");
      }
    }
    KVTILE_REQUIRE(free_count == allocator_.num_free(), errc::internal, free_count, " free blocks, the allocator counts ",
                   allocator_.num_free());
    const auto st = allocator_.stats();
    KVTILE_REQUIRE(st.free + st.used == st.capacity, errc::internal, "free ", st.free, " + used ", st.used,
                   " != pool size ", st.capacity);
  }

 private:
  struct entry {
    paging::page_table table;
    std::uint64_t generation = 0;  // max_generation + 1: retired
    bool live = false;
    std::int64_t dropped = 0;  // tokens drop_blocks removed from the middle
  };
  static sequence_id make_id(std::uint32_t slot, std::uint64_t gen) { return (sequence_id(gen) << 32) | slot; }
  static std::uint32_t slot_of(sequence_id id) { return std::uint32_t(id & 0xffffffffu); }
  static std::uint64_t generation_of(sequence_id id) { return id >> 32; }

  // What one append allocates: new_blocks at the end, plus one private copy of a shared tail.
  struct append_plan {
    std::int64_t n = 0;
    std::int64_t new_blocks = 0;
    bool cow = false;
    std::int64_t needed() const { return new_blocks + (cow ? 1 : 0); }
  };
  // A shared block and how many of its holders an earlier request of the batch copied away.
  struct block_dropped {
    block_id block;
    std::int64_t count;
  };

  // Checks n and the length it gives; `shared_dropped` holders of the tail block have already
  // copied it away (earlier requests of a batch).
  append_plan plan_append(const entry& e, sequence_id id, std::int64_t n, std::int64_t shared_dropped) const {
    KVTILE_REQUIRE(n >= 0, errc::invalid_argument, "cannot append ", n, " tokens to sequence ", id);
    const paging::page_table& t = e.table;
    append_plan p;
    p.n = n;
    if (n == 0) return p;
    const std::int64_t len = checked_add(t.num_tokens(), n, "sequence length after append");
    p.new_blocks = t.blocks_for(len) - t.num_blocks();
    if constexpr (Sharing::can_fork)
      p.cow = t.tail_room() > 0 && std::int64_t(sharing_.refcount(t.last_block())) - shared_dropped > 1;
    return p;
  }
  // The blocks are free and the table has room: nothing here throws.
  void commit_append(entry& e, const append_plan& p, std::int64_t n, std::int64_t* slots) noexcept {
    if (n == 0) return;
    paging::page_table& t = e.table;
    const std::int64_t len = t.num_tokens();
    const std::int32_t nb = t.num_blocks();
    const std::span<block_id> fresh(scratch_.data(), std::size_t(p.needed()));
    allocator_.allocate(fresh);
    // An allocator that caches block contents (prefix caching) hears of a block written in place.
    if constexpr (requires { allocator_.on_write(block_id{}); })
      if (!p.cow && t.tail_room() > 0) allocator_.on_write(t.last_block());
    std::size_t k = 0;
    if constexpr (Sharing::can_fork) {
      if (p.cow) {
        const block_id dst = fresh[k++];
        sharing_.on_allocate(dst);
        sharing_.record_copy(t.last_block(), dst, t.last_page_len());
        t.set_block(nb - 1, dst);
      }
    }
    for (; k < fresh.size(); ++k) {
      sharing_.on_allocate(fresh[k]);
      t.push_block(fresh[k]);
    }
    t.set_num_tokens(len + n);
    for (std::int64_t i = 0; i < n; ++i) slots[i] = t.slot(len + i);
  }
  // Plans every request of a batch in order; returns the blocks it needs. plans (when not null)
  // receives each request's plan, tokens (when not null) the sum of num_tokens.
  std::int64_t plan_batch(std::span<const append_request> reqs, std::vector<block_dropped>& dropped, append_plan* plans,
                          std::int64_t* tokens = nullptr) const {
    std::vector<std::uint32_t> slots;
    slots.reserve(reqs.size());
    std::int64_t needed = 0, sum = 0;
    for (std::size_t r = 0; r < reqs.size(); ++r) {
      const entry& e = lookup(reqs[r].id, "append to");
      slots.push_back(slot_of(reqs[r].id));
      std::int64_t already = 0;
      if constexpr (Sharing::can_fork)
        if (e.table.num_blocks() > 0)
          for (const auto& d : dropped)
            if (d.block == e.table.last_block()) already = d.count;
      const append_plan p = plan_append(e, reqs[r].id, reqs[r].num_tokens, already);
      if (p.cow) {
        auto it = std::find_if(dropped.begin(), dropped.end(), [&](const block_dropped& d) { return d.block == e.table.last_block(); });
        if (it == dropped.end()) dropped.push_back({e.table.last_block(), 1});
        else ++it->count;
      }
      if (plans) plans[r] = p;
      // Saturating sums: a batch too large to count is out of blocks, like one merely too large.
      if (__builtin_add_overflow(needed, p.needed(), &needed)) needed = std::numeric_limits<std::int64_t>::max();
      if (__builtin_add_overflow(sum, p.n, &sum)) sum = std::numeric_limits<std::int64_t>::max();
    }
    std::sort(slots.begin(), slots.end());
    const auto dup = std::adjacent_find(slots.begin(), slots.end());
    KVTILE_REQUIRE(dup == slots.end(), errc::invalid_argument, "the batch appends to sequence slot ", dup == slots.end() ? 0 : *dup,
                   " more than once");
    if (tokens) *tokens = sum;
    return needed;
  }
  void become_moved_from() noexcept {
    seqs_.clear();
    free_slots_.clear();
    scratch_.clear();
    live_ = 0;
    moved_from_ = true;
  }

  const entry* find(sequence_id id) const {
    const std::uint32_t slot = slot_of(id);
    if (slot >= seqs_.size()) return nullptr;
    const entry& e = seqs_[slot];
    return e.live && e.generation == generation_of(id) ? &e : nullptr;
  }
  const entry& lookup(sequence_id id, const char* what) const {
    const entry* e = find(id);
    if (!e) {
      const std::uint32_t slot = slot_of(id);
      if (slot < seqs_.size() && generation_of(id) < seqs_[slot].generation)
        KVTILE_FAIL(errc::unknown_sequence, what, " sequence ", id, ": it was freed");
      KVTILE_FAIL(errc::unknown_sequence, what, " sequence ", id, ": no such sequence");
    }
    return *e;
  }
  entry& lookup(sequence_id id, const char* what) { return const_cast<entry&>(std::as_const(*this).lookup(id, what)); }

  std::vector<const paging::page_table*> tables(std::span<const sequence_id> ids) const {
    std::vector<const paging::page_table*> out;
    out.reserve(ids.size());
    for (sequence_id id : ids) out.push_back(&lookup(id, "export").table);
    return out;
  }
  void check_block(block_id b) const {
    KVTILE_REQUIRE(b >= 0 && b < allocator_.capacity(), errc::out_of_range, "block id ", b, " is outside [0, ",
                   allocator_.capacity(), ")");
  }
  void release(block_id b) {
    sharing_.release(b, [this](block_id x) { allocator_.free(x); });
  }

  Allocator allocator_;
  [[no_unique_address]] Sharing sharing_;
  std::vector<entry> seqs_;
  std::vector<std::uint32_t> free_slots_;
  std::vector<block_id> scratch_;  // [num_blocks + 1]: fresh blocks of one append
  std::int32_t page_size_;
  std::int64_t live_ = 0;
  bool moved_from_ = false;
};

// The bookkeeping plus the K/V pools of every layer. T is the element type K/V are written in;
// the pools store Codec::storage<T> (T itself for identity; e4m3 bytes for memory::fp8_e4m3,
// quantised by write(); a per-head fp8 cache takes its scales through
// storage().set_head_scales). Block copies carry a per-token fp8 pool's scales.
template <class T, kv_layout Layout = kv_layout::nhd, memory::block_allocator Allocator = memory::lifo_allocator,
          sharing::sharing_policy Sharing = sharing::copy_on_write, memory::memory_policy Memory = memory::host_memory,
          memory::kv_codec Codec = memory::identity>
class paged_kv_cache {
 public:
  using value_type = T;
  using manager_type = kv_block_manager<Allocator, Sharing>;
  using storage_type = memory::block_storage<T, Memory, Codec>;
  using codec = Codec;
  static constexpr kv_layout layout = Layout;

  // One policy swapped, the others kept.
  template <kv_layout L>
  using with_layout = paged_kv_cache<T, L, Allocator, Sharing, Memory, Codec>;
  template <memory::block_allocator A>
  using with_allocator = paged_kv_cache<T, Layout, A, Sharing, Memory, Codec>;
  template <sharing::sharing_policy S>
  using with_sharing = paged_kv_cache<T, Layout, Allocator, S, Memory, Codec>;
  template <memory::memory_policy M>
  using with_memory = paged_kv_cache<T, Layout, Allocator, Sharing, M, Codec>;
  template <class U>
  using with_element = paged_kv_cache<U, Layout, Allocator, Sharing, Memory, Codec>;
  template <memory::kv_codec C>
  using with_codec = paged_kv_cache<T, Layout, Allocator, Sharing, Memory, C>;

  // The shape and the pools' byte sizes are checked before anything (the block manager's
  // per-block arrays, the pools) is allocated.
  explicit paged_kv_cache(memory::kv_shape shape, Memory memory = {})
      : blocks_((shape.check(sizeof(typename Codec::template storage<T>),
                             Codec::block_extra_bytes(shape.page_size, shape.num_kv_heads)),
                 shape.num_blocks),
                shape.page_size),
        storage_(shape, Layout, std::move(memory)) {}

  const memory::kv_shape& shape() const { return storage_.shape(); }
  manager_type& blocks() { return blocks_; }
  const manager_type& blocks() const { return blocks_; }
  storage_type& storage() { return storage_; }
  const storage_type& storage() const { return storage_; }

  // Bookkeeping (see kv_block_manager).
  sequence_id create() { return blocks_.create(); }
  void append(sequence_id id, std::int64_t n, std::span<std::int64_t> slots) { blocks_.append(id, n, slots); }
  std::vector<std::int64_t> append(sequence_id id, std::int64_t n) { return blocks_.append(id, n); }
  bool can_append(std::span<const append_request> reqs, std::int32_t watermark = 0) const {
    return blocks_.can_append(reqs, watermark);
  }
  void append_batch(std::span<const append_request> reqs, std::span<std::int64_t> slots, std::int32_t watermark = 0) {
    blocks_.append_batch(reqs, slots, watermark);
  }
  std::vector<std::int64_t> append_batch(std::span<const append_request> reqs, std::int32_t watermark = 0) {
    return blocks_.append_batch(reqs, watermark);
  }
  sequence_id fork(sequence_id id) { return blocks_.fork(id); }
  void attach(sequence_id id, std::span<const memory::block_id> blocks) { blocks_.attach(id, blocks); }
  void truncate(sequence_id id, std::int64_t n) { blocks_.truncate(id, n); }
  void drop_blocks(sequence_id id, std::int32_t first, std::int32_t count) { blocks_.drop_blocks(id, first, count); }
  void free(sequence_id id) { blocks_.free(id); }
  std::int64_t num_tokens(sequence_id id) const { return blocks_.num_tokens(id); }
  const paging::page_table& table(sequence_id id) const { return blocks_.table(id); }
  memory::allocator_stats stats() const { return blocks_.stats(); }
  std::span<const memory::block_copy> pending_copies() const { return blocks_.pending_copies(); }
  void check_invariants() const { blocks_.check_invariants(); }

  // Run every pending copy in one batch (memcpy on the host, one kernel on the GPU). On error
  // (a CUDA failure) the copies stay pending.
  void run_pending_copies() {
    const auto copies = blocks_.pending_copies();
    if (copies.empty()) return;
    storage_.memory().copy_blocks(storage_.pools(), copies);
    blocks_.finish_copies();
  }

  // Write n new tokens' K and V of one layer ([n, num_kv_heads, head_dim], token_stride
  // elements apart) through a slot mapping from append(). Pointers live where Memory lives.
  void write(std::int32_t layer, const T* k, const T* v, std::int64_t token_stride, const std::int64_t* slots,
             std::int32_t n) {
    storage_.memory().write_kv(storage_.layer(layer), k, v, token_stride, slots, n);
  }

  memory::kv_pool_view<typename Codec::template storage<T>, Codec> layer(std::int32_t l) const { return storage_.layer(l); }
  paging::csr_page_table_host to_csr(std::span<const sequence_id> ids) const { return blocks_.to_csr(ids); }
  paging::padded_page_table_host to_padded(std::span<const sequence_id> ids, std::int32_t max_blocks = 0) const {
    return blocks_.to_padded(ids, max_blocks);
  }

 private:
  manager_type blocks_;
  storage_type storage_;
};

KVTILE_NAMESPACE_END
