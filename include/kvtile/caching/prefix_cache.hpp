// kvtile/caching/prefix_cache.hpp: reuse of prompt prefixes that another request computed.
//
//   prefix_caching_allocator<Inner, Hash>   a block_allocator policy: an index of full blocks by
//                                           their chained hash, and an LRU of the indexed blocks
//                                           no sequence holds
//   admit_prefix(manager, id, tokens, salt) shares the longest cached prefix into a new sequence
//   publish_prefix(manager, id, tokens, salt) indexes a sequence's full blocks once their K/V are written
//
// Use: paged_kv_cache<T>::with_allocator<caching::prefix_caching_allocator<>>. Then per request:
//   id = cache.create();
//   reused = admit_prefix(cache.blocks(), id, prompt);   // whole blocks, refcount + 1 each
//   slots = cache.append(id, prompt.size() - reused);     // only the rest is computed
//   ... prefill writes K/V through slots ...
//   publish_prefix(cache.blocks(), id, prompt);           // later requests can hit these blocks
//
// A block's identity is (hash, salt, its tokens, the identity of the block before it): a hit
// compares the tokens and checks that the candidate's parent is the block matched one step
// before (by a serial number given at indexing), so a hash collision, even one forced by a
// constant Hash, never hands a prompt another prompt's K/V.
//
// Blocks whose last holder lets go stay indexed ("cached") at the back of an intrusive LRU;
// the allocator hands out truly free blocks first and then reclaims the front of the LRU, O(1)
// per block, dropping its index entry. To the block manager a cached block is free (it can be
// allocated at any time), so its invariants and out-of-blocks checks are unchanged. For the
// pool: unused (free list) + cached (LRU) + in use = capacity, always.
//
// Composition: forks of a request that hit the cache share the same blocks (copy-on-write only
// ever copies a partial last block, and indexed blocks are full); a sequence that writes in
// place into an indexed block (after a truncate) drops its index entry first (on_write); blocks
// the eviction policy drops from a page table are released like any other, so the indexed ones
// stay cached. A sequence is published before eviction drops any of its blocks (publish_prefix
// refuses afterwards): later blocks' K/V no longer depend on the whole text before them.
#pragma once

#include <algorithm>
#include <cstdint>
#include <span>
#include <unordered_map>
#include <vector>

#include "kvtile/caching/block_hash.hpp"
#include "kvtile/caching/lru_list.hpp"
#include "kvtile/core/error.hpp"
#include "kvtile/memory/block_allocator.hpp"
#include "kvtile/memory/lifo_allocator.hpp"

KVTILE_NAMESPACE_BEGIN
namespace caching {

// What admit found: the cached blocks of the longest prefix, and the chain position after them.
struct prefix_match {
  std::vector<block_id> blocks;
  std::uint64_t hash = 0;    // chained hash of the last matched block (0: none)
  std::uint64_t serial = 0;  // its index serial (0: none)
};

struct prefix_cache_stats {
  std::int32_t capacity = 0;
  std::int32_t unused = 0;   // on the free list: no K/V worth keeping
  std::int32_t cached = 0;   // indexed, held by no sequence, reclaimable (LRU)
  std::int32_t in_use = 0;   // held by a sequence or pinned by a pending copy
  std::int32_t indexed = 0;  // cached + indexed blocks in use
  std::int64_t reclaimed = 0;  // cached blocks handed out again since construction
};

template <memory::block_allocator Inner = memory::lifo_allocator, block_hash Hash = chained_block_hash>
class prefix_caching_allocator {
 public:
  using inner_type = Inner;
  using hash_type = Hash;

  explicit prefix_caching_allocator(std::int32_t capacity)
      : inner_(capacity), lru_(capacity), info_(std::size_t(capacity)), tokens_(std::size_t(capacity)) {
    index_.reserve(std::size_t(capacity));
  }

  // ---- block_allocator ---------------------------------------------------------------------
  std::int32_t capacity() const { return inner_.capacity(); }
  // Free to the cache: unused plus cached (a cached block is reclaimed when allocated).
  std::int32_t num_free() const { return inner_.num_free() + lru_.size(); }
  bool is_free(block_id b) const { return inner_.is_free(b) || (in_pool(b) && lru_.contains(b)); }
  memory::allocator_stats stats() const {
    return {capacity(), num_free(), capacity() - num_free(), high_water_};
  }

  block_id allocate() {
    KVTILE_REQUIRE(num_free() > 0, errc::out_of_blocks, "asked for 1 block, 0 of ", capacity(),
                   " are free or cached");
    return take_one();
  }
  void allocate(std::span<block_id> out) {
    KVTILE_REQUIRE(std::int64_t(out.size()) <= num_free(), errc::out_of_blocks, "asked for ", out.size(),
                   " blocks, ", num_free(), " of ", capacity(), " are free or cached");
    for (auto& b : out) b = take_one();
  }
  // The last holder let go: an indexed block becomes cached (back of the LRU), any other free.
  void free(block_id b) {
    KVTILE_REQUIRE(in_pool(b), errc::out_of_range, "block id ", b, " is outside the pool [0, ", capacity(), ")");
    KVTILE_REQUIRE(!is_free(b), errc::double_free, "block ", b, " is already free");
    if (info_[std::size_t(b)].serial != 0) lru_.push_back(b);
    else inner_.free(b);
  }

  // ---- the prefix index ----------------------------------------------------------------------
  bool is_cached(block_id b) const { return in_pool(b) && lru_.contains(b); }
  bool is_indexed(block_id b) const { return in_pool(b) && info_[std::size_t(b)].serial != 0; }
  std::int32_t num_cached() const { return lru_.size(); }
  std::int32_t num_indexed() const { return indexed_; }
  prefix_cache_stats cache_stats() const {
    return {capacity(), inner_.num_free(), lru_.size(), capacity() - num_free(), indexed_, reclaimed_};
  }

  // Take a cached block back into use (a prefix hit on a block no one held); O(1).
  void take(block_id b) {
    KVTILE_REQUIRE(is_cached(b), errc::invalid_argument, "block ", b, " is not cached");
    lru_.remove(b);
    bump_high_water();
  }

  // The longest run of indexed blocks naming tokens[0, max_blocks * page_size) under salt.
  prefix_match match(std::span<const token_id> tokens, std::int32_t page_size, std::uint64_t salt,
                     std::int64_t max_blocks) const {
    KVTILE_REQUIRE(page_size > 0, errc::invalid_argument, "page_size must be positive, got ", page_size);
    prefix_match m;
    const std::int64_t n = std::min<std::int64_t>(max_blocks, std::int64_t(tokens.size()) / page_size);
    for (std::int64_t i = 0; i < n; ++i) {
      const auto blk = tokens.subspan(std::size_t(i * page_size), std::size_t(page_size));
      const std::uint64_t h = hash_(m.hash, blk, salt);
      const block_id b = find(h, salt, m.serial, blk);
      if (b < 0) break;
      m.blocks.push_back(b);
      m.hash = h;
      m.serial = info_[std::size_t(b)].serial;
    }
    return m;
  }

  // Index the held blocks `blocks` (block i holds tokens [i * page_size, (i + 1) * page_size)).
  // A block whose identity is indexed already (another request computed the same prefix) is
  // skipped, and the chain continues from the indexed one. Returns how many blocks were indexed.
  std::int32_t publish(std::span<const block_id> blocks, std::span<const token_id> tokens, std::int32_t page_size,
                       std::uint64_t salt) {
    KVTILE_REQUIRE(page_size > 0, errc::invalid_argument, "page_size must be positive, got ", page_size);
    KVTILE_REQUIRE(std::int64_t(tokens.size()) >= std::int64_t(blocks.size()) * page_size, errc::invalid_argument,
                   blocks.size(), " blocks need ", std::int64_t(blocks.size()) * page_size, " tokens, got ",
                   tokens.size());
    for (block_id b : blocks) {
      KVTILE_REQUIRE(in_pool(b) && !is_free(b), errc::invalid_argument, "block ", b,
                     " is not in use: only held blocks can be published");
    }
    index_.reserve(index_.size() + blocks.size());  // may throw; nothing changed yet
    std::int32_t added = 0;
    std::uint64_t prev_hash = 0, prev_serial = 0;
    for (std::size_t i = 0; i < blocks.size(); ++i) {
      const auto blk = tokens.subspan(i * std::size_t(page_size), std::size_t(page_size));
      const std::uint64_t h = hash_(prev_hash, blk, salt);
      const block_id b = blocks[i];
      block_id same = find(h, salt, prev_serial, blk);
      if (same < 0 && info_[std::size_t(b)].serial == 0) {
        insert(b, h, salt, prev_serial, blk);
        same = b;
        ++added;
      }
      if (same < 0) break;  // b is indexed under another identity: the chain cannot continue here
      prev_hash = h;
      prev_serial = info_[std::size_t(same)].serial;
    }
    return added;
  }

  // b (held, not shared) is about to be written in place: its indexed identity no longer holds.
  void on_write(block_id b) noexcept {
    if (in_pool(b) && info_[std::size_t(b)].serial != 0 && !lru_.contains(b)) erase(b);
  }

  // Throws errc::internal naming the first broken invariant of the index and the LRU.
  void check_invariants() const {
    std::int32_t indexed = 0;
    for (block_id b = 0; b < capacity(); ++b) {
      const auto& in = info_[std::size_t(b)];
      if (lru_.contains(b))
        KVTILE_REQUIRE(in.serial != 0 && !inner_.is_free(b), errc::internal, "cached block ", b,
                       " is not indexed or is on the free list");
      if (in.serial == 0) continue;
      ++indexed;
      KVTILE_REQUIRE(!inner_.is_free(b), errc::internal, "indexed block ", b, " is on the free list");
      const auto it = index_.find(in.hash);
      bool found = false;
      for (block_id c = it == index_.end() ? -1 : it->second; c >= 0; c = info_[std::size_t(c)].next) found |= c == b;
      KVTILE_REQUIRE(found, errc::internal, "indexed block ", b, " is not reachable from its hash");
    }
    KVTILE_REQUIRE(indexed == indexed_, errc::internal, indexed, " indexed blocks, counted ", indexed_);
    KVTILE_REQUIRE(inner_.num_free() + lru_.size() <= capacity(), errc::internal, "unused ", inner_.num_free(),
                   " + cached ", lru_.size(), " exceed the pool ", capacity());
  }

 private:
  struct block_info {
    std::uint64_t hash = 0;
    std::uint64_t salt = 0;
    std::uint64_t serial = 0;         // 0: not indexed
    std::uint64_t parent_serial = 0;  // 0: first block of a prompt
    block_id next = -1;               // next block with the same hash (collisions)
  };

  bool in_pool(block_id b) const { return b >= 0 && b < capacity(); }
  void bump_high_water() {
    high_water_ = std::max(high_water_, capacity() - num_free());
  }

  block_id take_one() {
    block_id b;
    if (inner_.num_free() > 0) {
      b = inner_.allocate();
    } else {  // reclaim the least recently used cached block
      b = lru_.pop_front();
      erase(b);
      ++reclaimed_;
    }
    bump_high_water();
    return b;
  }

  block_id find(std::uint64_t h, std::uint64_t salt, std::uint64_t parent_serial,
                std::span<const token_id> blk) const {
    const auto it = index_.find(h);
    if (it == index_.end()) return -1;
    for (block_id c = it->second; c >= 0; c = info_[std::size_t(c)].next) {
      const auto& in = info_[std::size_t(c)];
      if (in.hash == h && in.salt == salt && in.parent_serial == parent_serial &&
          std::equal(blk.begin(), blk.end(), tokens_[std::size_t(c)].begin(), tokens_[std::size_t(c)].end()))
        return c;
    }
    return -1;
  }

  void insert(block_id b, std::uint64_t h, std::uint64_t salt, std::uint64_t parent_serial,
              std::span<const token_id> blk) {
    auto& in = info_[std::size_t(b)];
    tokens_[std::size_t(b)].assign(blk.begin(), blk.end());
    auto [it, fresh] = index_.try_emplace(h, b);
    in = {h, salt, ++next_serial_, parent_serial, fresh ? block_id(-1) : it->second};
    it->second = b;
    ++indexed_;
  }

  // Drop b's index entry; O(1) but for the (rare) blocks sharing its hash.
  void erase(block_id b) noexcept {
    auto& in = info_[std::size_t(b)];
    const auto it = index_.find(in.hash);
    if (it->second == b) {
      if (in.next < 0) index_.erase(it);
      else it->second = in.next;
    } else {
      block_id c = it->second;
      while (info_[std::size_t(c)].next != b) c = info_[std::size_t(c)].next;
      info_[std::size_t(c)].next = in.next;
    }
    in = block_info{};
    --indexed_;
  }

  Inner inner_;  // the unused blocks
  lru_list lru_;
  std::vector<block_info> info_;                        // [capacity]
  std::vector<std::vector<token_id>> tokens_;           // [capacity][page_size] tokens of indexed blocks
  std::unordered_map<std::uint64_t, block_id> index_;   // hash -> newest block with it
  [[no_unique_address]] Hash hash_;
  std::uint64_t next_serial_ = 0;
  std::int64_t reclaimed_ = 0;
  std::int32_t indexed_ = 0;
  std::int32_t high_water_ = 0;
};

static_assert(memory::block_allocator<prefix_caching_allocator<>>,
              "prefix_caching_allocator must satisfy block_allocator");

// Share the longest cached prefix of `tokens` (whole blocks, at most tokens.size() - 1 tokens,
// so the last prompt token is always computed: its logits start decoding) into the empty
// sequence `id`. Returns the number of tokens reused (a multiple of the page size).
template <class Manager>
std::int64_t admit_prefix(Manager& m, std::uint64_t id, std::span<const token_id> tokens, std::uint64_t salt = 0) {
  KVTILE_REQUIRE(m.num_tokens(id) == 0, errc::invalid_argument, "admit_prefix into sequence ", id, " which holds ",
                 m.num_tokens(id), " tokens: admit into a new sequence");
  const std::int64_t usable = tokens.empty() ? 0 : (std::int64_t(tokens.size()) - 1) / m.page_size();
  const prefix_match hit = m.allocator().match(tokens, m.page_size(), salt, usable);
  m.attach(id, hit.blocks);
  return std::int64_t(hit.blocks.size()) * m.page_size();
}

// Index the full blocks of sequence `id` holding tokens[0, ...): call once their K/V are
// written. tokens are the sequence's first tokens (its prompt, or prompt + generated ones).
// Returns how many blocks were newly indexed.
template <class Manager>
std::int32_t publish_prefix(Manager& m, std::uint64_t id, std::span<const token_id> tokens, std::uint64_t salt = 0) {
  const auto& t = m.table(id);
  KVTILE_REQUIRE(std::int64_t(tokens.size()) <= t.num_tokens(), errc::invalid_argument, "publish of ", tokens.size(),
                 " tokens for sequence ", id, " which holds ", t.num_tokens());
  // After an eviction the table's blocks no longer hold tokens[0, ...) in order (and later
  // blocks' K/V were computed without the evicted text): naming them would hand out wrong K/V.
  if constexpr (requires { m.dropped_tokens(id); })
    KVTILE_REQUIRE(m.dropped_tokens(id) == 0, errc::invalid_argument, "publish of sequence ", id, " after ",
                   m.dropped_tokens(id), " of its tokens were evicted: publish before evicting");
  const std::int64_t full = std::int64_t(tokens.size()) / m.page_size();
  return m.allocator().publish(t.blocks().first(std::size_t(full)), tokens, m.page_size(), salt);
}

}  // namespace caching
KVTILE_NAMESPACE_END
