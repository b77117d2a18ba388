// Host tests of kvtile/memory/kv_codec.hpp and the fp8 pools built on it: e4m3 encode/decode
// (every code, rounding, saturation, NaN), per-token scales, write_kv into fp8 pools (per-token
// and per-head scales), block copies carrying the scales, dequantize, and the CPU attention
// over an fp8 pool against fp64 over the dequantised K/V.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "kvtile/attention/cpu/forward.hpp"
#include "kvtile/attention/reference.hpp"
#include "kvtile/kv_cache.hpp"
#include "kvtile/memory/block_storage.hpp"
#include "kvtile/memory/kv_codec.hpp"
#include "kvtile/memory/kv_dequantize.hpp"
#include "kvtile/memory/kv_write.hpp"
#include "kvtile/paging/paged_view.hpp"
#include "support/test_util.hpp"

using namespace kvtile;
using namespace kvtile::memory;

namespace {

// The value of an e4m3 code from its definition (sign, exponent bias 7, 3 mantissa bits).
double e4m3_value(int c) {
  const int s = c >> 7, e = (c >> 3) & 15, m = c & 7;
  if (e == 15 && m == 7) return std::numeric_limits<double>::quiet_NaN();
  const double mag = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, e - 7);
  return s ? -mag : mag;
}

}  // namespace

TEST_CASE("e4m3: every code decodes to its value and encodes back to itself") {
  for (int c = 0; c < 256; ++c) {
    INFO("code " << c);
    const double want = e4m3_value(c);
    const float got = fp8::decode_e4m3(std::uint8_t(c));
    if (std::isnan(want)) {
      CHECK(std::isnan(got));
      CHECK(std::signbit(got) == bool(c & 0x80));
    } else {
      CHECK(double(got) == want);
      CHECK(std::signbit(got) == bool(c & 0x80));
    }
    CHECK(fp8::encode_e4m3(got) == c);
  }
  CHECK(fp8::decode_e4m3(0x7e) == 448.f);
  CHECK(fp8::decode_e4m3(0x01) == std::ldexp(1.f, -9));
  CHECK(fp8::decode_e4m3(0x08) == std::ldexp(1.f, -6));
}

TEST_CASE("e4m3: round to nearest even between every pair of neighbours") {
  // Positive finite codes in order: 0x00 .. 0x7e; negative ones mirror them.
  for (int c = 0; c < 0x7e; ++c) {
    const double a = e4m3_value(c), b = e4m3_value(c + 1);
    const double mid = (a + b) / 2;
    INFO("codes " << c << ", " << c + 1 << " midpoint " << mid);
    const int even = (c % 2 == 0) ? c : c + 1;
    CHECK(fp8::encode_e4m3(float(mid)) == even);
    CHECK(fp8::encode_e4m3(float(-mid)) == (even | 0x80));
    CHECK(fp8::encode_e4m3(std::nextafter(float(mid), 0.f)) == c);
    CHECK(fp8::encode_e4m3(std::nextafter(float(mid), 1e9f)) == c + 1);
  }
  CHECK(fp8::encode_e4m3(std::ldexp(1.f, -11)) == 0);           // a quarter of the smallest subnormal
  CHECK(fp8::encode_e4m3(std::ldexp(1.f, -30)) == 0);
  CHECK(fp8::encode_e4m3(-std::ldexp(1.f, -30)) == 0x80);       // -0
  CHECK(fp8::encode_e4m3(std::numeric_limits<float>::denorm_min()) == 0);
}

TEST_CASE("e4m3: saturation to +-448 and NaN") {
  for (float x : {448.f, 449.f, 464.f, 480.f, 1e6f, 3e38f, std::numeric_limits<float>::infinity()}) {
    INFO("x " << x);
    CHECK(fp8::encode_e4m3(x) == 0x7e);
    CHECK(fp8::encode_e4m3(-x) == 0xfe);
  }
  CHECK(fp8::encode_e4m3(std::nanf("")) == 0x7f);
  CHECK(fp8::encode_e4m3(-std::nanf("")) == 0xff);
}

TEST_CASE("e4m3: per-token scale is amax / 448; empty rows get 1") {
  CHECK(fp8::scale_for_amax(448.f) == 1.f);
  CHECK(fp8::scale_for_amax(896.f) == 2.f);
  CHECK(fp8::scale_for_amax(0.f) == 1.f);
  CHECK(fp8::scale_for_amax(std::numeric_limits<float>::infinity()) == 1.f);
  CHECK(fp8::scale_for_amax(std::nanf("")) == 1.f);
}

TEST_CASE("fp8 pools: the block holds its scales after the elements, views and copies see them") {
  const kv_shape shape{2, 6, 5, 3, 16};
  using codec = fp8_e4m3<per_token_head>;
  block_storage<bfloat16, host_memory, codec> s(shape, kv_layout::hnd);
  const std::int64_t elems = 5 * 3 * 16, extra = (5 * 3 * 4 + 15) / 16 * 16;
  CHECK(s.bytes_per_pool() == std::size_t(2 * 6 * (elems + extra)));
  const auto p = s.layer(1);
  CHECK(p.stride_block == elems + extra);
  CHECK(p.scale_offset == elems);
  CHECK(reinterpret_cast<unsigned char*>(p.scale_ptr(p.k, 2, 4, 1)) ==
        reinterpret_cast<unsigned char*>(s.k_data()) + (6 + 2) * (elems + extra) + elems + (1 * 5 + 4) * 4);
  const kv_pool_set set = s.pools();
  CHECK(set.has_scales());
  CHECK(set.stride_block == elems + extra);
  CHECK(set.scale_offset == elems);
  CHECK(set.scale_token_bytes == 12);
  // Identity pools keep their layout and size.
  static_assert(sizeof(kv_pool_view<half>) == 2 * sizeof(void*) + 3 * 8 + 4 * 4);
  CHECK_FALSE(block_storage<half>(shape, kv_layout::nhd).pools().has_scales());
}

TEST_CASE("write_kv into fp8 pools: per-token scales, codes, dequantised error; per-head saturation") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const std::int32_t H = 3, D = 40, page = 4;
  const kv_shape shape{1, 5, page, H, D};
  const int n = 9;
  auto k = kvtile_test::random_vector<bfloat16>(std::size_t(n) * H * D, rng, -3.f, 3.f);
  auto v = kvtile_test::random_vector<bfloat16>(std::size_t(n) * H * D, rng, -3.f, 3.f);
  for (int x = 0; x < D; ++x) k[std::size_t(2 * H + 1) * D + x] = bfloat16(0.f);  // an all-zero row: scale 1
  const std::vector<std::int64_t> slots{0, 5, 19, -1, 7, 12, 1, 2, 3};
  for (kv_layout layout : {kv_layout::nhd, kv_layout::hnd}) {
    SUBCASE("per token and head") {
      block_storage<bfloat16, host_memory, fp8_e4m3<per_token_head>> s(shape, layout);
      const auto p = s.layer(0);
      s.memory().write_kv(p, k.data(), v.data(), std::int64_t(H) * D, slots.data(), n);
      for (int i = 0; i < n; ++i) {
        if (slots[i] < 0) continue;
        const auto b = std::int32_t(slots[i] / page), t = std::int32_t(slots[i] % page);
        for (int h = 0; h < H; ++h) {
          const bfloat16* kr = &k[(std::size_t(i) * H + h) * D];
          float amax = 0;
          for (int x = 0; x < D; ++x) amax = std::max(amax, std::abs(float(kr[x])));
          const float sc = p.k_scale_at(b, t, h);
          CHECK(sc == (amax > 0 ? amax / 448.f : 1.f));
          for (int x = 0; x < D; ++x) {
            const std::uint8_t code = p.k_at(b, t, h)[x].bits;
            REQUIRE(code == fp8::encode_e4m3(float(kr[x]) / sc));
            const float deq = fp8::decode_e4m3(code) * sc;
            // Half an e4m3 ulp: 2^-4 relative for normals, 2^-10 of the scale below 2^-6.
            REQUIRE(std::abs(deq - float(kr[x])) <= std::max(std::abs(float(kr[x])) / 16.f, sc / 1024.f) * 1.0001f);
          }
        }
      }
      // Slot -1 and unwritten slots stay zero; a slot past the pool is an error before any write.
      CHECK(p.k_scale_at(4, 0, 0) == 0.f);
      const std::vector<std::int64_t> bad{0, 20};
      kvtile_test::expect_error(errc::out_of_range, "slot_mapping[1] = 20",
                                [&] { s.memory().write_kv(p, k.data(), v.data(), std::int64_t(H) * D, bad.data(), 2); });
    }
    SUBCASE("per head (calibrated), saturating") {
      block_storage<bfloat16, host_memory, fp8_e4m3<per_head>> s(shape, layout);
      kvtile_test::expect_error(errc::invalid_argument, "set_head_scales", [&] {
        s.memory().write_kv(s.layer(0), k.data(), v.data(), std::int64_t(H) * D, slots.data(), n);
      });
      const std::vector<float> ks{0.5f / 448.f, 1.f / 448.f, 4.f / 448.f}, vs{1.f / 448.f, 3.f / 448.f, 0.25f};
      s.set_head_scales(ks.data(), vs.data());
      const auto p = s.layer(0);
      s.memory().write_kv(p, k.data(), v.data(), std::int64_t(H) * D, slots.data(), n);
      for (int i = 0; i < n; ++i) {
        if (slots[i] < 0) continue;
        const auto b = std::int32_t(slots[i] / page), t = std::int32_t(slots[i] % page);
        for (int h = 0; h < H; ++h)
          for (int x = 0; x < D; ++x) {
            const float kx = float(k[(std::size_t(i) * H + h) * D + x]);
            const float deq = fp8::decode_e4m3(p.k_at(b, t, h)[x].bits) * ks[h];
            const float want = std::clamp(kx, -448.f * ks[h], 448.f * ks[h]);  // saturated
            REQUIRE(std::abs(deq - want) <= std::max(std::abs(want) / 16.f, ks[h] / 1024.f) * 1.0001f);
          }
      }
      std::vector<float> zero{0.f, 1.f, 1.f};
      s.set_head_scales(zero.data(), vs.data());
      kvtile_test::expect_error(errc::invalid_argument, "KV head 0", [&] {
        s.memory().write_kv(s.layer(0), k.data(), v.data(), std::int64_t(H) * D, slots.data(), n);
      });
    }
  }
}

TEST_CASE("block copies of an fp8 pool carry the filled slots' elements and scales, nothing else") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (kv_layout layout : {kv_layout::nhd, kv_layout::hnd}) {
    const kv_shape shape{2, 6, 5, 3, 16};
    block_storage<half, host_memory, fp8_e4m3<per_token_head>> s(shape, layout);
    const std::size_t bytes = s.bytes_per_pool();
    auto* kb = reinterpret_cast<unsigned char*>(s.k_data());
    auto* vb = reinterpret_cast<unsigned char*>(s.v_data());
    for (std::size_t i = 0; i < bytes; ++i) kb[i] = std::uint8_t(rng()), vb[i] = std::uint8_t(rng());
    const std::vector<unsigned char> k0(kb, kb + bytes), v0(vb, vb + bytes);
    const std::vector<block_copy> copies{{1, 4, 5}, {2, 0, 2}};
    s.memory().copy_blocks(s.pools(), copies);
    for (std::int32_t l = 0; l < 2; ++l) {
      const auto p = s.layer(l);
      const auto base = reinterpret_cast<const unsigned char*>(s.k_data());
      for (std::int32_t b = 0; b < 6; ++b)
        for (std::int32_t t = 0; t < 5; ++t)
          for (std::int32_t h = 0; h < 3; ++h) {
            std::int32_t from = b;
            for (const auto& c : copies)
              if (c.dst == b && t < c.num_tokens) from = c.src;
            const auto& src = s.layer(l);
            // Elements: compare against the original bytes of `from`.
            const std::int64_t off_to = p.offset(b, t, h), off_from = src.offset(from, t, h);
            const std::int64_t layer_off = (reinterpret_cast<const unsigned char*>(p.k) - base);
            for (int x = 0; x < 16; ++x) {
              REQUIRE(kb[layer_off + off_to + x] == k0[layer_off + off_from + x]);
              REQUIRE(vb[layer_off + off_to + x] == v0[layer_off + off_from + x]);
            }
            const auto sc_to = reinterpret_cast<const unsigned char*>(p.scale_ptr(p.k, b, t, h)) - base;
            const auto sc_from = reinterpret_cast<const unsigned char*>(p.scale_ptr(p.k, from, t, h)) - base;
            REQUIRE(std::memcmp(kb + sc_to, k0.data() + sc_from, 4) == 0);
            REQUIRE(std::memcmp(vb + sc_to, v0.data() + sc_from, 4) == 0);
          }
    }
  }
}

TEST_CASE("CPU attention over an fp8 pool (dequantised) matches fp64 over the dequantised K/V") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  constexpr int D = 64;
  const std::int32_t H = 2, hq = 10, page = 16;
  const std::vector<std::int32_t> kv_lens{37, 300};
  std::vector<std::int32_t> indptr{0}, indices, last;
  std::int32_t blocks = 0;
  for (auto len : kv_lens) {
    const std::int32_t nb = (len + page - 1) / page;
    for (int i = 0; i < nb; ++i) indices.push_back(blocks + nb - 1 - i);  // scattered: reversed
    blocks += nb;
    indptr.push_back(blocks);
    last.push_back(len - (nb - 1) * page);
  }
  const kv_shape shape{1, blocks, page, H, D};
  for (int policy = 0; policy < 2; ++policy) {
    INFO("scales " << std::string(policy ? "per head" : "per token and head"));
    std::vector<float> ks(H, 2.f / 448.f), vs(H, 2.f / 448.f);
    dequantized_pool deq;
    std::vector<float> k, v;
    std::vector<std::int64_t> slots;
    std::int32_t tokens = 0;
    for (std::size_t b = 0; b < kv_lens.size(); ++b)
      for (std::int32_t t = 0; t < kv_lens[b]; ++t, ++tokens)
        slots.push_back(std::int64_t(indices[indptr[b] + t / page]) * page + t % page);
    k = kvtile_test::random_vector<float>(std::size_t(tokens) * H * D, rng);
    v = kvtile_test::random_vector<float>(std::size_t(tokens) * H * D, rng);
    paging::csr_page_table table{indptr.data(), indices.data(), last.data(), 2};
    const std::vector<std::int32_t> q_indptr{0, 3, 4};
    const auto ql = attention::ragged_layout::varlen(q_indptr.data(), 2, hq, D);
    auto q = kvtile_test::random_vector<float>(std::size_t(4) * hq * D, rng);
    const float scale = 1.f / std::sqrt(float(D));
    attention::dense_tensor<float> qv{q.data(), ql};
    // The fp64 reference reads the fp8 pool itself (codes x scales), too.
    std::vector<double> o_direct(q.size());
    auto direct = [&](const auto& pool) {
      using codec = typename std::remove_cvref_t<decltype(pool)>::codec;
      const paging::paged_kv<float, paging::csr_page_table, codec> fp8{pool, table};
      attention::reference_attention<attention::causal_mask>(qv, fp8, H, {}, double(scale),
                                                             attention::dense_tensor<double>{o_direct.data(), ql});
    };
    if (policy == 0) {
      block_storage<float, host_memory, fp8_e4m3<per_token_head>> s(shape, kv_layout::nhd);
      s.memory().write_kv(s.layer(0), k.data(), v.data(), std::int64_t(H) * D, slots.data(), tokens);
      deq = dequantize(s.layer(0));
      direct(s.layer(0));
    } else {
      block_storage<float, host_memory, fp8_e4m3<per_head>> s(shape, kv_layout::hnd);
      s.set_head_scales(ks.data(), vs.data());
      s.memory().write_kv(s.layer(0), k.data(), v.data(), std::int64_t(H) * D, slots.data(), tokens);
      deq = dequantize(s.layer(0));
      direct(s.layer(0));
    }
    paging::paged_kv<float, paging::csr_page_table> kv{deq.view, table};
    std::vector<float> o(q.size());
    std::vector<double> o_ref(q.size());
    attention::dense_tensor<float> ov{o.data(), ql};
    attention::cpu::attention_forward<attention::tile_shape<16, 32>, D, attention::causal_mask>(qv, kv, H, {}, scale, ov);
    attention::reference_attention<attention::causal_mask>(qv, kv, H, {}, double(scale),
                                                           attention::dense_tensor<double>{o_ref.data(), ql});
    const auto e = kvtile_test::compare(o, o_ref);
    CHECK_FALSE(e.any_nan);
    CHECK(e.max_abs < 1e-4);
    double direct_diff = 0;
    for (std::size_t i = 0; i < o_ref.size(); ++i) direct_diff = std::max(direct_diff, std::abs(o_ref[i] - o_direct[i]));
    CHECK(direct_diff < 1e-6);  // dequantize rounds code x scale to float; the direct read does not
    // Against the unquantised K/V (a report, not a bound of the kernel).
    std::vector<float> kf(deq.k.size()), vf(deq.v.size());
    for (std::int32_t i = 0; i < tokens; ++i)
      for (std::int32_t h = 0; h < H; ++h) {
        const auto b = std::int32_t(slots[i] / page), t = std::int32_t(slots[i] % page);
        const std::int64_t off = deq.view.offset(b, t, h);
        for (int x = 0; x < D; ++x) {
          kf[off + x] = k[(std::size_t(i) * H + h) * D + x];
          vf[off + x] = v[(std::size_t(i) * H + h) * D + x];
        }
      }
    paging::paged_kv<float, paging::csr_page_table> exact{pool_as<float>(deq.view, kf.data(), vf.data()), table};
    std::vector<double> o_exact(q.size());
    attention::reference_attention<attention::causal_mask>(qv, exact, H, {}, double(scale),
                                                           attention::dense_tensor<double>{o_exact.data(), ql});
    const auto eq = kvtile_test::compare(o, o_exact);
    MESSAGE("fp8 " << std::string(policy ? "per-head" : "per-token-head") << " K/V: max |o - o(unquantised)| = " << eq.max_abs
            << ", relative L2 " << eq.rel_l2);
    CHECK(eq.rel_l2 < 0.1);
  }
}

TEST_CASE("the cache on an fp8 pool: writes quantise, copy-on-write copies the elements and scales") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  using cache_t = paged_kv_cache<bfloat16, kv_layout::hnd>::with_codec<fp8_e4m3<per_token_head>>;
  const std::int32_t H = 2, D = 32, page = 4;
  cache_t cache(kv_shape{2, 8, page, H, D});
  const auto a = cache.create();
  const auto slots = cache.append(a, 6);  // one full block and 2 tokens of a second
  const auto k = kvtile_test::random_vector<bfloat16>(std::size_t(6) * H * D, rng, -2.f, 2.f);
  const auto v = kvtile_test::random_vector<bfloat16>(std::size_t(6) * H * D, rng, -2.f, 2.f);
  for (std::int32_t l = 0; l < 2; ++l) cache.write(l, k.data(), v.data(), std::int64_t(H) * D, slots.data(), 6);
  const auto b = cache.fork(a);
  const auto more = cache.append(b, 1);  // b writes into the shared partial block: copied first
  REQUIRE(cache.pending_copies().size() == 1);
  const block_copy c = cache.pending_copies()[0];
  cache.run_pending_copies();
  CHECK(more[0] / page == c.dst);
  for (std::int32_t l = 0; l < 2; ++l) {
    const auto p = cache.layer(l);
    for (std::int32_t t = 0; t < c.num_tokens; ++t)
      for (std::int32_t h = 0; h < H; ++h) {
        CHECK(p.k_scale_at(c.dst, t, h) == p.k_scale_at(c.src, t, h));
        CHECK(p.v_scale_at(c.dst, t, h) == p.v_scale_at(c.src, t, h));
        CHECK(p.k_scale_at(c.dst, t, h) > 0.f);
        CHECK(std::memcmp(p.k_at(c.dst, t, h), p.k_at(c.src, t, h), D) == 0);
        CHECK(std::memcmp(p.v_at(c.dst, t, h), p.v_at(c.src, t, h), D) == 0);
      }
  }
  CHECK(cache.storage().pools().has_scales());
}
