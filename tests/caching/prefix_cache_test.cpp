#include <doctest/doctest.h>

#include <algorithm>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "kvtile/caching/prefix_cache.hpp"
#include "kvtile/kv_cache.hpp"
#include "support/test_util.hpp"

using namespace kvtile;
using caching::token_id;

namespace {

// A hash that sends every block to one bucket: every lookup is a collision the tokens and the
// parent chain must resolve.
struct constant_hash {
  std::uint64_t operator()(std::uint64_t, std::span<const token_id>, std::uint64_t) const noexcept { return 42; }
};

constexpr std::int32_t page = 4;

template <class Hash>
using cache_for = paged_kv_cache<float>::with_allocator<caching::prefix_caching_allocator<memory::lifo_allocator, Hash>>;

// K of a token = its id, V = its position: what a block holds can be checked against the prompt.
template <class Cache>
void write_tokens(Cache& c, sequence_id id, std::span<const std::int64_t> slots, std::span<const token_id> toks,
                  std::int64_t first_pos) {
  std::vector<float> k, v;
  for (std::size_t i = 0; i < toks.size(); ++i) {
    k.push_back(float(toks[i]));
    v.push_back(float(first_pos + std::int64_t(i)));
  }
  c.write(0, k.data(), v.data(), 1, slots.data(), std::int32_t(toks.size()));
  (void)id;
}

// Every token of every live sequence reads back its own id and position.
template <class Cache>
void check_contents(const Cache& c, sequence_id id, const std::vector<token_id>& toks) {
  const auto& t = c.table(id);
  REQUIRE(t.num_tokens() == std::int64_t(toks.size()));
  const auto pool = c.layer(0);
  for (std::int64_t i = 0; i < t.num_tokens(); ++i) {
    const auto blk = t.block(std::int32_t(i / page));
    CHECK(*pool.k_at(blk, std::int32_t(i % page), 0) == float(toks[std::size_t(i)]));
    CHECK(*pool.v_at(blk, std::int32_t(i % page), 0) == float(i));
  }
}

// Admit, append the rest, write its K/V, publish: one request's prefill. Returns tokens reused.
template <class Cache>
std::int64_t prefill(Cache& c, sequence_id id, const std::vector<token_id>& toks, std::uint64_t salt = 0) {
  const std::int64_t reused = caching::admit_prefix(c.blocks(), id, toks, salt);
  const auto slots = c.append(id, std::int64_t(toks.size()) - reused);
  c.run_pending_copies();
  write_tokens(c, id, slots, std::span(toks).subspan(std::size_t(reused)), reused);
  caching::publish_prefix(c.blocks(), id, toks, salt);
  return reused;
}

template <class Cache>
void check_all(const Cache& c) {
  c.check_invariants();
  c.blocks().allocator().check_invariants();
  const auto s = c.blocks().allocator().cache_stats();
  CHECK(s.unused + s.cached + s.in_use == s.capacity);
}

std::vector<token_id> concat(std::vector<token_id> a, const std::vector<token_id>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

}  // namespace

TEST_CASE_TEMPLATE("a shared system prompt is computed once", Hash, caching::chained_block_hash, constant_hash) {
  cache_for<Hash> c(memory::kv_shape{1, 32, page, 1, 1});
  const std::vector<token_id> system{1, 2, 3, 4, 5, 6, 7, 8, 9, 10};  // 2 full blocks + 2 tokens
  const auto a_toks = concat(system, {20, 21, 22});
  const auto b_toks = concat(system, {30, 31});
  const auto a = c.create();
  CHECK(prefill(c, a, a_toks) == 0);
  const auto b = c.create();
  CHECK(prefill(c, b, b_toks) == 8);  // whole blocks only: tokens 8, 9 are in a's partial block
  for (std::int32_t i = 0; i < 2; ++i) {
    CHECK(c.table(a).block(i) == c.table(b).block(i));
    CHECK(c.blocks().refcount(c.table(a).block(i)) == 2);
  }
  CHECK(c.table(a).block(2) != c.table(b).block(2));
  check_contents(c, a, a_toks);
  check_contents(c, b, b_toks);
  check_all(c);

  SUBCASE("a prompt that is entirely cached still computes its last token") {
    const auto d = c.create();
    const std::vector<token_id> exact(a_toks.begin(), a_toks.begin() + 12);  // 3 full blocks, all cached
    CHECK(prefill(c, d, exact) == 8);
    check_contents(c, d, exact);
  }
  SUBCASE("another tenant's salt never hits") {
    const auto d = c.create();
    CHECK(prefill(c, d, a_toks, /*salt=*/7) == 0);
    check_contents(c, d, a_toks);
  }
  SUBCASE("freed blocks stay cached and are hit again") {
    c.free(a);
    c.free(b);
    const auto s = c.blocks().allocator().cache_stats();
    CHECK(s.in_use == 0);
    CHECK(s.cached == 4);  // a's 3 full blocks (13 tokens) and b's third (12 tokens)
    const auto d = c.create();
    CHECK(prefill(c, d, a_toks) == 12);
    check_contents(c, d, a_toks);
    check_all(c);
  }
}

TEST_CASE("a hash collision never hands out another prompt's K/V") {
  cache_for<constant_hash> c(memory::kv_shape{1, 32, page, 1, 1});
  // Same second block, different first block: under a constant hash only the parent chain tells
  // them apart.
  const std::vector<token_id> x{1, 1, 1, 1, 7, 7, 7, 7, 0};
  const std::vector<token_id> y{2, 2, 2, 2, 7, 7, 7, 7, 0};
  const std::vector<token_id> z{1, 1, 1, 1, 8, 8, 8, 8, 0};
  const auto a = c.create();
  prefill(c, a, x);
  const auto b = c.create();
  CHECK(prefill(c, b, y) == 0);
  const auto d = c.create();
  CHECK(prefill(c, d, z) == 4);
  check_contents(c, a, x);
  check_contents(c, b, y);
  check_contents(c, d, z);
  CHECK(c.blocks().allocator().num_indexed() == 5);  // x: 2, y: 2, z: its second block
  check_all(c);
}

TEST_CASE("cached blocks are reclaimed least recently used first, and their index entries go") {
  cache_for<caching::chained_block_hash> c(memory::kv_shape{1, 6, page, 1, 1});
  const std::vector<token_id> p{1, 2, 3, 4, 5, 6, 7, 8, 9};  // 3 blocks
  const std::vector<token_id> q{9, 8, 7, 6, 5, 4, 3, 2, 1};  // 3 blocks
  auto a = c.create();
  prefill(c, a, p);
  c.free(a);  // p's 2 full blocks cached, its partial block free
  a = c.create();
  prefill(c, a, q);
  c.free(a);  // q's 2 full blocks cached after p's
  auto s = c.blocks().allocator().cache_stats();
  CHECK(s.cached == 4);
  CHECK(s.unused == 2);
  // 3 blocks: 2 unused, then one reclaimed: p's last block, freed first (tail blocks go first)
  const auto big = c.create();
  c.append(big, 12);
  s = c.blocks().allocator().cache_stats();
  CHECK(s.reclaimed == 1);
  CHECK(s.cached == 3);
  CHECK(c.blocks().allocator().match(p, page, 0, 2).blocks.size() == 1);
  CHECK(c.blocks().allocator().match(q, page, 0, 2).blocks.size() == 2);
  check_all(c);
  // Now everything: the pool is full, nothing cached; the index is empty.
  c.append(big, 12);
  CHECK(c.blocks().allocator().num_indexed() == 0);
  CHECK(c.blocks().allocator().match(q, page, 0, 2).blocks.empty());
  const auto e = c.create();
  CHECK_THROWS_AS(c.append(e, 1), kvtile::error);
  check_all(c);
}

TEST_CASE("forks of a request that hit the cache copy only their partial block") {
  cache_for<caching::chained_block_hash> c(memory::kv_shape{1, 32, page, 1, 1});
  const std::vector<token_id> sys{1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
  const auto a = c.create();
  prefill(c, a, sys);
  const auto b = c.create();
  const auto b_toks = concat(sys, {11});
  CHECK(prefill(c, b, b_toks) == 8);
  const auto f = c.fork(b);
  auto ft = b_toks;
  ft.push_back(50);
  const auto slots = c.append(f, 1);
  CHECK(c.pending_copies().size() == 1);
  CHECK(c.pending_copies()[0].src == c.table(b).block(2));
  c.run_pending_copies();
  write_tokens(c, f, slots, std::span(ft).subspan(11), 11);
  CHECK(c.blocks().refcount(c.table(a).block(0)) == 3);
  check_contents(c, a, sys);
  check_contents(c, b, b_toks);
  check_contents(c, f, ft);
  check_all(c);
}

TEST_CASE("writing in place into an indexed block drops its index entry") {
  cache_for<caching::chained_block_hash> c(memory::kv_shape{1, 8, page, 1, 1});
  const std::vector<token_id> p{1, 2, 3, 4, 5, 6, 7, 8, 9};
  const auto a = c.create();
  prefill(c, a, p);
  CHECK(c.blocks().allocator().num_indexed() == 2);
  c.truncate(a, 6);  // block 1 is now partial and held by a alone
  c.append(a, 1);
  CHECK(c.blocks().allocator().num_indexed() == 1);
  CHECK(c.blocks().allocator().match(p, page, 0, 2).blocks.size() == 1);
  check_all(c);
}

TEST_CASE("prefix cache bad input: a clear error and nothing changed") {
  cache_for<caching::chained_block_hash> c(memory::kv_shape{1, 8, page, 1, 1});
  const std::vector<token_id> p{1, 2, 3, 4, 5, 6, 7, 8, 9};
  const auto a = c.create();
  prefill(c, a, p);
  const auto held = std::vector<memory::block_id>(c.table(a).blocks().begin(), c.table(a).blocks().end());
  auto expect = [&](errc code, const std::string& text, auto&& f) {
    const auto before = c.blocks().allocator().cache_stats();
    const auto len = c.num_tokens(a);
    kvtile_test::expect_error(code, text, f);
    const auto after = c.blocks().allocator().cache_stats();
    CHECK(after.cached == before.cached);
    CHECK(after.in_use == before.in_use);
    CHECK(after.indexed == before.indexed);
    CHECK(c.num_tokens(a) == len);
    check_all(c);
  };
  const auto b = c.create();
  expect(errc::unknown_sequence, "sequence 12345", [&] { caching::admit_prefix(c.blocks(), 12345, p); });
  expect(errc::invalid_argument, "holds 9 tokens", [&] { caching::admit_prefix(c.blocks(), a, p); });
  expect(errc::invalid_argument, "partly filled", [&] { c.attach(a, std::span(held).first(1)); });
  expect(errc::invalid_argument, "block 7: it is free", [&] { c.attach(b, std::vector<memory::block_id>{7}); });
  expect(errc::out_of_range, "block id 99", [&] { c.attach(b, std::vector<memory::block_id>{99}); });
  expect(errc::invalid_argument, "twice", [&] { c.attach(b, std::vector<memory::block_id>{held[0], held[0]}); });
  expect(errc::invalid_argument, "publish of 10 tokens", [&] {
    caching::publish_prefix(c.blocks(), a, concat(p, {1}));
  });
  CHECK(c.num_tokens(b) == 0);
}

// ---- a randomized run against a reference model --------------------------------------------

namespace {
// The reference: blocks as nodes with holder counts, the index as a map from the whole prefix
// (every token up to the block's end) to its node, the LRU as release stamps. Deliberately
// simple (linear scans) and independent of the allocator's data structures.
struct model {
  struct node {
    std::int64_t refs = 0;
    bool indexed = false;
    bool cached = false;
    std::int64_t stamp = 0;
    std::vector<token_id> key;
  };
  struct seq {
    std::vector<token_id> toks;
    std::vector<std::size_t> nodes;
  };
  std::int32_t capacity;
  std::int32_t unused;
  std::vector<node> nodes;
  std::map<std::vector<token_id>, std::size_t> index;
  std::int64_t clock = 0;

  explicit model(std::int32_t cap) : capacity(cap), unused(cap) {}

  std::int32_t cached() const {
    return std::int32_t(std::count_if(nodes.begin(), nodes.end(), [](const node& n) { return n.cached; }));
  }
  std::int32_t available() const { return unused + cached(); }
  std::size_t allocate() {
    if (unused > 0) {
      --unused;
    } else {  // reclaim the oldest cached node
      std::size_t victim = nodes.size();
      for (std::size_t i = 0; i < nodes.size(); ++i)
        if (nodes[i].cached && (victim == nodes.size() || nodes[i].stamp < nodes[victim].stamp)) victim = i;
      REQUIRE(victim < nodes.size());
      // If the index still names it, its prefix and every longer one (chained through it) leave
      // the index. If not (an ancestor was reclaimed before, and the same text may have been
      // published again since through other nodes), nothing leaves: those entries are not its.
      const auto& k = nodes[victim].key;
      const auto own = index.find(k);
      if (own != index.end() && own->second == victim) {
        for (auto it = index.begin(); it != index.end();) {
          if (it->first.size() >= k.size() && std::equal(k.begin(), k.end(), it->first.begin())) it = index.erase(it);
          else ++it;
        }
      }
      nodes[victim] = node{};
      nodes[victim].refs = -1;  // retired model node
    }
    nodes.push_back(node{1});
    return nodes.size() - 1;
  }
  void release(std::size_t n) {
    if (--nodes[n].refs > 0) return;
    if (nodes[n].indexed) {
      nodes[n].cached = true;
      nodes[n].stamp = ++clock;
    } else {
      ++unused;
    }
  }
  // Tokens reused by an admit, or -1 when the append must fail (out of blocks).
  std::int64_t admit(seq& s, const std::vector<token_id>& toks) {
    const std::int64_t usable = (std::int64_t(toks.size()) - 1) / page;
    std::vector<std::size_t> hits;
    for (std::int64_t i = 0; i < usable; ++i) {
      const auto it = index.find(std::vector<token_id>(toks.begin(), toks.begin() + (i + 1) * page));
      if (it == index.end()) break;
      hits.push_back(it->second);
    }
    for (auto n : hits) {
      if (nodes[n].cached) nodes[n].cached = false;
      ++nodes[n].refs;
      s.nodes.push_back(n);
    }
    const std::int64_t reused = std::int64_t(hits.size()) * page;
    s.toks.assign(toks.begin(), toks.begin() + reused);
    if (!append(s, std::vector<token_id>(toks.begin() + reused, toks.end()))) return -1;
    return reused;
  }
  bool append(seq& s, const std::vector<token_id>& more) {
    const std::int64_t len = std::int64_t(s.toks.size()), n = std::int64_t(more.size());
    const std::int64_t new_blocks = (len + n + page - 1) / page - std::int64_t(s.nodes.size());
    const bool cow = n > 0 && len % page != 0 && nodes[s.nodes.back()].refs > 1;
    if (new_blocks + cow > available()) return false;
    if (cow) {
      const auto dst = allocate();
      --nodes[s.nodes.back()].refs;
      s.nodes.back() = dst;
    }
    for (std::int64_t i = 0; i < new_blocks; ++i) s.nodes.push_back(allocate());
    s.toks.insert(s.toks.end(), more.begin(), more.end());
    return true;
  }
  void publish(const seq& s) {
    for (std::size_t i = 0; i < s.toks.size() / page; ++i) {
      std::vector<token_id> key(s.toks.begin(), s.toks.begin() + std::int64_t(i + 1) * page);
      if (index.count(key)) continue;
      auto& nd = nodes[s.nodes[i]];
      if (nd.indexed) break;
      nd.indexed = true;
      nd.key = key;
      index[key] = s.nodes[i];
    }
  }
  void free(seq& s) {
    for (std::size_t i = s.nodes.size(); i-- > 0;) release(s.nodes[i]);
    s = {};
  }
  seq fork(const seq& s) {
    for (auto n : s.nodes) ++nodes[n].refs;
    return s;
  }
};

// 1,500 random requests, decode steps, forks and finishes against the model.
template <class Hash>
void run_against_model(std::uint64_t seed) {
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  constexpr std::int32_t blocks = 40;
  cache_for<Hash> c(memory::kv_shape{1, blocks, page, 1, 1});
  model ref(blocks);
  std::vector<std::pair<sequence_id, model::seq>> live;
  // A few system prompts, and a small alphabet so equal blocks under different prefixes occur.
  std::vector<std::vector<token_id>> systems;
  for (int s = 0; s < 3; ++s) {
    std::vector<token_id> t;
    for (int i = 0; i < 5 + 4 * s; ++i) t.push_back(token_id(rng() % 3));
    systems.push_back(t);
  }
  std::int64_t hits = 0;
  for (int step = 0; step < 1500; ++step) {
    const auto op = rng() % 10;
    if (op < 4 || live.empty()) {  // a new request: system prompt (or a previous request's text) + a question
      std::vector<token_id> toks;
      if (!live.empty() && rng() % 3 == 0) toks = live[rng() % live.size()].second.toks;  // multi-turn
      else toks = systems[rng() % systems.size()];
      for (auto n = rng() % 7; n-- > 0;) toks.push_back(token_id(rng() % 3));
      if (toks.empty()) toks.push_back(1);
      const auto id = c.create();
      model::seq ms;
      const std::int64_t want = ref.admit(ms, toks);
      if (want < 0) {
        const std::int64_t reused = caching::admit_prefix(c.blocks(), id, toks);
        CHECK_THROWS_AS(c.append(id, std::int64_t(toks.size()) - reused), kvtile::error);
        c.free(id);
        ms.toks.resize(std::size_t(reused));  // the model's admit gave up after its hits
        ms.nodes.resize(std::size_t(reused / page));
        ref.free(ms);
      } else {
        CHECK(prefill(c, id, toks) == want);
        hits += want;
        ref.publish(ms);
        live.emplace_back(id, ms);
      }
    } else if (op < 7) {  // a decode step
      auto& [id, ms] = live[rng() % live.size()];
      const token_id t = token_id(rng() % 3);
      const bool fits = ref.append(ms, {t});
      if (fits) {
        const auto slots = c.append(id, 1);
        c.run_pending_copies();
        write_tokens(c, id, slots, std::span(&t, 1), std::int64_t(ms.toks.size()) - 1);
        if (rng() % 4 == 0) {
          caching::publish_prefix(c.blocks(), id, ms.toks);
          ref.publish(ms);
        }
      } else {
        CHECK_THROWS_AS(c.append(id, 1), kvtile::error);
      }
    } else if (op < 8) {  // fork (parallel sampling)
      const auto& [id, ms] = live[rng() % live.size()];
      const auto f = c.fork(id);
      auto fm = ref.fork(ms);
      live.emplace_back(f, std::move(fm));
    } else {  // a request finishes
      const auto i = rng() % live.size();
      c.free(live[i].first);
      ref.free(live[i].second);
      live.erase(live.begin() + std::ptrdiff_t(i));
    }
    const auto s = c.blocks().allocator().cache_stats();
    REQUIRE(s.unused == ref.unused);
    REQUIRE(s.cached == ref.cached());
    REQUIRE(s.unused + s.cached + s.in_use == blocks);
    if (step % 50 == 0) {
      check_all(c);
      for (const auto& [id, ms] : live) check_contents(c, id, ms.toks);
    }
  }
  for (const auto& [id, ms] : live) check_contents(c, id, ms.toks);
  check_all(c);
  CHECK(hits > 0);
  CHECK(c.blocks().allocator().cache_stats().reclaimed > 0);
}
}  // namespace

TEST_CASE_TEMPLATE("randomized: free + cached + in use = the pool; hits match a reference model", Hash,
                   caching::chained_block_hash, constant_hash) {
  run_against_model<Hash>(kvtile_test::fresh_seed());
  // A run in which a block whose ancestor had been reclaimed (so the index no longer named it)
  // was itself reclaimed after the same text had been published again through other blocks:
  // the new entries must stay.
  run_against_model<Hash>(11436968809551411891ull);
}
