#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "kvtile/memory/block_storage.hpp"
#include "kvtile/memory/pool_view.hpp"
#include "support/test_util.hpp"

using namespace kvtile;
using namespace kvtile::memory;

TEST_CASE("pool views: NHD and HND offsets, every layer, 64-bit") {
  const kv_shape shape{3, 5, 4, 2, 8};
  for (kv_layout layout : {kv_layout::nhd, kv_layout::hnd}) {
    block_storage<float> s(shape, layout);
    const std::int64_t block = 4 * 2 * 8;
    for (std::int32_t l = 0; l < 3; ++l) {
      const auto p = s.layer(l);
      CHECK(p.k == s.k_data() + std::int64_t(l) * 5 * block);
      CHECK(p.v == s.v_data() + std::int64_t(l) * 5 * block);
      for (std::int32_t b = 0; b < 5; ++b)
        for (std::int32_t t = 0; t < 4; ++t)
          for (std::int32_t h = 0; h < 2; ++h) {
            const std::int64_t want = layout == kv_layout::nhd ? b * block + (t * 2 + h) * 8 : b * block + (h * 4 + t) * 8;
            REQUIRE(p.offset(b, t, h) == want);
          }
    }
    CHECK_THROWS_AS(s.layer(3), kvtile::error);
    CHECK_THROWS_AS(s.layer(-1), kvtile::error);
    // Storage starts zeroed.
    for (std::int64_t i = 0; i < 3 * 5 * block; ++i) REQUIRE(s.k_data()[i] == 0.f);
  }
  // A pool beyond 2^31 elements: offsets stay exact (arithmetic only, nothing allocated).
  const auto big = memory::kv_pool_view<half>::make(nullptr, nullptr, kv_layout::hnd, 1 << 20, 16, 8, 128);
  CHECK(big.offset((1 << 20) - 1, 15, 7) == std::int64_t((1 << 20) - 1) * 16 * 8 * 128 + 7 * 16 * 128 + 15 * 128);
  CHECK(kv_shape{32, 0, 16, 8, 128}.bytes_per_token(2) == 131072);
  CHECK_THROWS_AS(block_storage<float>(kv_shape{0, 4, 4, 1, 4}, kv_layout::nhd), kvtile::error);
  CHECK_THROWS_AS(block_storage<float>(kv_shape{1, 4, 0, 1, 4}, kv_layout::nhd), kvtile::error);
}

TEST_CASE("host block copies: only the filled slots, every layer, K and V") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (kv_layout layout : {kv_layout::nhd, kv_layout::hnd}) {
    const kv_shape shape{2, 9, 5, 3, 3};  // odd sizes
    block_storage<float> s(shape, layout);
    const std::int64_t n = std::int64_t(shape.num_layers) * shape.num_blocks * shape.block_elems();
    auto k0 = kvtile_test::random_vector<float>(std::size_t(n), rng);
    auto v0 = kvtile_test::random_vector<float>(std::size_t(n), rng);
    std::memcpy(s.k_data(), k0.data(), k0.size() * 4);
    std::memcpy(s.v_data(), v0.data(), v0.size() * 4);
    const std::vector<block_copy> copies{{1, 4, 5}, {2, 7, 2}, {8, 0, 1}};
    s.memory().copy_blocks(s.pools(), copies);
    for (std::int32_t l = 0; l < 2; ++l) {
      const auto p = s.layer(l);
      const auto base = std::int64_t(l) * shape.num_blocks * shape.block_elems();
      for (std::int32_t b = 0; b < 9; ++b)
        for (std::int32_t t = 0; t < 5; ++t)
          for (std::int32_t h = 0; h < 3; ++h)
            for (std::int32_t d = 0; d < 3; ++d) {
              std::int32_t from = b;
              for (const auto& c : copies)
                if (c.dst == b && t < c.num_tokens) from = c.src;
              const auto got = p.offset(b, t, h) + d, want = p.offset(from, t, h) + d;
              REQUIRE(s.k_data()[base + got] == k0[std::size_t(base + want)]);
              REQUIRE(s.v_data()[base + got] == v0[std::size_t(base + want)]);
            }
    }
    // Bad copies are rejected before anything is copied.
    const std::vector<float> before(s.k_data(), s.k_data() + n);
    for (const std::vector<block_copy>& bad : {std::vector<block_copy>{{0, 1, 2}, {0, 9, 1}},
                                               std::vector<block_copy>{{0, 1, 2}, {3, 2, 6}},
                                               std::vector<block_copy>{{0, 1, 0}}, std::vector<block_copy>{{3, 3, 1}}}) {
      CHECK_THROWS_AS(s.memory().copy_blocks(s.pools(), bad), kvtile::error);
      CHECK(std::equal(before.begin(), before.end(), s.k_data()));
    }
  }
}

TEST_CASE("host K/V write through a slot mapping") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (kv_layout layout : {kv_layout::nhd, kv_layout::hnd}) {
    const kv_shape shape{1, 6, 4, 2, 5};
    block_storage<half> s(shape, layout);
    const auto p = s.layer(0);
    const std::int32_t ntok = 7;
    const std::int64_t stride = 2 * 5 + 3;  // padded rows
    auto k = kvtile_test::random_vector<half>(std::size_t(ntok * stride), rng);
    auto v = kvtile_test::random_vector<half>(std::size_t(ntok * stride), rng);
    const std::vector<std::int64_t> slots{0, 23, 5, -1, 17, 6, 12};
    s.memory().write_kv(p, k.data(), v.data(), stride, slots.data(), ntok);
    std::int64_t written = 0;
    for (std::int32_t i = 0; i < ntok; ++i) {
      if (slots[i] < 0) continue;
      ++written;
      for (std::int32_t h = 0; h < 2; ++h)
        for (std::int32_t d = 0; d < 5; ++d) {
          const auto o = p.offset(std::int32_t(slots[i] / 4), std::int32_t(slots[i] % 4), h) + d;
          REQUIRE(p.k[o].bits == k[std::size_t(i * stride + h * 5 + d)].bits);
          REQUIRE(p.v[o].bits == v[std::size_t(i * stride + h * 5 + d)].bits);
        }
    }
    CHECK(written == 6);
    const std::vector<half> before(p.k, p.k + 6 * shape.block_elems());
    const std::vector<std::int64_t> bad{1, 2, 24};
    try {
      s.memory().write_kv(p, k.data(), v.data(), stride, bad.data(), 3);
      FAIL("slot 24 of 24 must be rejected");
    } catch (const kvtile::error& e) {
      CHECK(e.code() == errc::out_of_range);
      CHECK(std::string(e.what()).find("slot_mapping[2] = 24") != std::string::npos);
    }
    CHECK(std::memcmp(before.data(), p.k, before.size() * 2) == 0);  // nothing written
    CHECK_THROWS_AS(s.memory().write_kv(p, k.data(), v.data(), 9, slots.data(), 1), kvtile::error);
  }
}

TEST_CASE("pool sizes that overflow are errors naming the operands, before anything is allocated") {
  // 65536^4 x 4 bytes wraps to 0 in 64 bits: the pool was once allocated as 1 byte.
  const kv_shape huge{65536, 65536, 65536, 65536, 1};
  try {
    block_storage<float> s(huge, kv_layout::nhd);
    FAIL("a wrapped pool size was accepted");
  } catch (const kvtile::error& e) {
    CHECK(e.code() == errc::invalid_argument);
    CHECK(std::string(e.what()).find("overflows") != std::string::npos);
  }
  CHECK_THROWS_AS(huge.check(sizeof(float)), kvtile::error);
  CHECK_THROWS_AS(kv_shape({1, 1, 1 << 30, 1 << 30, 1 << 30}).block_elems(), kvtile::error);
  CHECK_THROWS_AS(kv_shape({1 << 30, 1, 1, 1 << 30, 1 << 30}).bytes_per_token(8), kvtile::error);
  // Just below the limit the arithmetic is exact (nothing allocated: only the sizes).
  const kv_shape big{64, 1 << 20, 16, 8, 128};
  CHECK(big.pool_bytes(2) == std::int64_t(64) * (1 << 20) * 16 * 8 * 128 * 2);
  CHECK_NOTHROW(big.check(2));
}

TEST_CASE("pools().head_bytes is not truncated to 32 bits") {
  // head_dim 2^30 floats is 2^32 bytes per head; zero blocks keep the pool itself empty.
  block_storage<float> s(kv_shape{1, 0, 1, 1, 1 << 30}, kv_layout::hnd);
  static_assert(std::is_same_v<decltype(s.pools().head_bytes), std::int64_t>);
  CHECK(s.pools().head_bytes == std::int64_t(1) << 32);
  CHECK(s.pools().segment_bytes(1) == std::int64_t(1) << 32);
}

TEST_CASE("a moved-from storage holds no blocks and stays usable; move assignment releases the old pools") {
  const kv_shape shape{2, 3, 4, 1, 8};
  block_storage<float> a(shape, kv_layout::nhd);
  a.k_data()[5] = 7.f;
  float* const k = a.k_data();
  block_storage<float> b(std::move(a));
  CHECK(b.k_data() == k);
  CHECK(b.k_data()[5] == 7.f);
  CHECK(b.shape().num_blocks == 3);
  CHECK(a.k_data() == nullptr);
  CHECK(a.v_data() == nullptr);
  CHECK(a.shape().num_blocks == 0);
  CHECK(a.bytes_per_pool() == 0);
  const auto moved = a.layer(1);  // a view of zero blocks: nothing a kernel could read
  CHECK(moved.num_blocks == 0);
  CHECK(moved.k == nullptr);
  CHECK(a.pools().num_blocks == 0);
  // Copies into a moved-from pool name a block outside it.
  const memory::block_copy c{0, 1, 1};
  CHECK_THROWS_AS(memory::copy_blocks_host(a.pools(), std::span(&c, 1)), kvtile::error);

  block_storage<float> d(kv_shape{1, 1, 1, 1, 4}, kv_layout::hnd);
  d = std::move(b);
  CHECK(d.k_data() == k);
  CHECK(d.layout() == kv_layout::nhd);
  CHECK(b.shape().num_blocks == 0);
  a = std::move(d);  // into a moved-from one
  CHECK(a.k_data() == k);
  CHECK(a.k_data()[5] == 7.f);
}
