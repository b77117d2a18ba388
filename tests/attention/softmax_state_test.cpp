#include <doctest/doctest.h>

#include <cmath>
#include <random>
#include <vector>

#include "kvtile/attention/softmax_state.hpp"
#include "support/test_util.hpp"

using namespace kvtile::attention;

namespace {
// Absorb scores s (base 2) with values v (one element) into a state, tile by tile.
softmax_state<1> absorb(const std::vector<float>& s, const std::vector<float>& v, std::size_t tile) {
  softmax_state<1> st;
  st.init();
  for (std::size_t t0 = 0; t0 < s.size(); t0 += tile) {
    float mx = neg_inf;
    for (std::size_t j = t0; j < std::min(s.size(), t0 + tile); ++j) mx = std::max(mx, s[j]);
    const float base = st.enter_tile(mx);
    for (std::size_t j = t0; j < std::min(s.size(), t0 + tile); ++j) {
      const float p = exp2_approx(s[j] - base);
      st.l += p;
      st.o[0] += p * v[j];
    }
  }
  return st;
}
}  // namespace

TEST_CASE("online softmax over tiles equals the two-pass softmax; merge is order-free") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (int trial = 0; trial < 50; ++trial) {
    const std::size_t n = 1 + rng() % 300;
    auto s = kvtile_test::random_vector<float>(n, rng, -30.f, 30.f);
    auto v = kvtile_test::random_vector<float>(n, rng);
    if (trial % 5 == 0) s[rng() % n] = 1e4f;  // large logit: no overflow
    double mx = -INFINITY, l = 0, o = 0;
    for (float x : s) mx = std::max(mx, double(x));
    for (std::size_t j = 0; j < n; ++j) {
      l += std::exp2(double(s[j]) - mx);
      o += std::exp2(double(s[j]) - mx) * v[j];
    }
    const double want_o = o / l, want_lse = (mx + std::log2(l)) * std::log(2.0);
    for (std::size_t tile : {1u, 7u, 64u}) {
      auto st = absorb(s, v, tile);
      const float lse = st.lse();
      st.normalize();
      CHECK(st.o[0] == doctest::Approx(want_o).epsilon(1e-4));
      CHECK(lse == doctest::Approx(want_lse).epsilon(1e-5));
    }
    const std::size_t cut = rng() % (n + 1);
    auto a = absorb({s.begin(), s.begin() + cut}, {v.begin(), v.begin() + cut}, 16);
    auto b = absorb({s.begin() + cut, s.end()}, {v.begin() + cut, v.end()}, 16);
    auto ab = a, ba = b;
    ab.merge(b);
    ba.merge(a);
    CHECK(ab.lse() == doctest::Approx(want_lse).epsilon(1e-5));
    CHECK(ba.lse() == doctest::Approx(want_lse).epsilon(1e-5));
    ab.normalize();
    CHECK(ab.o[0] == doctest::Approx(want_o).epsilon(1e-4));

    // The same split through the public merge of finished (normalised) rows.
    const float la = a.lse(), lb = b.lse();
    a.normalize();
    b.normalize();
    const auto w = merge_lse(la, lb);
    CHECK(w.lse == doctest::Approx(want_lse).epsilon(1e-5));
    CHECK(w.wa * a.o[0] + w.wb * b.o[0] == doctest::Approx(want_o).epsilon(1e-4));
  }
}

TEST_CASE("empty states: merging two gives an empty state, never NaN") {
  softmax_state<4> a, b;
  a.init();
  b.init();
  a.merge(b);
  CHECK(a.m == neg_inf);
  CHECK(a.l == 0.f);
  CHECK(a.lse() == neg_inf);
  a.normalize();
  for (float x : a.o) CHECK(x == 0.f);
  // A fully masked tile (max -inf) entering an empty state keeps it empty.
  const float base = a.enter_tile(neg_inf);
  CHECK(exp2_approx(neg_inf - base) == 0.f);
  CHECK(!std::isnan(a.l));
  const auto w = merge_lse(neg_inf, neg_inf);
  CHECK(w.wa == 0.f);
  CHECK(w.wb == 0.f);
  CHECK(w.lse == neg_inf);
  const auto w1 = merge_lse(neg_inf, 2.f);
  CHECK(w1.wa == 0.f);
  CHECK(w1.wb == 1.f);
  CHECK(w1.lse == 2.f);
}
