#include <doctest/doctest.h>

#include <algorithm>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "kvtile/kv_cache.hpp"
#include "kvtile/memory/lowest_id_allocator.hpp"
#include "support/test_util.hpp"

using namespace kvtile;

namespace {

// Everything observable about a block manager's state, for "an error changed nothing" checks.
template <class Manager>
struct state {
  std::vector<sequence_id> ids;
  std::vector<std::vector<memory::block_id>> tables;
  std::vector<std::int64_t> lengths;
  std::vector<std::int64_t> refcounts;
  std::vector<memory::block_copy> pending;
  memory::allocator_stats stats;

  explicit state(const Manager& m) : ids(m.sequences()), pending(m.pending_copies().begin(), m.pending_copies().end()), stats(m.stats()) {
    for (auto id : ids) {
      const auto blocks = m.table(id).blocks();
      tables.emplace_back(blocks.begin(), blocks.end());
      lengths.push_back(m.num_tokens(id));
    }
    for (memory::block_id b = 0; b < m.num_blocks(); ++b) refcounts.push_back(m.refcount(b));
  }
  bool operator==(const state& o) const {
    return ids == o.ids && tables == o.tables && lengths == o.lengths && refcounts == o.refcounts &&
           pending == o.pending && stats.free == o.stats.free && stats.used == o.stats.used &&
           stats.high_water == o.stats.high_water;
  }
};

// Run f, which must throw kvtile::error with `code` and a message containing `text`, and check
// that the manager's state did not change.
template <class Manager, class F>
void expect_error_unchanged(const Manager& m, errc code, const std::string& text, F&& f) {
  const state<Manager> before(m);
  kvtile_test::expect_error(code, text, f);
  CHECK(state<Manager>(m) == before);
  m.check_invariants();
}

}  // namespace

TEST_CASE("vLLM block-manager semantics") {
  using cache_t = paged_kv_cache<float>;
  cache_t c(memory::kv_shape{2, 32, 4, 2, 4});
  auto& m = c.blocks();
  const auto a = c.create();
  const auto slots = c.append(a, 10);  // 3 blocks, last holds 2 tokens
  CHECK(slots.size() == 10);
  CHECK(c.table(a).num_blocks() == 3);
  CHECK(c.stats().used == 3);
  for (std::int64_t t = 0; t < 10; ++t) CHECK(slots[std::size_t(t)] == c.table(a).slot(t));

  SUBCASE("a fork allocates nothing and shares every block") {
    const auto b = c.fork(a);
    CHECK(c.stats().used == 3);
    for (auto blk : c.table(a).blocks()) CHECK(m.refcount(blk) == 2);
    CHECK(c.table(b).num_tokens() == 10);
    c.check_invariants();
  }
  SUBCASE("fork + append into a partial last block: exactly one copy, of the filled slots") {
    const auto b = c.fork(a);
    const auto last = c.table(a).last_block();
    const auto s = c.append(b, 1);
    REQUIRE(c.pending_copies().size() == 1);
    const auto cp = c.pending_copies()[0];
    CHECK(cp.src == last);
    CHECK(cp.num_tokens == 2);
    CHECK(cp.dst == c.table(b).last_block());
    CHECK(s[0] == std::int64_t(cp.dst) * 4 + 2);
    CHECK(c.stats().used == 4);
    c.check_invariants();
    // The original now holds its last block alone: it appends in place, no second copy.
    c.append(a, 1);
    CHECK(c.pending_copies().size() == 1);
    CHECK(c.table(a).last_block() == last);
    c.run_pending_copies();
    CHECK(c.pending_copies().empty());
    c.check_invariants();
  }
  SUBCASE("fork + append after a full last block: no copy") {
    c.append(a, 2);  // 12 tokens: 3 full blocks
    const auto b = c.fork(a);
    c.append(b, 3);
    CHECK(c.pending_copies().empty());
    CHECK(c.stats().used == 4);
    c.check_invariants();
  }
  SUBCASE("freeing the original leaves the fork intact; freeing everything returns the pool") {
    const auto b = c.fork(a);
    const std::vector<memory::block_id> blocks(c.table(b).blocks().begin(), c.table(b).blocks().end());
    c.free(a);
    CHECK(c.stats().used == 3);
    CHECK(std::equal(blocks.begin(), blocks.end(), c.table(b).blocks().begin()));
    for (auto blk : blocks) CHECK(m.refcount(blk) == 1);
    c.append(b, 5);  // its own blocks now: in place
    CHECK(c.pending_copies().empty());
    c.free(b);
    CHECK(c.stats().free == 32);
    CHECK(c.stats().high_water == 4);
    c.check_invariants();
  }
  SUBCASE("truncate releases whole blocks only") {
    c.truncate(a, 5);
    CHECK(c.table(a).num_blocks() == 2);
    CHECK(c.stats().used == 2);
    c.truncate(a, 0);
    CHECK(c.stats().used == 0);
    c.append(a, 1);
    CHECK(c.stats().used == 1);
    c.check_invariants();
  }
}

TEST_CASE("bad input: an error naming the value, the cache unchanged") {
  paged_kv_cache<float> c(memory::kv_shape{1, 6, 4, 1, 4});
  auto& m = c.blocks();
  const auto a = c.create();
  c.append(a, 9);  // 3 blocks
  const auto b = c.fork(a);
  const auto gone = c.create();
  c.free(gone);

  expect_error_unchanged(m, errc::out_of_blocks, "needs 4 blocks, 3 are free", [&] { c.append(a, 14); });
  expect_error_unchanged(m, errc::unknown_sequence, "sequence 4242: no such sequence", [&] { c.append(4242, 1); });
  const std::string gone_s = std::to_string(gone);
  expect_error_unchanged(m, errc::unknown_sequence, "append to sequence " + gone_s + ": it was freed",
                         [&] { c.append(gone, 1); });
  expect_error_unchanged(m, errc::double_free, "sequence " + gone_s + " is already freed", [&] { c.free(gone); });
  expect_error_unchanged(m, errc::unknown_sequence, "fork sequence " + gone_s + ": it was freed",
                         [&] { c.fork(gone); });
  expect_error_unchanged(m, errc::out_of_range, "to 10 tokens: it has 9", [&] { c.truncate(a, 10); });
  expect_error_unchanged(m, errc::out_of_range, "to -1 tokens", [&] { c.truncate(a, -1); });
  expect_error_unchanged(m, errc::invalid_argument, "cannot append -2 tokens", [&] { c.append(a, -2); });
  std::vector<std::int64_t> small(2);
  expect_error_unchanged(m, errc::invalid_argument, "slot mapping of 2 entries cannot hold 3",
                         [&] { c.append(a, 3, small); });
  const std::vector<sequence_id> ids{a, b};
  expect_error_unchanged(m, errc::invalid_argument, "needs 3 blocks but the padded table has max_blocks 2",
                         [&] { c.to_padded(ids, 2); });
  const std::vector<sequence_id> with_gone{a, gone};
  expect_error_unchanged(m, errc::unknown_sequence, "it was freed", [&] { c.to_csr(with_gone); });

  // Copy-on-write needs a block too: with none free, the append is refused as a whole.
  const auto e = c.fork(b);  // b: 9 tokens, its last block (1 token) now shared with e
  std::vector<sequence_id> fillers;
  while (c.stats().free > 0) {
    fillers.push_back(c.create());
    c.append(fillers.back(), 1);
  }
  expect_error_unchanged(m, errc::out_of_blocks, "needs 1 blocks, 0 are free", [&] { c.append(e, 1); });

  // fork while copies are pending is refused.
  for (auto f : fillers) c.free(f);
  c.append(e, 1);
  REQUIRE(c.pending_copies().size() == 1);
  expect_error_unchanged(m, errc::invalid_argument, "1 block copies are pending", [&] { c.fork(a); });
  c.run_pending_copies();
  c.check_invariants();
}

TEST_CASE("swapping one policy in one line") {
  using base = paged_kv_cache<float>;
  using compact = base::with_allocator<memory::lowest_id_allocator>;
  using plain = base::with_sharing<sharing::no_sharing>::with_layout<kv_layout::hnd>;
  static_assert(std::is_same_v<compact::manager_type::allocator_type, memory::lowest_id_allocator>);
  static_assert(std::is_same_v<plain::manager_type::sharing_type, sharing::no_sharing>);
  static_assert(plain::layout == kv_layout::hnd);
  // No sharing: no reference-count state at all.
  static_assert(sizeof(kv_block_manager<memory::lifo_allocator, sharing::no_sharing>) <
                sizeof(kv_block_manager<memory::lifo_allocator, sharing::copy_on_write>));

  compact c(memory::kv_shape{1, 8, 2, 1, 4});
  const auto a = c.create(), b = c.create();
  c.append(a, 4);  // blocks 0, 1
  c.append(b, 2);  // block 2
  c.truncate(a, 1);  // frees 1
  c.append(b, 1);  // lowest free: 1
  CHECK(c.table(b).block(1) == 1);

  plain p(memory::kv_shape{1, 4, 2, 1, 4});
  const auto x = p.create();
  p.append(x, 7);
  CHECK(p.stats().used == 4);
  CHECK_THROWS_AS(p.append(x, 2), kvtile::error);
  p.free(x);
  CHECK(p.stats().free == 4);
  p.check_invariants();
}

// ---- the randomised model-based test -------------------------------------------------------

namespace {
constexpr std::int32_t kHeads = 2, kDim = 4, kLayers = 2;

std::uint32_t content(std::uint32_t token, std::int32_t layer, std::int32_t kv, std::int32_t h, std::int32_t d) {
  return (token << 8) | std::uint32_t(layer << 5) | std::uint32_t(kv << 4) | std::uint32_t(h << 2) | std::uint32_t(d);
}

template <class Cache>
struct model_run {
  Cache cache;
  std::map<sequence_id, std::vector<std::uint32_t>> model;  // sequence -> token ids, in order
  std::vector<sequence_id> dead;
  std::mt19937_64& rng;
  std::uint32_t next_token = 1;
  struct pending_write {
    sequence_id seq;
    std::int64_t pos;
    std::uint32_t token;
    std::int64_t slot;
  };
  std::vector<pending_write> writes;

  model_run(std::int32_t blocks, std::int32_t page, std::mt19937_64& r)
      : cache(memory::kv_shape{kLayers, blocks, page, kHeads, kDim}), rng(r) {}

  sequence_id pick() {
    auto it = model.begin();
    std::advance(it, std::ptrdiff_t(rng() % model.size()));
    return it->first;
  }

  void append(sequence_id s, std::int64_t n) {
    auto& m = cache.blocks();
    const auto& t = cache.table(s);
    const std::int64_t len = t.num_tokens();
    const bool cow_expected = t.tail_room() > 0 && m.refcount(t.last_block()) > 1;
    const std::int64_t needed = t.blocks_for(len + n) - t.num_blocks() + (cow_expected ? 1 : 0);
    const auto pending_before = cache.pending_copies().size();
    const auto used_before = cache.stats().used;
    if (needed > cache.stats().free) {
      expect_error_unchanged(m, errc::out_of_blocks, "needs " + std::to_string(needed) + " blocks",
                             [&] { cache.append(s, n); });
      return;
    }
    const auto slots = cache.append(s, n);
    REQUIRE(cache.pending_copies().size() == pending_before + (cow_expected ? 1 : 0));
    REQUIRE(cache.stats().used == used_before + needed);
    auto& toks = model[s];
    for (std::int64_t i = 0; i < n; ++i) {
      toks.push_back(next_token);
      writes.push_back({s, len + i, next_token++, slots[std::size_t(i)]});
    }
  }

  // Run the step's copies, then write every appended token that is still live.
  void finish_step() {
    cache.run_pending_copies();
    std::vector<std::uint32_t> k(kHeads * kDim), v(kHeads * kDim);
    for (const auto& w : writes) {
      auto it = model.find(w.seq);
      if (it == model.end() || w.pos >= std::int64_t(it->second.size()) || it->second[std::size_t(w.pos)] != w.token)
        continue;
      REQUIRE(cache.table(w.seq).slot(w.pos) == w.slot);
      for (std::int32_t l = 0; l < kLayers; ++l) {
        for (std::int32_t h = 0; h < kHeads; ++h)
          for (std::int32_t d = 0; d < kDim; ++d) {
            k[std::size_t(h * kDim + d)] = content(w.token, l, 0, h, d);
            v[std::size_t(h * kDim + d)] = content(w.token, l, 1, h, d);
          }
        cache.write(l, k.data(), v.data(), kHeads * kDim, &w.slot, 1);
      }
    }
    writes.clear();
  }

  void check() {
    cache.check_invariants();
    REQUIRE(cache.pending_copies().empty());
    std::vector<sequence_id> ids;
    std::set<memory::block_id> held;
    for (const auto& [id, toks] : model) {
      ids.push_back(id);
      REQUIRE(cache.num_tokens(id) == std::int64_t(toks.size()));
      for (auto b : cache.table(id).blocks()) held.insert(b);
    }
    // With no copy pending, the blocks in use are exactly the blocks some sequence holds.
    REQUIRE(cache.stats().used == std::int32_t(held.size()));
    for (auto d : dead) REQUIRE_FALSE(cache.blocks().contains(d));
    const auto csr = cache.to_csr(ids);
    for (std::int32_t l = 0; l < kLayers; ++l) {
      const auto pk = paging::bind(cache.layer(l), csr);
      for (std::int32_t b = 0; b < std::int32_t(ids.size()); ++b) {
        const auto& toks = model[ids[std::size_t(b)]];
        REQUIRE(pk.kv_len(b) == std::int32_t(toks.size()));
        for (std::int32_t t = 0; t < pk.kv_len(b); ++t)
          for (std::int32_t h = 0; h < kHeads; ++h) {
            const auto off = pk.token_offset(b, t, h);
            for (std::int32_t d = 0; d < kDim; ++d) {
              const auto want_k = content(toks[std::size_t(t)], l, 0, h, d);
              const auto want_v = content(toks[std::size_t(t)], l, 1, h, d);
              if (pk.k_base()[off + d] != want_k || pk.v_base()[off + d] != want_v) {
                FAIL("sequence " << ids[std::size_t(b)] << " token " << t << " layer " << l << " head " << h
                                 << " dim " << d << ": K " << pk.k_base()[off + d] << " (want " << want_k << "), V "
                                 << pk.v_base()[off + d] << " (want " << want_v << ")");
              }
            }
          }
      }
    }
  }

  void step(bool can_fork) {
    const auto r = rng() % 100;
    if (model.empty() || (r < 10 && model.size() < 8)) {
      const auto s = cache.create();
      model[s] = {};
      if (rng() % 2) append(s, 1 + std::int64_t(rng() % 12));
    } else if (r < 45) {
      // A step of several appends (and maybe a truncate or free among them), one copy batch.
      const int ops = 1 + int(rng() % 4);
      for (int i = 0; i < ops && !model.empty(); ++i) {
        const auto s = pick();
        const auto q = rng() % 10;
        if (q < 7) {
          append(s, 1 + std::int64_t(rng() % (rng() % 4 ? 3 : 12)));
        } else if (q < 9) {
          const auto n = std::int64_t(rng() % (model[s].size() + 1));
          cache.truncate(s, n);
          model[s].resize(std::size_t(n));
        } else {
          cache.free(s);
          model.erase(s);
          dead.push_back(s);
        }
      }
    } else if (r < 60 && can_fork) {
      if constexpr (Cache::manager_type::sharing_type::can_fork) {
        const auto s = pick();
        const auto used = cache.stats().used;
        const auto child = cache.fork(s);
        REQUIRE(cache.stats().used == used);  // a fork allocates nothing
        model[child] = model[s];
      }
    } else if (r < 75) {
      const auto s = pick();
      const auto len = std::int64_t(model[s].size());
      if (rng() % 8 == 0) {
        expect_error_unchanged(cache.blocks(), errc::out_of_range, "it has " + std::to_string(len),
                               [&] { cache.truncate(s, len + 1 + std::int64_t(rng() % 3)); });
      } else {
        const auto n = std::int64_t(rng() % (len + 1));
        cache.truncate(s, n);
        model[s].resize(std::size_t(n));
      }
    } else if (r < 88) {
      const auto s = pick();
      cache.free(s);
      model.erase(s);
      dead.push_back(s);
    } else if (r < 94 && !dead.empty()) {
      const auto d = dead[rng() % dead.size()];
      if (rng() % 2)
        expect_error_unchanged(cache.blocks(), errc::double_free, "already freed", [&] { cache.free(d); });
      else
        expect_error_unchanged(cache.blocks(), errc::unknown_sequence, "it was freed", [&] { cache.append(d, 1); });
    } else {
      append(pick(), 1);
    }
    finish_step();
    check();
  }

  void drain() {
    for (const auto& [id, toks] : model) cache.free(id);
    model.clear();
    cache.check_invariants();
    REQUIRE(cache.stats().free == cache.shape().num_blocks);
  }
};

template <class Cache>
void run_model(bool can_fork) {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (int round = 0; round < 3; ++round) {
    const std::int32_t page = 1 + std::int32_t(rng() % 5);
    const std::int32_t blocks = 24 + std::int32_t(rng() % 40);
    INFO("round " << round << " page " << page << " blocks " << blocks);
    model_run<Cache> run(blocks, page, rng);
    for (int i = 0; i < 1500; ++i) {
      INFO("step " << i);
      run.step(can_fork);
    }
    run.drain();
  }
}
}  // namespace

TEST_CASE_TEMPLATE("randomised operations against a reference model, content read back through the page tables",
                   Cache, paged_kv_cache<std::uint32_t>, paged_kv_cache<std::uint32_t, kv_layout::hnd>,
                   paged_kv_cache<std::uint32_t>::with_allocator<memory::lowest_id_allocator>,
                   paged_kv_cache<std::uint32_t, kv_layout::hnd>::with_allocator<memory::lowest_id_allocator>) {
  run_model<Cache>(true);
}

TEST_CASE("randomised operations without sharing") {
  run_model<paged_kv_cache<std::uint32_t>::with_sharing<sharing::no_sharing>>(false);
}
