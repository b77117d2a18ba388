#include <doctest/doctest.h>

#include <random>
#include <string>
#include <vector>

#include "kvtile/kv_cache.hpp"
#include "kvtile/schedule/beam_search.hpp"
#include "support/test_util.hpp"

using namespace kvtile;
using cache_t = paged_kv_cache<float>;
constexpr std::int32_t page = 4;

namespace {
// K of a token = its id: each beam's cache must read back the prompt followed by its own tokens.
void write_token(cache_t& c, std::int64_t slot, std::int32_t tok) {
  const float k = float(tok), v = 0;
  c.write(0, &k, &v, 1, &slot, 1);
}
void check_beam(const cache_t& c, std::uint64_t seq, const std::vector<std::int32_t>& prompt,
                const std::vector<std::int32_t>& generated) {
  const auto& t = c.table(seq);
  REQUIRE(t.num_tokens() == std::int64_t(prompt.size() + generated.size()));
  for (std::int64_t i = 0; i < t.num_tokens(); ++i) {
    const auto want = i < std::int64_t(prompt.size()) ? prompt[std::size_t(i)] : generated[std::size_t(i) - prompt.size()];
    CHECK(*c.layer(0).k_at(t.block(std::int32_t(i / page)), std::int32_t(i % page), 0) == float(want));
  }
}
std::uint64_t make_prompt(cache_t& c, const std::vector<std::int32_t>& prompt) {
  const auto id = c.create();
  const auto slots = c.append(id, std::int64_t(prompt.size()));
  for (std::size_t i = 0; i < prompt.size(); ++i) write_token(c, slots[i], prompt[i]);
  return id;
}
}  // namespace

TEST_CASE("parallel samples share the prompt's blocks") {
  cache_t c(memory::kv_shape{1, 64, page, 1, 1});
  const auto p = make_prompt(c, {1, 2, 3, 4, 5, 6, 7, 8, 9, 10});
  const auto ids = schedule::fork_samples(c, p, 4);
  CHECK(ids.size() == 4);
  CHECK(ids[0] == p);
  CHECK(c.stats().used == 3);
  for (auto b : c.table(p).blocks()) CHECK(c.blocks().refcount(b) == 4);
  c.check_invariants();
}

TEST_CASE("beam search: top-k kept, pruned beams freed, survivors forked, one batch of copies per step") {
  const std::uint64_t seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  cache_t c(memory::kv_shape{1, 256, page, 1, 1});
  const std::vector<std::int32_t> prompt{1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
  const auto p = make_prompt(c, prompt);
  constexpr std::int32_t width = 4;
  schedule::beam_search<cache_t> beams(c, p, width);
  std::uniform_real_distribution<double> u(-3, 0);
  for (int step = 0; step < 40; ++step) {
    // every beam proposes 3 tokens
    std::vector<schedule::beam_candidate> cands;
    for (std::int32_t b = 0; b < beams.size(); ++b)
      for (std::int32_t k = 0; k < 3; ++k) cands.push_back({b, 100 + step * 10 + k, beams.score(b) + u(rng)});
    std::vector<double> scores;
    for (const auto& x : cands) scores.push_back(x.score);
    std::sort(scores.rbegin(), scores.rend());
    const auto slots = beams.step(cands);
    CHECK(beams.size() == std::min<std::int32_t>(width, std::int32_t(cands.size())));
    for (std::int32_t b = 0; b < beams.size(); ++b) {
      CHECK(beams.score(b) == scores[std::size_t(b)]);  // the best, best first
      write_token(c, slots[std::size_t(b)], beams.tokens(b).back());
    }
    CHECK(c.pending_copies().empty());  // ran in the step, one batch
    c.check_invariants();
    // Sharing: only the beams' own blocks are allocated (no leak of pruned beams).
    CHECK(c.stats().used <= beams.blocks_without_sharing());
    for (std::int32_t b = 0; b < beams.size(); ++b) check_beam(c, beams.sequence(b), prompt, beams.tokens(b));
  }
  // The prompt's full blocks are still shared by every beam.
  CHECK(c.blocks().refcount(c.table(beams.sequence(0)).block(0)) == width);
  const auto best = beams.finish();
  CHECK(c.blocks().num_sequences() == 1);
  CHECK(c.table(best).num_tokens() == 50);
  c.free(best);
  CHECK(c.stats().used == 0);
}

TEST_CASE("beam search bad input: a clear error, nothing changed") {
  cache_t c(memory::kv_shape{1, 8, page, 1, 1});
  const auto p = make_prompt(c, {1, 2, 3, 4, 5, 6});
  auto expect = [&](errc code, const std::string& text, auto&& f) {
    const auto used = c.stats().used;
    const auto seqs = c.blocks().num_sequences();
    kvtile_test::expect_error(code, text, f);
    CHECK(c.stats().used == used);
    CHECK(c.blocks().num_sequences() == seqs);
    c.check_invariants();
  };
  expect(errc::invalid_argument, "beam width must be positive, got 0", [&] { schedule::beam_search<cache_t>(c, p, 0); });
  expect(errc::invalid_argument, "number of samples must be positive, got 0", [&] { schedule::fork_samples(c, p, 0); });
  expect(errc::unknown_sequence, "sequence 4242", [&] { schedule::beam_search<cache_t>(c, 4242, 2); });
  schedule::beam_search<cache_t> beams(c, p, 2);
  expect(errc::out_of_range, "continues beam 3 of 1", [&] {
    const schedule::beam_candidate x[] = {{0, 1, -1.0}, {3, 2, -0.5}};
    beams.step(x);
  });
  expect(errc::invalid_argument, "no candidates", [&] { beams.step({}); });
  // 8 blocks, 2 used; 7 beams from a full 4-token block boundary would need more than are free.
  schedule::beam_search<cache_t> wide(c, p, 64);
  std::vector<schedule::beam_candidate> many;
  for (int i = 0; i < 64; ++i) many.push_back({0, i, -double(i)});
  expect(errc::out_of_blocks, "beam step needs 63 blocks", [&] { wide.step(many); });
  CHECK(beams.size() == 1);
}
