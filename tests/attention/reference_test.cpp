#include <doctest/doctest.h>

#include <cmath>
#include <random>
#include <vector>

#include "kvtile/attention/reference.hpp"
#include "support/test_util.hpp"

using namespace kvtile;
using namespace kvtile::attention;

TEST_CASE("reference: identical keys average the values; GQA maps heads by group") {
  const int kv_len = 5, hq = 4, hk = 2, d = 3;
  std::vector<float> q(hq * d, 0.5f), k(kv_len * hk * d, 1.0f), v(kv_len * hk * d);
  for (int j = 0; j < kv_len; ++j)
    for (int h = 0; h < hk; ++h)
      for (int x = 0; x < d; ++x) v[(j * hk + h) * d + x] = float(j + 10 * h);
  std::vector<double> o(hq * d), lse(hq);
  dense_tensor<const float> qt{q.data(), ragged_layout::fixed(1, 1, hq, d)};
  dense_kv<const float> src{k.data(), v.data(), ragged_layout::fixed(1, kv_len, hk, d)};
  reference_attention<no_mask>(qt, src, hk, {}, 1.0, {o.data(), ragged_layout::fixed(1, 1, hq, d)}, lse.data());
  for (int h = 0; h < hq; ++h) {
    CHECK(o[h * d] == doctest::Approx(2.0 + 10 * (h / 2)));
    CHECK(lse[h] == doctest::Approx(1.5 + std::log(5.0)));
  }
}

TEST_CASE("reference: fully masked rows are zeros with LSE -inf; low precision is close") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const int q_len = 6, kv_len = 3, h = 2, d = 16;  // more queries than keys: rows 0..2 see nothing
  auto q = kvtile_test::random_vector<bfloat16>(q_len * h * d, rng);
  auto k = kvtile_test::random_vector<bfloat16>(kv_len * h * d, rng);
  auto v = kvtile_test::random_vector<bfloat16>(kv_len * h * d, rng);
  std::vector<double> o(q_len * h * d, 7.0), lse(q_len * h);
  std::vector<bfloat16> ol(q_len * h * d);
  std::vector<float> lsel(q_len * h);
  const auto ql = ragged_layout::fixed(1, q_len, h, d);
  dense_kv<const bfloat16> src{k.data(), v.data(), ragged_layout::fixed(1, kv_len, h, d)};
  reference_attention<causal_mask>(dense_tensor<const bfloat16>{q.data(), ql}, src, h, {}, 0.25, {o.data(), ql}, lse.data());
  naive_attention_lowp<causal_mask>(dense_tensor<const bfloat16>{q.data(), ql}, src, h, {}, 0.25,
                                    dense_tensor<bfloat16>{ol.data(), ql}, lsel.data());
  for (int i = 0; i < 3; ++i)
    for (int hh = 0; hh < h; ++hh) {
      CHECK(std::isinf(lse[i * h + hh]));
      CHECK(lse[i * h + hh] < 0);
      for (int x = 0; x < d; ++x) CHECK(o[(i * h + hh) * d + x] == 0.0);
    }
  const auto e = kvtile_test::compare(ol, o);
  CHECK_FALSE(e.any_nan);
  CHECK(e.max_abs < 2e-2);
  CHECK(e.max_abs > 0);
}
