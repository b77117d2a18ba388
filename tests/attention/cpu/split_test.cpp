// Split-KV in the CPU forward: decode items (few rows, long KV) cut into key chunks on pools of
// 1, 2 and 3 threads, against fp64 (2x rule) and against the unsplit result (1 thread).
#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "attention/cpu/attention_cases.hpp"
#include "kvtile/attention/cpu/forward.hpp"

using namespace kvtile_test;
namespace cpu = kvtile::attention::cpu;

namespace {

struct chunk_keys {  // restores the default even when a check throws
  explicit chunk_keys(int keys) { cpu::split_kv_settings().min_chunk_keys = keys; }
  ~chunk_keys() { cpu::split_kv_settings() = {}; }
};

template <class T>
double tolerance(double x) {
  // Split and unsplit differ by the merge's fp32 rounding, then by one rounding to T.
  const double ulp = std::is_same_v<T, float> ? 1e-6 : 1.0 / 128;
  return ulp * (1 + std::abs(x));
}

template <class Tile, int D, class Mask, class T>
void check_split(std::mt19937_64& rng, int q_len, int kv_len, int group, typename Mask::params mp = {}) {
  INFO("mask " << std::string(Mask::name) << ", " << std::string(element_name<T>) << ", group " << group << ", q_len "
               << q_len << ", kv_len " << kv_len);
  const auto p = make_problem<T>(rng, {q_len}, {kv_len}, group, 1, D);
  const float scale = 1.f / std::sqrt(float(D));
  const auto exact = exact_forward<Mask>(p, mp, scale);
  std::vector<T> unsplit;
  std::vector<float> unsplit_lse;
  for (int threads : {1, 2, 3}) {
    INFO("threads " << threads);
    cpu::thread_pool pool(threads);
    std::vector<T> o(p.q_elems(), poison<T>());
    std::vector<float> lse(p.lse_elems(), std::numeric_limits<float>::quiet_NaN());
    cpu::attention_forward<Tile, D, Mask>(p.q_view(), p.kv_view(), 1, mp, scale, dense_tensor<T>{o.data(), p.q_layout()},
                                          lse.data(), pool);
    check_rule(o, lse, exact);
    if (threads == 1) {
      unsplit = o, unsplit_lse = lse;
      continue;
    }
    int far = 0;
    for (std::size_t i = 0; i < o.size(); ++i)
      far += !(std::abs(to_float(o[i]) - to_float(unsplit[i])) <= tolerance<T>(to_float(unsplit[i])));
    for (std::size_t i = 0; i < lse.size(); ++i)
      far += std::isinf(unsplit_lse[i]) ? !(lse[i] == unsplit_lse[i])
                                        : !(std::abs(lse[i] - unsplit_lse[i]) <= 1e-5 * (1 + std::abs(unsplit_lse[i])));
    CHECK(far == 0);
  }
}

}  // namespace

TEST_CASE_TEMPLATE("cpu forward split-KV: decode, batch 1, one KV head, every mask", T, float, bfloat16) {
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  chunk_keys small(200);  // several chunks at these lengths (rounded up to whole 64-key tiles)
  using tile = tile_shape<32, 64>;
  const int lens[][2] = {{1, 3000}, {3, 1000}, {8, 1001}, {5, 777}};
  int n = 0;
  for (int group : {1, 4, 5})
    for (const auto& l : lens) {
      if (++n % 2 == 0 && l[1] == 3000) continue;  // keep the fp64 reference short
      check_split<tile, 64, no_mask, T>(rng, l[0], l[1], group);
      check_split<tile, 64, causal_mask, T>(rng, l[0], l[1], group);
      // Sinks and a window: the chunks between them see no key (empty states).
      check_split<tile, 64, sliding_window_mask, T>(rng, l[0], l[1], group, {100, 4});
      check_split<tile, 64, sliding_window_mask, T>(rng, l[0], l[1], group, {33, 0});
    }
  check_split<tile_shape<8, 16>, 128, causal_mask, T>(rng, 2, 1500, 4);  // two row tiles, D 128
}

TEST_CASE("cpu forward split-KV: the default chunking on a long decode, and the switch") {
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  check_split<tile_shape<32, 64>, 64, causal_mask, float>(rng, 1, 3000, 4);
  check_split<tile_shape<32, 64>, 64, sliding_window_mask, bfloat16>(rng, 1, 3000, 8, {256, 4});
  chunk_keys off(0);  // no split: every pool gives the same bits
  check_split<tile_shape<32, 64>, 64, no_mask, float>(rng, 4, 1000, 4);
}

TEST_CASE("cpu forward split-KV: fully masked rows stay zeros with LSE -inf") {
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  chunk_keys small(64);
  // One item of 110 rows over 100 keys (bottom-right causal): rows 0..9 see no key in any chunk.
  const auto p = make_problem<float>(rng, {110}, {100}, 1, 1, 64);
  const auto exact = exact_forward<causal_mask>(p, {}, 0.125);
  for (int threads : {2, 3}) {
    INFO("threads " << threads);
    cpu::thread_pool pool(threads);
    std::vector<float> o(p.q_elems(), std::numeric_limits<float>::quiet_NaN()), lse(p.lse_elems());
    cpu::attention_forward<tile_shape<128, 64>, 64, causal_mask>(p.q_view(), p.kv_view(), 1, {}, 0.125f,
                                                                 dense_tensor<float>{o.data(), p.q_layout()}, lse.data(),
                                                                 pool);
    check_rule(o, lse, exact);
    for (int r = 0; r < 10; ++r) {
      CHECK((std::isinf(lse[r]) && lse[r] < 0));
      for (int x = 0; x < 64; ++x) CHECK(o[r * 64 + x] == 0.f);
    }
  }
}

TEST_CASE_TEMPLATE("cpu forward split-KV: variants (rotary, softcap) split as they run unsplit", T, float, bfloat16) {
  // Each chunk rotates its own keys at their positions and caps its own scores: the chunks'
  // states must merge to the unsplit result (and to fp64 through the variant-aware reference).
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  chunk_keys small(200);
  using tile = tile_shape<32, 64>;
  check_split<tile, 64, rotary<causal_mask>, T>(rng, 1, 1000, 5);
  check_split<tile, 64, rotary<no_mask, rotary_layout::interleaved>, T>(rng, 3, 777, 8);
  check_split<tile, 64, softcap<rotary<sliding_window_mask>>, T>(rng, 1, 1001, 1, {{{100, 4}, 10000.f, 0}, 2.f});
}
