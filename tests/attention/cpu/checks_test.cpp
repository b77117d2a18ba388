// Bad input to the CPU kernels: a clear kvtile::error naming the value, thrown before any
// output is written.
#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "attention/cpu/attention_cases.hpp"
#include "kvtile/attention/cpu/backward.hpp"

using namespace kvtile_test;
namespace cpu = kvtile::attention::cpu;

namespace {

using tile = tile_shape<32, 64>;

// Runs f, expects a kvtile::error whose message contains `needle`, and checks `out` is untouched.
template <class F>
void expect_error(F&& f, const std::string& needle, const std::vector<float>& out) {
  INFO("expected an error mentioning '" << needle << "'");
  bool thrown = false;
  try {
    f();
  } catch (const kvtile::error& e) {
    thrown = true;
    INFO("message: " << e.what());
    CHECK(std::string(e.what()).find(needle) != std::string::npos);
  }
  CHECK(thrown);
  int written = 0;
  for (float x : out) written += !std::isnan(x);
  CHECK(written == 0);
}

}  // namespace

TEST_CASE("cpu forward: bad shapes and lengths are rejected before any work") {
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  auto p = make_problem<float>(rng, {10, 4}, {20, 30}, 6, 2, 64);
  std::vector<float> o(p.q_elems(), poison<float>()), lse(p.lse_elems(), poison<float>());
  const dense_tensor<float> ot{o.data(), p.q_layout()};
  auto fwd = [&](auto q, auto kv, int hk, auto out) {
    cpu::attention_forward<tile, 64, causal_mask>(q, kv, hk, {}, 0.1f, out, lse.data());
  };

  expect_error([&] { fwd(p.q_view(), p.kv_view(), 4, ot); }, "multiple of KV heads", o);  // 6 % 4
  expect_error([&] { fwd(p.q_view(), p.kv_view(), 3, ot); }, "heads, num_kv_heads is 3", o);
  expect_error([&] { fwd(p.q_view(), p.kv_view(), 0, ot); }, "num_kv_heads must be positive", o);
  auto q80 = p.q_view();
  q80.layout.head_dim = 80;
  expect_error([&] { fwd(q80, p.kv_view(), 2, ot); }, "head_dim 80", o);
  auto kv_short = p.kv_view();
  kv_short.layout.batch = 1;
  expect_error([&] { fwd(p.q_view(), kv_short, 2, ot); }, "KV batch 1", o);
  std::vector<std::int32_t> other{0, 10, 5};  // output lengths disagree with the queries' (and decrease)
  dense_tensor<float> o_bad{o.data(), ragged_layout::varlen(other.data(), 2, 6, 64)};
  expect_error([&] { fwd(p.q_view(), p.kv_view(), 2, o_bad); }, "indptr must not decrease", o);
  std::vector<std::int32_t> other2{0, 10, 15};
  dense_tensor<float> o_bad2{o.data(), ragged_layout::varlen(other2.data(), 2, 6, 64)};
  expect_error([&] { fwd(p.q_view(), p.kv_view(), 2, o_bad2); }, "sequence 1 has 5 tokens", o);
  expect_error([&] { cpu::attention_forward<tile, 64, causal_mask>(p.q_view(), p.kv_view(), 2, {}, NAN, ot); },
               "scale must be finite", o);
}

TEST_CASE("cpu forward: page indices outside the pool and inconsistent page tables are rejected") {
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  auto p = make_problem<float>(rng, {3, 3}, {20, 33}, 4, 2, 64);
  auto paged = make_paged(p, 16, kv_layout::nhd, rng);
  std::vector<float> o(p.q_elems(), poison<float>());
  const dense_tensor<float> ot{o.data(), p.q_layout()};
  auto run = [&](const auto& kv) { cpu::attention_forward<tile, 64, no_mask>(p.q_view(), kv, 2, {}, 0.1f, ot); };

  const auto keep = paged.indices[2];
  paged.indices[2] = paged.pool.num_blocks;  // one past the pool
  expect_error([&] { run(paged.csr()); }, "is block " + std::to_string(paged.pool.num_blocks) + ", outside the pool", o);
  paged.indices[2] = -1;
  expect_error([&] { run(paged.csr()); }, "is block -1", o);
  paged.indices[2] = keep;
  paged.last_page_len[1] = 17;
  expect_error([&] { run(paged.csr()); }, "last_page_len[1] = 17", o);
  paged.last_page_len[1] = 1;

  paged.block_table[1] = 1 << 20;
  expect_error([&] { run(paged.padded()); }, "outside the pool", o);
  paged.block_table[1] = paged.indices[1];
  paged.kv_lens[0] = 16 * paged.max_blocks + 1;
  expect_error([&] { run(paged.padded()); }, "does not fit max_blocks", o);
  paged.kv_lens[0] = 20;
  paged.pool.head_dim = 128;
  expect_error([&] { run(paged.csr()); }, "paged K/V head_dim 128", o);
}

TEST_CASE("cpu backward: gradient shapes that disagree are rejected before any work") {
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  auto p = make_problem<float>(rng, {10}, {20}, 4, 2, 64);
  std::vector<float> o(p.q_elems()), lse(p.lse_elems()), d_o(p.q_elems());
  std::vector<float> dq(p.q_elems(), poison<float>()), dk(p.k.size(), poison<float>()), dv(p.v.size(), poison<float>());
  auto bwd = [&](const float* l, ragged_layout dk_layout) {
    cpu::attention_backward<tile, 64, causal_mask>(p.q_view(), p.kv_view(), 2, {}, 0.1f,
                                                   dense_tensor<const float>{o.data(), p.q_layout()}, l,
                                                   dense_tensor<const float>{d_o.data(), p.q_layout()},
                                                   dense_tensor<float>{dq.data(), p.q_layout()},
                                                   dense_tensor<float>{dk.data(), dk_layout},
                                                   dense_tensor<float>{dv.data(), p.kv_layout()});
  };
  std::vector<float> all;
  auto gather = [&] {
    all = dq;
    all.insert(all.end(), dk.begin(), dk.end());
    all.insert(all.end(), dv.begin(), dv.end());
    return all;
  };
  expect_error([&] { bwd(nullptr, p.kv_layout()); }, "needs the forward's LSE", gather());
  expect_error([&] { bwd(lse.data(), ragged_layout::fixed(1, 19, 2, 64)); }, "dK: sequence 0 has 19 tokens", gather());
  expect_error([&] { bwd(lse.data(), ragged_layout::fixed(1, 20, 4, 64)); }, "dK: [4 heads", gather());
}

TEST_CASE("thread pool: every item once, exceptions propagate, nested loops run inline") {
  cpu::thread_pool pool(3);
  CHECK(pool.size() == 3);
  std::vector<std::atomic<int>> hits(1000);
  pool.parallel_for(1000, [&](std::int64_t i) { hits[i]++; });
  int bad = 0;
  for (auto& h : hits) bad += h.load() != 1;
  CHECK(bad == 0);
  CHECK_THROWS_AS(pool.parallel_for(100, [](std::int64_t i) {
    if (i == 42) throw std::runtime_error("item 42");
  }),
                  std::runtime_error);
  std::atomic<int> inner{0};
  pool.parallel_for(4, [&](std::int64_t) { pool.parallel_for(5, [&](std::int64_t) { inner++; }); });
  CHECK(inner.load() == 20);
  CHECK_THROWS_AS(cpu::thread_pool(-1), kvtile::error);
}

TEST_CASE("paged checks: lengths near 2^31 tokens neither wrap nor skip the page-id check") {
  // One block of page_size 2^30 in the pool; a sequence of 2^31 - 1 tokens needs two pages, and
  // names block 5 for the second. len + page_size - 1 once wrapped int32 and skipped the check.
  float dummy[1] = {};
  const auto pool = paging::kv_pool_view<float>::make(dummy, dummy, kv_layout::nhd, 1, 1 << 30, 1, 64);
  auto message = [](auto&& f) -> std::string {
    try {
      f();
    } catch (const kvtile::error& e) {
      return e.what();
    }
    return "no error";
  };
  const std::int32_t row[] = {0, 5};
  const std::int32_t lens[] = {std::numeric_limits<std::int32_t>::max()};
  const paging::paged_kv<float, paging::padded_page_table> padded{pool, {row, lens, 1, 2}};
  CHECK(message([&] { cpu::detail::check_kv_source(padded, 1, 64); }).find("page 1 is block 5, outside the pool [0, 1)") !=
        std::string::npos);
  const std::int32_t indptr[] = {0, 2};
  std::int32_t last[] = {(1 << 30) - 1};
  const paging::paged_kv<float, paging::csr_page_table> csr{pool, {indptr, row, last, 1}};
  CHECK(message([&] { cpu::detail::check_kv_source(csr, 1, 64); }).find("page 1 is block 5, outside the pool [0, 1)") !=
        std::string::npos);
  last[0] = 1 << 30;  // 2^31 tokens: past what a kernel view can hold
  CHECK(message([&] { cpu::detail::check_kv_source(csr, 1, 64); }).find("has length 2147483648, outside [0, 2^31)") !=
        std::string::npos);
  // indptr entries whose int32 difference wraps are refused, not read.
  const std::int32_t wild[] = {-2147483647, 2147483647};
  const paging::paged_kv<float, paging::csr_page_table> bad{pool, {wild, row, last, 1}};
  CHECK(message([&] { cpu::detail::check_kv_source(bad, 1, 64); }).find("negative or decreasing") != std::string::npos);
}
