#include <doctest/doctest.h>

#include <map>
#include <random>
#include <string>
#include <vector>

#include "kvtile/attention/cuda/plan.hpp"
#include "kvtile/caching/prefix_cache.hpp"
#include "kvtile/kv_cache.hpp"
#include "kvtile/schedule/chunked_prefill.hpp"
#include "support/test_util.hpp"

using namespace kvtile;
using manager_t = kv_block_manager<>;
using scheduler_t = schedule::chunked_prefill_scheduler<manager_t>;

namespace {
// What the kernels are told must agree with the cache: q_indptr over the items, the CSR table
// of their sequences, kv_len = cached + new, every new token's slot = the table's slot of the
// last q_len positions, the budget respected, decodes first.
template <class Manager>
void check_batch(const Manager& m, const schedule::step_batch& b, const schedule::scheduler_options& opt) {
  REQUIRE(b.q_indptr.size() == b.items.size() + 1);
  REQUIRE(b.table.batch() == b.batch());
  CHECK(b.num_tokens() == std::int64_t(b.slots.size()));
  CHECK(b.num_tokens() <= std::max<std::int64_t>(opt.token_budget, opt.chunked ? 0 : b.num_tokens()));
  bool seen_prefill = false;
  for (std::int32_t i = 0; i < b.batch(); ++i) {
    const auto& it = b.items[std::size_t(i)];
    CHECK(b.q_indptr[std::size_t(i) + 1] - b.q_indptr[std::size_t(i)] == it.q_len);
    if (it.decode) {
      CHECK(it.q_len == 1);
      CHECK_FALSE(seen_prefill);
    } else {
      seen_prefill = true;
    }
    const auto& t = m.table(it.sequence);
    CHECK(it.kv_len == t.num_tokens());
    CHECK(b.table.indptr[std::size_t(i) + 1] - b.table.indptr[std::size_t(i)] == t.num_blocks());
    CHECK(b.table.last_page_len[std::size_t(i)] == t.last_page_len());
    for (std::int32_t j = 0; j < it.q_len; ++j)
      CHECK(b.slots[std::size_t(b.q_indptr[std::size_t(i)] + j)] == t.slot(it.kv_len - it.q_len + j));
  }
  // The paged kernels' host planner takes the batch as it is (it checks every page id against
  // the pool and q_len <= kv_len).
  if (b.batch() == 0) return;
  const attention::cuda::paged_problem pr{.num_qo_heads = 8, .num_kv_heads = 2, .head_dim = 128,
                                          .page_size = m.page_size(), .pool_blocks = m.num_blocks()};
  const auto plan = attention::cuda::plan_paged_attention<attention::causal_mask>(b.q_indptr.data(), b.table.view(), pr,
                                                                                 {}, attention::cuda::device_limits{});
  REQUIRE(plan.batch == b.batch());
  for (std::int32_t i = 0; i < b.batch(); ++i) {
    CHECK(plan.q_len[std::size_t(i)] == b.items[std::size_t(i)].q_len);
    CHECK(plan.kv_len[std::size_t(i)] == b.items[std::size_t(i)].kv_len);
  }
}
}  // namespace

TEST_CASE("decodes go first; a long prompt is cut into chunks that fill the rest of the budget") {
  manager_t m(256, 16);
  scheduler_t s(m, {.token_budget = 64, .max_running = 8});
  std::vector<schedule::request_id> decoders;
  for (int i = 0; i < 4; ++i) decoders.push_back(s.submit({.prompt_len = 10, .max_new_tokens = 100}));
  auto b = s.step();  // 4 prompts of 10 tokens: 40 tokens, each samples its first token
  check_batch(m, b, s.options());
  CHECK(b.num_tokens() == 40);
  CHECK(b.num_decodes == 0);
  const auto big = s.submit({.prompt_len = 1000, .max_new_tokens = 2});
  std::int64_t prefilled = 0;
  int steps = 0;
  while (s.state(big) != schedule::request_state::decoding) {
    b = s.step();
    check_batch(m, b, s.options());
    CHECK(b.num_decodes == 4);  // no decode ever waits for the prompt
    CHECK(b.num_tokens() == (s.state(big) == schedule::request_state::decoding ? 4 + 1000 % 60 : 64));
    prefilled += b.prefill_tokens;
    ++steps;
    m.check_invariants();
  }
  CHECK(prefilled == 1000);
  CHECK(steps == 17);  // ceil(1000 / 60)
  for (auto d : decoders) CHECK(s.generated(d) == 1 + steps);
}

TEST_CASE("prefill-first stalls every decode while a prompt is prefilled") {
  manager_t m(256, 16);
  scheduler_t s(m, {.token_budget = 64, .max_running = 8, .chunked = false});
  for (int i = 0; i < 4; ++i) s.submit({.prompt_len = 10, .max_new_tokens = 100});
  s.step();
  s.submit({.prompt_len = 1000, .max_new_tokens = 2});
  const auto& b = s.step();
  check_batch(m, b, s.options());
  CHECK(b.num_decodes == 0);
  CHECK(b.prefill_tokens == 1000);  // whole, beyond the budget
  CHECK(s.step().num_decodes == 5);
}

TEST_CASE("a full pool preempts the newest request, which is recomputed later and finishes") {
  // 12 blocks of 4 tokens; 3 requests of 8 prompt tokens growing to 8 + 12 = 20 tokens (5 blocks
  // each) cannot all be resident.
  manager_t m(12, 4);
  scheduler_t s(m, {.token_budget = 32, .max_running = 4});
  std::vector<schedule::request_id> rs;
  for (int i = 0; i < 3; ++i) rs.push_back(s.submit({.prompt_len = 8, .max_new_tokens = 12}));
  std::map<schedule::request_id, int> preempted;
  int steps = 0;
  while (s.has_work()) {
    const auto& b = s.step();
    check_batch(m, b, s.options());
    for (auto r : b.preempted) ++preempted[r];
    m.check_invariants();
    CHECK(m.stats().free + m.stats().used == 12);
    REQUIRE(++steps < 200);
  }
  CHECK(preempted.size() >= 1);
  CHECK(preempted.count(rs[0]) == 0);  // the oldest is never the one preempted
  for (auto r : rs) {
    CHECK(s.state(r) == schedule::request_state::finished);
    CHECK(s.generated(r) == 12);
    CHECK(s.num_preemptions(r) == preempted[r]);
  }
  CHECK(m.num_free_blocks() < 12);  // the last step's requests hold their blocks until retired
  s.retire_finished();
  CHECK(m.num_free_blocks() == 12);
  CHECK(m.num_sequences() == 0);
}

TEST_CASE("admission waits for the whole prompt's blocks plus the watermark") {
  manager_t m(16, 4);
  scheduler_t s(m, {.token_budget = 16, .max_running = 4, .watermark_blocks = 4});
  const auto a = s.submit({.prompt_len = 40, .max_new_tokens = 4});  // 10 blocks, growing to 11
  const auto b = s.submit({.prompt_len = 12, .max_new_tokens = 4});  // 3 blocks: 3 + 4 > 16 - 10
  while (s.state(a) != schedule::request_state::finished) {
    s.step();
    CHECK(s.state(b) == schedule::request_state::waiting);
    CHECK(m.num_free_blocks() >= 16 - 11);
  }
  s.step();  // a's blocks come back first, then b is admitted in the same step
  CHECK(s.state(b) != schedule::request_state::waiting);
}

TEST_CASE("randomized: every request finishes with its tokens; the batch always matches the cache") {
  const std::uint64_t seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (bool chunked : {true, false}) {
    manager_t m(64, 8);
    scheduler_t s(m, {.token_budget = 48, .max_running = 6, .watermark_blocks = 2, .chunked = chunked});
    std::vector<schedule::request_spec> specs;
    std::int64_t step_no = 0;
    while (specs.size() < 60 || s.has_work()) {
      if (specs.size() < 60 && rng() % 3 == 0) {
        specs.push_back({std::int64_t(1 + rng() % 200), std::int64_t(1 + rng() % 60)});
        CHECK(s.submit(specs.back()) == specs.size() - 1);
      }
      const auto& b = s.step();
      check_batch(m, b, s.options());
      m.check_invariants();
      REQUIRE(++step_no < 20000);
    }
    for (std::size_t r = 0; r < specs.size(); ++r) {
      CHECK(s.state(r) == schedule::request_state::finished);
      CHECK(s.generated(r) == specs[r].max_new_tokens);
    }
  }
}

TEST_CASE("scheduler bad input: a clear error naming the value, nothing changed") {
  manager_t m(16, 4);
  auto expect = [](errc code, const std::string& text, auto&& f) {
    kvtile_test::expect_error(code, text, f);
  };
  expect(errc::invalid_argument, "token_budget 7 is smaller than one decode step of max_running = 8",
         [&] { scheduler_t(m, {.token_budget = 7, .max_running = 8}); });
  expect(errc::invalid_argument, "watermark_blocks 16", [&] { scheduler_t(m, {.token_budget = 8, .max_running = 8, .watermark_blocks = 16}); });
  scheduler_t s(m, {.token_budget = 8, .max_running = 2});
  const auto r = s.submit({.prompt_len = 5, .max_new_tokens = 3});
  s.step();
  const auto free_before = m.num_free_blocks();
  expect(errc::unknown_sequence, "request 7", [&] { s.state(7); });
  expect(errc::unknown_sequence, "request 9", [&] { s.abort(9); });
  expect(errc::invalid_argument, "prompt_len must be positive, got 0", [&] { s.submit({.prompt_len = 0}); });
  expect(errc::out_of_blocks, "needs 17 blocks", [&] { s.submit({.prompt_len = 60, .max_new_tokens = 5}); });
  CHECK(m.num_free_blocks() == free_before);
  CHECK(s.num_running() == 1);
  CHECK(s.num_waiting() == 0);
  s.abort(r);
  CHECK(m.num_free_blocks() == 16);
  expect(errc::invalid_argument, "has finished", [&] { s.abort(r); });
  CHECK_FALSE(s.has_work());
}

TEST_CASE("with a prefix-caching allocator, admission shares the cached prefix instead of prefilling it") {
  using pc_manager = kv_block_manager<caching::prefix_caching_allocator<>>;
  pc_manager m(64, 4);
  schedule::chunked_prefill_scheduler<pc_manager> s(m, {.token_budget = 16, .max_running = 4});
  std::vector<caching::token_id> system(30);
  for (int i = 0; i < 30; ++i) system[std::size_t(i)] = i;
  const auto a = s.submit({.prompt_len = 30, .max_new_tokens = 40, .tokens = system});
  while (s.state(a) == schedule::request_state::prefilling || s.state(a) == schedule::request_state::waiting) s.step();
  caching::publish_prefix(m, s.sequence(a), system);  // its K/V are written: 7 full blocks named
  auto other = system;
  other.push_back(99);
  const auto b = s.submit({.prompt_len = 31, .max_new_tokens = 2, .tokens = other});
  const auto& batch = s.step();
  CHECK(batch.prefix_hit_tokens == 28);
  CHECK(batch.prefill_tokens == 3);  // 31 - 28
  check_batch(m, batch, s.options());
  CHECK(m.table(s.sequence(b)).block(0) == m.table(s.sequence(a)).block(0));
  CHECK(s.state(b) == schedule::request_state::decoding);
  m.check_invariants();
}
