#include <doctest/doctest.h>

#include <algorithm>
#include <random>
#include <set>
#include <vector>

#include "kvtile/memory/lifo_allocator.hpp"
#include "kvtile/memory/lowest_id_allocator.hpp"
#include "support/test_util.hpp"

using namespace kvtile;
using namespace kvtile::memory;

namespace {
template <class A>
std::vector<bool> free_map(const A& a) {
  std::vector<bool> m(std::size_t(a.capacity()));
  for (block_id b = 0; b < a.capacity(); ++b) m[std::size_t(b)] = a.is_free(b);
  return m;
}
template <class A>
void require_unchanged(const A& a, const allocator_stats& st, const std::vector<bool>& map) {
  const auto now = a.stats();
  CHECK(now.free == st.free);
  CHECK(now.used == st.used);
  CHECK(now.high_water == st.high_water);
  CHECK(free_map(a) == map);
}
}  // namespace

TEST_CASE_TEMPLATE("a fresh pool hands out 0, 1, 2, ... and counts", A, lifo_allocator, lowest_id_allocator) {
  A a(7);
  CHECK(a.capacity() == 7);
  CHECK(a.num_free() == 7);
  for (block_id b = 0; b < 5; ++b) CHECK(a.allocate() == b);
  auto st = a.stats();
  CHECK(st.free == 2);
  CHECK(st.used == 5);
  CHECK(st.high_water == 5);
  a.free(3);
  a.free(1);
  st = a.stats();
  CHECK(st.used == 3);
  CHECK(st.high_water == 5);  // the mark stays
  CHECK(st.free + st.used == st.capacity);
}

TEST_CASE_TEMPLATE("batch allocation is all or nothing", A, lifo_allocator, lowest_id_allocator) {
  A a(10);
  std::vector<block_id> out(6, -1);
  a.allocate(out);
  std::set<block_id> got(out.begin(), out.end());
  CHECK(got.size() == 6);
  for (block_id b : out) CHECK_FALSE(a.is_free(b));

  const auto st = a.stats();
  const auto map = free_map(a);
  std::vector<block_id> too_many(5, -7);
  try {
    a.allocate(too_many);
    FAIL("allocating 5 of 4 free blocks must throw");
  } catch (const kvtile::error& e) {
    CHECK(e.code() == errc::out_of_blocks);
    CHECK(std::string(e.what()).find("asked for 5 blocks, 4 of 10") != std::string::npos);
  }
  CHECK(std::all_of(too_many.begin(), too_many.end(), [](block_id b) { return b == -7; }));
  require_unchanged(a, st, map);

  std::vector<block_id> rest(4);
  a.allocate(rest);
  CHECK(a.num_free() == 0);
  CHECK_THROWS_AS(a.allocate(), kvtile::error);
  std::vector<block_id> none;
  a.allocate(none);  // zero blocks always succeed
  CHECK(a.num_free() == 0);
}

TEST_CASE_TEMPLATE("double free and foreign ids are errors that change nothing", A, lifo_allocator,
                   lowest_id_allocator) {
  A a(4);
  const block_id b = a.allocate();
  a.free(b);
  const auto st = a.stats();
  const auto map = free_map(a);
  try {
    a.free(b);
    FAIL("double free must throw");
  } catch (const kvtile::error& e) {
    CHECK(e.code() == errc::double_free);
    CHECK(std::string(e.what()).find("block 0 is already free") != std::string::npos);
  }
  require_unchanged(a, st, map);
  for (block_id bad : {-1, 4, 1 << 30}) {
    try {
      a.free(bad);
      FAIL("freeing a foreign id must throw");
    } catch (const kvtile::error& e) {
      CHECK(e.code() == errc::out_of_range);
      CHECK(std::string(e.what()).find(std::to_string(bad)) != std::string::npos);
    }
    require_unchanged(a, st, map);
  }
  CHECK_THROWS_AS(A(-3), kvtile::error);
}

TEST_CASE("lifo_allocator reuses the most recently freed block first") {
  lifo_allocator a(8);
  std::vector<block_id> out(8);
  a.allocate(out);
  a.free(5);
  a.free(2);
  a.free(7);
  CHECK(a.allocate() == 7);
  CHECK(a.allocate() == 2);
  CHECK(a.allocate() == 5);
}

TEST_CASE_TEMPLATE("random allocate / free against a reference set", A, lifo_allocator, lowest_id_allocator) {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  // 5000 blocks: three levels of the lowest-id bit tree, with a partial last word.
  const std::int32_t cap = 4097 + std::int32_t(rng() % 1000);
  A a(cap);
  std::set<block_id> free_set;
  for (block_id b = 0; b < cap; ++b) free_set.insert(b);
  std::vector<block_id> held;
  std::int32_t high = 0;
  for (int step = 0; step < 20000; ++step) {
    const bool do_alloc = held.empty() || (free_set.size() > 0 && rng() % 100 < 55);
    if (do_alloc) {
      const std::int32_t n = 1 + std::int32_t(rng() % 8);
      std::vector<block_id> out(static_cast<std::size_t>(n));
      if (n > std::int32_t(free_set.size())) {
        CHECK_THROWS_AS(a.allocate(out), kvtile::error);
        continue;
      }
      a.allocate(out);
      for (block_id b : out) {
        REQUIRE(free_set.count(b) == 1);
        if constexpr (std::is_same_v<A, lowest_id_allocator>) REQUIRE(b == *free_set.begin());
        free_set.erase(b);
        held.push_back(b);
      }
    } else {
      const std::size_t i = rng() % held.size();
      a.free(held[i]);
      free_set.insert(held[i]);
      held[i] = held.back();
      held.pop_back();
    }
    high = std::max(high, std::int32_t(held.size()));
    REQUIRE(a.num_free() == std::int32_t(free_set.size()));
    REQUIRE(a.stats().high_water == high);
  }
  for (block_id b : held) a.free(b);
  CHECK(a.num_free() == cap);
}

TEST_CASE_TEMPLATE("copies are independent pools; a moved-from allocator is an empty, valid pool", A, lifo_allocator,
                   lowest_id_allocator) {
  A a(8);
  const block_id x = a.allocate();
  std::vector<block_id> two(2);
  a.allocate(two);
  A copy(a);
  CHECK(copy.stats().used == 3);
  copy.free(x);
  CHECK(!a.is_free(x));  // the original still holds it
  CHECK(copy.is_free(x));
  CHECK(a.stats().used == 3);
  // The copy runs on its own: free everything, allocate everything, in order.
  for (block_id b : two) copy.free(b);
  std::vector<block_id> all(8);
  copy.allocate(all);
  CHECK(copy.num_free() == 0);
  for (block_id b : all) copy.free(b);
  CHECK(copy.num_free() == 8);
  A assigned(1);
  assigned = a;
  CHECK(assigned.stats().used == 3);
  CHECK(!assigned.is_free(x));

  A moved(std::move(a));
  CHECK(moved.stats().used == 3);
  CHECK(!moved.is_free(x));
  CHECK(a.capacity() == 0);
  CHECK(a.num_free() == 0);
  CHECK(a.stats().used == 0);
  CHECK(!a.is_free(0));
  try {
    a.allocate();
    FAIL("a moved-from allocator handed out a block");
  } catch (const kvtile::error& e) {
    CHECK(e.code() == errc::out_of_blocks);
  }
  try {
    a.free(x);
    FAIL("a moved-from allocator took a block back");
  } catch (const kvtile::error& e) {
    CHECK(e.code() == errc::out_of_range);
  }
  std::vector<block_id> none;
  a.allocate(none);  // nothing asked, nothing done
  CHECK(a.capacity() == 0);
  a = std::move(moved);  // a moved-from allocator takes a pool again
  CHECK(a.capacity() == 8);
  CHECK(a.num_free() == 5);
  CHECK(moved.capacity() == 0);
  a.free(x);
  CHECK(a.allocate() == x);
}
