// The CPU tiled forward against fp64: FlashAttention's 2x rule on fresh random inputs, odd
// sizes, masks, GQA groups, head dims, varlen and paged sources, every shipped tile shape.
#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "attention/cpu/attention_cases.hpp"
#include "kvtile/attention/cpu/forward.hpp"
#include "kvtile/attention/variant.hpp"

using namespace kvtile_test;
namespace cpu = kvtile::attention::cpu;

namespace {

// Runs the kernel on a dense source into poisoned outputs.
template <class Tile, int D, class Mask, class T, class Src>
void run_forward(const problem<T>& p, const Src& kv, typename Mask::params mp, float scale, std::vector<T>& o,
                 std::vector<float>& lse) {
  o.assign(p.q_elems(), poison<T>());
  lse.assign(p.lse_elems(), std::numeric_limits<float>::quiet_NaN());
  cpu::attention_forward<Tile, D, Mask>(p.q_view(), kv, p.hk, mp, scale, dense_tensor<T>{o.data(), p.q_layout()},
                                        lse.data());
}

template <class Tile, int D, class Mask, class T>
void check_case(std::mt19937_64& rng, const std::vector<int>& q_lens, const std::vector<int>& kv_lens, int hq, int hk,
                typename Mask::params mp = {}, float range = 1.f, float scale = 0.f) {
  INFO("mask " << std::string(Mask::name) << ", " << std::string(element_name<T>) << ", D " << D << ", tile " << Tile::block_q << "x"
               << Tile::block_kv << ", heads " << hq << "/" << hk << ", q_len[0] " << q_lens[0] << ", kv_len[0] "
               << kv_lens[0] << ", batch " << q_lens.size());
  const auto p = make_problem<T>(rng, q_lens, kv_lens, hq, hk, D, range);
  if (scale == 0.f) scale = 1.f / std::sqrt(float(D));
  const auto exact = exact_forward<Mask>(p, mp, scale);
  std::vector<T> o;
  std::vector<float> lse;
  run_forward<Tile, D, Mask>(p, p.kv_view(), mp, scale, o, lse);
  check_rule(o, lse, exact);
}

using tile_32x64 = tile_shape<32, 64>;

}  // namespace

TEST_CASE_TEMPLATE("cpu forward: odd lengths, every mask, against fp64 (2x rule)", T, float, half, bfloat16) {
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const int pairs[][2] = {{1, 1}, {7, 7}, {63, 65}, {65, 63}, {1, 1000}, {7, 1000}, {65, 130}, {5, 3}, {64, 64}};
  const int groups[][2] = {{4, 1}, {5, 1}, {2, 2}, {7, 1}};
  int n = 0;
  for (const auto& pr : pairs) {
    const auto& g = groups[n++ % 4];
    check_case<tile_32x64, 64, no_mask, T>(rng, {pr[0]}, {pr[1]}, g[0], g[1]);
    check_case<tile_32x64, 64, causal_mask, T>(rng, {pr[0]}, {pr[1]}, g[0], g[1]);
    check_case<tile_32x64, 64, sliding_window_mask, T>(rng, {pr[0]}, {pr[1]}, g[0], g[1], {37, 4});
    check_case<tile_32x64, 64, sliding_window_mask, T>(rng, {pr[0]}, {pr[1]}, g[0], g[1], {5, 0});
  }
}

TEST_CASE("cpu forward: a 1000 x 1000 causal prefill and a varlen batch") {
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  check_case<tile_shape<64, 64>, 64, causal_mask, float>(rng, {1000}, {1000}, 2, 1);
  check_case<tile_shape<64, 64>, 64, causal_mask, bfloat16>(rng, {1000}, {1000}, 1, 1);
  // Varlen: a decode row, a chunk after a cached prefix, an empty query, an empty KV, prefill.
  check_case<tile_32x64, 64, causal_mask, float>(rng, {1, 17, 0, 3, 65}, {40, 100, 9, 0, 65}, 4, 2);
  check_case<tile_32x64, 64, sliding_window_mask, half>(rng, {1, 17, 0, 3, 65}, {40, 100, 9, 0, 65}, 4, 2, {16, 2});
}

TEST_CASE_TEMPLATE("cpu forward: head dims 64, 80, 96, 128, 256", T, float, bfloat16) {
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  check_case<tile_32x64, 64, causal_mask, T>(rng, {17}, {45}, 4, 2);
  check_case<tile_32x64, 80, causal_mask, T>(rng, {17}, {45}, 4, 2);
  check_case<tile_32x64, 96, no_mask, T>(rng, {17}, {70}, 4, 2);
  check_case<tile_32x64, 128, causal_mask, T>(rng, {33}, {100}, 4, 2);
  check_case<tile_32x64, 256, sliding_window_mask, T>(rng, {9}, {70}, 2, 1, {20, 3});
  check_case<tile_32x64, 16, no_mask, T>(rng, {7}, {20}, 2, 1);
}

TEST_CASE("cpu forward: GQA groups 1, 4, 5, 7, 8, 16 in decode and prefill") {
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (int group : {1, 4, 5, 7, 8, 16}) {
    check_case<tile_32x64, 64, causal_mask, float>(rng, {1, 1}, {77, 150}, 2 * group, 2);     // decode
    check_case<tile_32x64, 64, causal_mask, bfloat16>(rng, {9}, {40}, group, 1);              // chunk
    check_case<tile_32x64, 128, no_mask, half>(rng, {1}, {300}, 3 * group, 3);                 // MQA-like decode
  }
}

TEST_CASE("cpu forward: every shipped tile shape") {
  // The shapes kvtile's benchmark, docs and examples instantiate; each with partial tiles.
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  auto all = [&]<class Tile>() {
    check_case<Tile, 64, causal_mask, float>(rng, {70}, {150}, 4, 2);
    check_case<Tile, 128, sliding_window_mask, bfloat16>(rng, {1, 40}, {200, 90}, 4, 1, {50, 4});
    check_case<Tile, 64, no_mask, half>(rng, {3}, {5}, 2, 1);  // kv shorter than a tile
  };
  all.template operator()<tile_shape<8, 16>>();
  all.template operator()<tile_shape<16, 32>>();
  all.template operator()<tile_shape<16, 64>>();
  all.template operator()<tile_shape<32, 64>>();
  all.template operator()<tile_shape<64, 64>>();
  all.template operator()<tile_shape<64, 128>>();
  all.template operator()<tile_shape<128, 64>>();
  all.template operator()<tile_shape<128, 128>>();
}

TEST_CASE("cpu forward: fully masked rows give zeros and LSE -inf, never NaN") {
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  // More queries than keys under the bottom-right causal mask: rows 0..29 see no key; and a
  // sequence with no keys at all.
  const auto p = make_problem<bfloat16>(rng, {40, 5}, {10, 0}, 4, 2, 64);
  std::vector<bfloat16> o;
  std::vector<float> lse;
  run_forward<tile_32x64, 64, causal_mask>(p, p.kv_view(), {}, 0.125f, o, lse);
  const auto exact = exact_forward<causal_mask>(p, {}, 0.125);
  check_rule(o, lse, exact);
  int masked = 0;
  for (int r = 0; r < 45; ++r)
    for (int h = 0; h < 4; ++h) {
      if (r >= 30 && r < 40) continue;
      ++masked;
      CHECK((std::isinf(lse[r * 4 + h]) && lse[r * 4 + h] < 0));
      for (int x = 0; x < 64; ++x) CHECK(to_float(o[(r * 4 + h) * 64 + x]) == 0.f);
    }
  CHECK(masked == 35 * 4);
}

TEST_CASE("cpu forward: logits near 1e4 neither overflow nor lose the rule") {
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  // |q|, |k| up to 30 with D = 64 and scale 1: scores of several thousand, max around 1e4.
  check_case<tile_32x64, 64, no_mask, float>(rng, {33}, {90}, 2, 1, {}, 30.f, 1.f);
  check_case<tile_32x64, 64, causal_mask, float>(rng, {33}, {90}, 2, 1, {}, 30.f, 1.f);
  check_case<tile_32x64, 64, causal_mask, bfloat16>(rng, {33}, {90}, 2, 1, {}, 30.f, 1.f);
}

TEST_CASE_TEMPLATE("cpu forward: paged (CSR and padded, NHD and HND, any page size) equals dense", T, float, half) {
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const auto p = make_problem<T>(rng, {1, 20, 7}, {33, 64, 300}, 8, 2, 64);
  std::vector<T> od, op;
  std::vector<float> ld, lp;
  run_forward<tile_32x64, 64, sliding_window_mask>(p, p.kv_view(), {50, 3}, 0.125f, od, ld);
  for (int page : {1, 3, 16, 64})
    for (auto layout : {kv_layout::nhd, kv_layout::hnd}) {
      INFO("page size " << page << (layout == kv_layout::nhd ? " NHD" : " HND"));
      const auto paged = make_paged(p, page, layout, rng);
      run_forward<tile_32x64, 64, sliding_window_mask>(p, paged.csr(), {50, 3}, 0.125f, op, lp);
      CHECK(std::equal(op.begin(), op.end(), od.begin(), [](T a, T b) { return to_float(a) == to_float(b); }));
      CHECK(lp == ld);
      run_forward<tile_32x64, 64, sliding_window_mask>(p, paged.padded(), {50, 3}, 0.125f, op, lp);
      CHECK(std::equal(op.begin(), op.end(), od.begin(), [](T a, T b) { return to_float(a) == to_float(b); }));
      CHECK(lp == ld);
    }
  const auto exact = exact_forward<sliding_window_mask>(p, {50, 3}, 0.125);
  check_rule(od, ld, exact);
}

TEST_CASE("cpu forward: variants run paged as dense, and on the baseline ISA copy") {
  // Keys are rotated at their index in the source, which paging does not change: paged and
  // dense give the same bits. Few-row (decode) and GEMM paths, both compiled copies.
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  using V = softcap<rotary<sliding_window_mask, rotary_layout::interleaved>>;
  const V::params vp{{{50, 3}, 10000.f, 0}, 4.f};
  const auto p = make_problem<bfloat16>(rng, {1, 20, 7}, {33, 64, 300}, 8, 2, 64, 2.f);
  const auto exact = exact_forward<V>(p, vp, 0.125);
  struct pin {
    ~pin() { cpu::cpu_isa_choice() = cpu::isa_choice::best; }
  } restore;
  for (auto isa : {cpu::isa_choice::best, cpu::isa_choice::baseline}) {
    cpu::cpu_isa_choice() = isa;
    INFO("isa " << (isa == cpu::isa_choice::best ? "best" : "baseline"));
    std::vector<bfloat16> od, op;
    std::vector<float> ld, lp;
    run_forward<tile_32x64, 64, V>(p, p.kv_view(), vp, 0.125f, od, ld);
    check_rule(od, ld, exact);
    for (int page : {1, 16})
      for (auto layout : {kv_layout::nhd, kv_layout::hnd}) {
        INFO("page size " << page << (layout == kv_layout::nhd ? " NHD" : " HND"));
        const auto paged = make_paged(p, page, layout, rng);
        run_forward<tile_32x64, 64, V>(p, paged.csr(), vp, 0.125f, op, lp);
        CHECK(std::equal(op.begin(), op.end(), od.begin(), [](auto a, auto b) { return to_float(a) == to_float(b); }));
        CHECK(lp == ld);
      }
  }
}

TEST_CASE("cpu forward: the result does not depend on the thread count") {
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const auto p = make_problem<float>(rng, {100, 37}, {100, 200}, 6, 2, 64);
  std::vector<float> o1(p.q_elems()), o3(p.q_elems()), l1(p.lse_elems()), l3(p.lse_elems());
  cpu::thread_pool one(1), three(3);
  cpu::attention_forward<tile_32x64, 64, causal_mask>(p.q_view(), p.kv_view(), 2, {}, 0.1f,
                                                      dense_tensor<float>{o1.data(), p.q_layout()}, l1.data(), one);
  cpu::attention_forward<tile_32x64, 64, causal_mask>(p.q_view(), p.kv_view(), 2, {}, 0.1f,
                                                      dense_tensor<float>{o3.data(), p.q_layout()}, l3.data(), three);
  CHECK(o1 == o3);
  CHECK(l1 == l3);
}

TEST_CASE("cpu forward: the baseline (non-AVX2) compiled copy passes the same checks") {
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  struct pin {  // restore the choice even when a check throws
    pin() { cpu::cpu_isa_choice() = cpu::isa_choice::baseline; }
    ~pin() { cpu::cpu_isa_choice() = cpu::isa_choice::best; }
  } pinned;
  CHECK_FALSE(cpu::use_avx2_path());
  check_case<tile_32x64, 64, causal_mask, float>(rng, {63}, {130}, 4, 1);
  check_case<tile_32x64, 64, causal_mask, float>(rng, {1, 1}, {77, 150}, 8, 2);  // few-row path
  check_case<tile_shape<8, 16>, 128, sliding_window_mask, bfloat16>(rng, {1, 40}, {200, 90}, 4, 1, {50, 4});
  check_case<tile_shape<128, 64>, 80, no_mask, half>(rng, {65}, {7}, 2, 2);
}
