#include <doctest/doctest.h>

#include <limits>
#include <random>
#include <vector>

#include "kvtile/paging/page_table.hpp"
#include "kvtile/paging/page_table_export.hpp"
#include "support/test_util.hpp"

using namespace kvtile;
using namespace kvtile::paging;

namespace {
page_table make(std::int32_t page, std::vector<block_id> blocks, std::int64_t tokens) {
  page_table t(page);
  t.reserve(blocks.size());
  for (block_id b : blocks) t.push_block(b);
  t.set_num_tokens(tokens);
  return t;
}
}  // namespace

TEST_CASE("page table: slots, last page length, room") {
  const auto t = make(4, {7, 2, 9}, 10);
  CHECK(t.num_blocks() == 3);
  CHECK(t.last_page_len() == 2);
  CHECK(t.tail_room() == 2);
  CHECK(t.slot(0) == 28);
  CHECK(t.slot(5) == 9);
  CHECK(t.slot(9) == 37);
  CHECK(t.blocks_for(8) == 2);
  CHECK(t.blocks_for(9) == 3);
  CHECK(page_table(4).last_page_len() == 0);
  CHECK_THROWS_AS(page_table(0), kvtile::error);
}

TEST_CASE("CSR and padded exports describe the same tokens as the page tables") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const std::int32_t page = 1 + std::int32_t(rng() % 7);
  std::vector<page_table> tables;
  block_id next = 0;
  for (int b = 0; b < 9; ++b) {
    const std::int64_t len = b == 3 ? 0 : std::int64_t(rng() % 40);
    std::vector<block_id> blocks;
    for (std::int64_t i = 0; i < (len + page - 1) / page; ++i) blocks.push_back(next++ * 3 % 1000);
    tables.push_back(make(page, blocks, len));
  }
  std::vector<const page_table*> ptrs;
  for (auto& t : tables) ptrs.push_back(&t);
  const auto csr = to_csr(ptrs);
  const auto pad = to_padded(ptrs);
  const auto cv = csr.view();
  const auto pv = pad.view();
  CHECK(cv.batch == 9);
  CHECK(pv.batch == 9);
  for (std::int32_t b = 0; b < 9; ++b) {
    const auto& t = tables[std::size_t(b)];
    REQUIRE(cv.kv_len(b, page) == t.num_tokens());
    REQUIRE(pv.kv_len(b, page) == t.num_tokens());
    REQUIRE(cv.num_blocks(b) == t.num_blocks());
    REQUIRE(pv.num_blocks(b, page) == t.num_blocks());
    for (std::int32_t i = 0; i < t.num_blocks(); ++i) {
      REQUIRE(cv.block(b, i) == t.block(i));
      REQUIRE(pv.block(b, i) == t.block(i));
    }
    for (std::int32_t i = t.num_blocks(); i < pad.max_blocks; ++i) REQUIRE(pv.block(b, i) == -1);
  }
  // Through a pool: token offsets agree with the page table's slots.
  std::vector<float> pool(std::size_t(1000) * page * 2 * 4);
  const auto pool_view = kv_pool_view<float>::make(pool.data(), pool.data(), kv_layout::nhd, 1000, page, 2, 4);
  const auto pk = bind(pool_view, csr);
  const auto pp = bind(pool_view, pad);
  for (std::int32_t b = 0; b < 9; ++b)
    for (std::int32_t t = 0; t < pk.kv_len(b); ++t) {
      const auto slot = tables[std::size_t(b)].slot(t);
      const auto want = pool_view.offset(std::int32_t(slot / page), std::int32_t(slot % page), 1);
      REQUIRE(pk.token_offset(b, t, 1) == want);
      REQUIRE(pp.token_offset(b, t, 1) == want);
    }
}

TEST_CASE("mismatched views are errors naming the values") {
  std::vector<page_table> tables{make(4, {1, 5}, 6), make(4, {8}, 1)};
  const std::vector<const page_table*> ptrs{&tables[0], &tables[1]};
  std::vector<float> pool(std::size_t(9) * 4 * 4);
  const auto csr = to_csr(ptrs);
  const auto small = kv_pool_view<float>::make(pool.data(), pool.data(), kv_layout::nhd, 8, 4, 1, 4);
  try {
    bind(small, csr);
    FAIL("block 8 is outside an 8-block pool");
  } catch (const kvtile::error& e) {
    CHECK(e.code() == errc::out_of_range);
    CHECK(std::string(e.what()).find("holds block 8 but the pool has 8 blocks") != std::string::npos);
  }
  const auto wrong_page = kv_pool_view<float>::make(pool.data(), pool.data(), kv_layout::nhd, 9, 8, 1, 4);
  try {
    bind(wrong_page, to_padded(ptrs));
    FAIL("page sizes 4 and 8 must be rejected");
  } catch (const kvtile::error& e) {
    CHECK(std::string(e.what()).find("page_size 4 bound to a pool with page_size 8") != std::string::npos);
  }
  try {
    to_padded(ptrs, 1);
    FAIL("max_blocks 1 cannot hold 2 blocks");
  } catch (const kvtile::error& e) {
    CHECK(std::string(e.what()).find("sequence 0 needs 2 blocks but the padded table has max_blocks 1") !=
          std::string::npos);
  }
  const auto other = make(8, {3}, 2);
  const std::vector<const page_table*> mixed{&tables[0], &other};
  CHECK_THROWS_AS(to_csr(mixed), kvtile::error);
  CHECK(to_padded(ptrs, 5).max_blocks == 5);
  CHECK(to_csr({}).batch() == 0);
}

TEST_CASE("page tables: copies are independent, a moved-from table is empty") {
  paging::page_table t(4);
  t.reserve(3);
  for (memory::block_id b : {5, 2, 9}) t.push_block(b);
  t.set_num_tokens(10);
  paging::page_table c(t);
  c.pop_block();
  c.set_num_tokens(8);
  CHECK(t.num_blocks() == 3);
  CHECK(t.num_tokens() == 10);
  paging::page_table m(std::move(t));
  CHECK(m.num_blocks() == 3);
  CHECK(m.num_tokens() == 10);
  CHECK(m.slot(9) == 9 * 4 + 1);
  CHECK(t.num_blocks() == 0);
  CHECK(t.num_tokens() == 0);  // not 10 tokens in no blocks
  CHECK(t.last_page_len() == 0);
  CHECK(t.tail_room() == 0);
  t = std::move(c);
  CHECK(t.num_tokens() == 8);
  CHECK(c.num_tokens() == 0);
  CHECK(c.num_blocks() == 0);
  // Lengths near 2^63 do not overflow the block count.
  CHECK(m.blocks_for(std::numeric_limits<std::int64_t>::max()) == std::numeric_limits<std::int64_t>::max() / 4 + 1);
}

TEST_CASE("padded views: page counts near 2^31 tokens do not wrap") {
  const std::int32_t lens[] = {std::numeric_limits<std::int32_t>::max()};
  const std::int32_t rows[] = {0};
  const paging::padded_page_table p{rows, lens, 1, 1};
  CHECK(p.num_blocks(0, 16) == (std::int64_t(1) << 27));
  CHECK(p.num_blocks(0, 1 << 30) == 2);
  const std::int32_t indptr[] = {0, 2};
  const std::int32_t last[] = {(1 << 30) - 1};
  const paging::csr_page_table c{indptr, rows, last, 1};
  CHECK(c.kv_len(0, 1 << 30) == std::numeric_limits<std::int32_t>::max());
}
