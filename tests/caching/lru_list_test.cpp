#include <doctest/doctest.h>

#include <algorithm>
#include <list>
#include <random>

#include "kvtile/caching/lru_list.hpp"
#include "support/test_util.hpp"

using namespace kvtile;

TEST_CASE("the intrusive LRU matches std::list under random pushes, removes and pops") {
  const std::uint64_t seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  constexpr std::int32_t n = 64;
  caching::lru_list lru(n);
  std::list<caching::block_id> ref;
  for (int step = 0; step < 20000; ++step) {
    const auto b = caching::block_id(rng() % n);
    const bool in = std::find(ref.begin(), ref.end(), b) != ref.end();
    REQUIRE(lru.contains(b) == in);
    const auto op = rng() % 3;
    if (op == 0 && !in) {
      lru.push_back(b);
      ref.push_back(b);
    } else if (op == 1 && in) {
      lru.remove(b);
      ref.remove(b);
    } else if (op == 2 && !ref.empty()) {
      REQUIRE(lru.front() == ref.front());
      CHECK(lru.pop_front() == ref.front());
      ref.pop_front();
    }
    REQUIRE(lru.size() == std::int32_t(ref.size()));
    REQUIRE(lru.front() == (ref.empty() ? -1 : ref.front()));
  }
  // Walk order is push order.
  auto it = ref.begin();
  for (auto b = lru.front(); b >= 0; b = lru.next(b), ++it) CHECK(b == *it);
  CHECK(it == ref.end());
}
