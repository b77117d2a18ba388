#include <doctest/doctest.h>

#include <random>
#include <set>
#include <vector>

#include "kvtile/caching/block_hash.hpp"
#include "support/test_util.hpp"

using namespace kvtile;
using caching::token_id;

TEST_CASE("the chained block hash depends on every input") {
  const caching::chained_block_hash h;
  std::vector<token_id> t{5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20};
  const auto base = h(0, t, 0);
  CHECK(h(0, t, 0) == base);  // deterministic
  CHECK(h(1, t, 0) != base);  // previous block
  CHECK(h(0, t, 1) != base);  // salt
  for (std::size_t i = 0; i < t.size(); ++i) {  // each token, in every lane and the tail paths
    auto u = t;
    ++u[i];
    CHECK(h(0, u, 0) != base);
  }
  // Odd lengths reach the 2-token and 1-token tails; a shorter block differs from its prefix.
  for (std::size_t n = 1; n < t.size(); ++n) CHECK(h(0, std::span(t).first(n), 0) != h(0, std::span(t).first(n + 1), 0));
  // Order matters (a swap of two tokens).
  auto swapped = t;
  std::swap(swapped[0], swapped[1]);
  CHECK(h(0, swapped, 0) != base);
}

TEST_CASE("the chained block hash spreads random blocks without collisions") {
  const std::uint64_t seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const caching::chained_block_hash h;
  std::set<std::uint64_t> seen;
  std::set<std::uint64_t> low_bits;  // the index buckets by the low bits
  std::vector<token_id> t(16);
  std::uint64_t prev = 0;
  constexpr int n = 20000;
  for (int i = 0; i < n; ++i) {
    for (auto& x : t) x = token_id(rng() % 32000);
    prev = h(prev, t, 0);
    seen.insert(prev);
    low_bits.insert(prev & 0xffff);
  }
  CHECK(seen.size() == n);
  // 20000 draws into 65536 buckets leave about 65536 * (1 - e^-0.305) = 17 240 distinct; a
  // badly mixed hash leaves far fewer.
  CHECK(low_bits.size() > 16500);
}
