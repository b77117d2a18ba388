#include <doctest/doctest.h>

#include <random>
#include <string>
#include <vector>

#include "kvtile/caching/prefix_cache.hpp"
#include "kvtile/caching/sink_window_eviction.hpp"
#include "kvtile/kv_cache.hpp"
#include "support/test_util.hpp"

using namespace kvtile;

namespace {
constexpr std::int32_t page = 4;
using cache_t = paged_kv_cache<float>;

// K of a token = its text position: after any evictions the cache must hold exactly the sink
// tokens and then every token from some point on, and that point must leave >= window tokens.
void check_kept(const cache_t& c, sequence_id id, const caching::sink_window_eviction& ev, std::int64_t text_len) {
  const auto& t = c.table(id);
  const auto pool = c.layer(0);
  const std::int64_t kept = t.num_tokens();
  const std::int64_t sink_tokens = std::min<std::int64_t>(text_len, std::int64_t(ev.sink_blocks()) * page);
  const std::int64_t evicted = text_len - kept;
  CHECK(evicted % page == 0);
  CHECK(t.num_blocks() <= ev.max_blocks());
  CHECK(kept - sink_tokens >= std::min(ev.window(), text_len - sink_tokens));  // the window is whole
  for (std::int64_t i = 0; i < kept; ++i) {
    const std::int64_t text_pos = i < sink_tokens ? i : i + evicted;
    CHECK(*pool.k_at(t.block(std::int32_t(i / page)), std::int32_t(i % page), 0) == float(text_pos));
  }
}
}  // namespace

TEST_CASE("sinks + window: a sequence streams in bounded memory, keeping exactly the right tokens") {
  const std::uint64_t seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (auto [sinks, window] : {std::pair<std::int64_t, std::int64_t>{4, 8}, {1, 13}, {0, 5}, {9, 4}}) {
    CAPTURE(sinks);
    CAPTURE(window);
    cache_t c(memory::kv_shape{1, 16, page, 1, 1});
    const caching::sink_window_eviction ev(sinks, window, page, 16);
    const auto id = c.create();
    std::int64_t text = 0, evicted = 0;
    for (int step = 0; step < 300; ++step) {
      const std::int64_t n = 1 + std::int64_t(rng() % 3);  // decode 1 or a few tokens at a time
      const auto slots = c.append(id, n);
      for (std::int64_t i = 0; i < n; ++i) {
        const float k = float(text + i), v = 0;
        c.write(0, &k, &v, 1, &slots[std::size_t(i)], 1);
      }
      text += n;
      evicted += ev.evict(c.blocks(), id);
      CHECK(text - evicted == c.num_tokens(id));
      check_kept(c, id, ev, text);
      c.check_invariants();
    }
    CHECK(c.stats().used <= ev.max_blocks());
    CHECK(c.stats().high_water <= ev.max_blocks() + 1);  // + the block an append adds before evict
  }
}

TEST_CASE("eviction composes with forks and with the prefix cache") {
  using pc_cache = cache_t::with_allocator<caching::prefix_caching_allocator<>>;
  pc_cache c(memory::kv_shape{1, 32, page, 1, 1});
  const caching::sink_window_eviction ev(4, 8, page, 32);
  std::vector<caching::token_id> prompt;
  for (int i = 0; i < 24; ++i) prompt.push_back(i);
  const auto a = c.create();
  c.append(a, 24);
  caching::publish_prefix(c.blocks(), a, prompt);  // 6 indexed blocks
  const auto f = c.fork(a);
  CHECK(ev.evict(c.blocks(), a) == 12);  // blocks 1..3 of a go; the fork still holds them
  for (std::int32_t i = 1; i <= 3; ++i) CHECK(c.blocks().refcount(c.table(f).block(i)) == 1);
  c.free(f);  // now blocks 1..3 are held by no one: indexed, so cached
  CHECK(c.blocks().allocator().num_cached() == 3);
  c.check_invariants();
  const auto s = c.blocks().allocator().cache_stats();
  CHECK(s.unused + s.cached + s.in_use == 32);
  // A new request with the same prompt hits the whole prefix again (a's sink block, the cached
  // middle and a's window blocks).
  const auto b = c.create();
  CHECK(caching::admit_prefix(c.blocks(), b, prompt) == 20);
  // a's table now skips tokens 4..15: publishing it again would name the wrong blocks
  const auto named = c.blocks().allocator().num_indexed();
  try {
    caching::publish_prefix(c.blocks(), a, std::span(prompt).first(12));
    FAIL("publish after eviction must throw");
  } catch (const kvtile::error& e) {
    CHECK(std::string(e.what()).find("after 12 of its tokens were evicted") != std::string::npos);
  }
  CHECK(c.blocks().allocator().num_indexed() == named);
  CHECK(c.blocks().dropped_tokens(a) == 12);
}

TEST_CASE("eviction bad input: sinks + window larger than the pool, bad ranges, unknown ids") {
  auto expect = [](errc code, const std::string& text, auto&& f) {
    kvtile_test::expect_error(code, text, f);
  };
  expect(errc::invalid_argument, "sinks 8 + window 64 tokens need up to 19 blocks of 4 tokens; the pool has 16",
         [] { caching::sink_window_eviction(8, 64, page, 16); });
  expect(errc::invalid_argument, "window must be positive, got 0", [] { caching::sink_window_eviction(4, 0, page, 16); });
  expect(errc::invalid_argument, "sinks must be >= 0, got -1", [] { caching::sink_window_eviction(-1, 4, page, 16); });
  cache_t c(memory::kv_shape{1, 16, page, 1, 1});
  const auto id = c.create();
  c.append(id, 20);
  const auto before = std::vector<memory::block_id>(c.table(id).blocks().begin(), c.table(id).blocks().end());
  const caching::sink_window_eviction ev(4, 4, page, 16);
  expect(errc::unknown_sequence, "sequence 777", [&] { ev.evict(c.blocks(), 777); });
  expect(errc::out_of_range, "drop of blocks [2, 5)", [&] { c.drop_blocks(id, 2, 3); });
  expect(errc::invalid_argument, "page_size 8", [&] {
    const caching::sink_window_eviction other(8, 8, 8, 16);
    other.evict(c.blocks(), id);
  });
  CHECK(std::vector<memory::block_id>(c.table(id).blocks().begin(), c.table(id).blocks().end()) == before);
  CHECK(c.num_tokens(id) == 20);
  c.check_invariants();
}
