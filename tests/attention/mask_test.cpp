#include <doctest/doctest.h>

#include <random>

#include "kvtile/attention/mask.hpp"
#include "support/test_util.hpp"

using namespace kvtile::attention;

namespace {
// classify must agree with visible on every element, and kv_begin/kv_end must cover every
// visible key; both checked exhaustively on small shapes.
template <class Mask>
void check_mask(typename Mask::params p, int q_len, int kv_len, int tq, int tk) {
  const Mask m(p, q_len, kv_len);
  for (int q0 = 0; q0 < q_len; q0 += tq) {
    const int q1 = std::min(q_len, q0 + tq);
    const int lo = m.kv_begin(q0, q1), hi = m.kv_end(q0, q1);
    for (int i = q0; i < q1; ++i)
      for (int j = 0; j < kv_len; ++j)
        if (m.visible(i, j)) REQUIRE((j >= lo && j < hi));
    for (int k0 = 0; k0 < kv_len; k0 += tk) {
      const int k1 = std::min(kv_len, k0 + tk);
      int seen = 0, total = 0;
      for (int i = q0; i < q1; ++i)
        for (int j = k0; j < k1; ++j) seen += m.visible(i, j), ++total;
      const auto c = m.classify(q0, q1, k0, k1);
      INFO("mask ", Mask::name, " q ", q_len, " kv ", kv_len, " tile q[", q0, ",", q1, ") k[", k0, ",", k1, ")");
      if (c == tile_visibility::empty) REQUIRE(seen == 0);
      if (c == tile_visibility::full) REQUIRE(seen == total);
    }
  }
}
}  // namespace

TEST_CASE("mask policies: tile classification agrees with the element rule") {
  for (int q_len : {1, 3, 8, 17})
    for (int kv_len : {1, 5, 8, 40})
      for (int tq : {1, 4, 16})
        for (int tk : {1, 3, 8}) {
          check_mask<no_mask>({}, q_len, kv_len, tq, tk);
          check_mask<causal_mask>({}, q_len, kv_len, tq, tk);
          for (int w : {0, 1, 4, 9})
            for (int s : {0, 1, 4}) check_mask<sliding_window_mask>({w, s}, q_len, kv_len, tq, tk);
        }
}

TEST_CASE("causal is bottom-right aligned; window keeps sinks and the recent keys") {
  const causal_mask c({}, 2, 5);  // queries at positions 3 and 4
  CHECK(c.visible(0, 3));
  CHECK_FALSE(c.visible(0, 4));
  CHECK(c.visible(1, 4));
  const causal_mask more_q({}, 4, 2);  // rows 0 and 1 see nothing
  CHECK_FALSE(more_q.visible(1, 0));
  CHECK(more_q.visible(2, 0));
  CHECK(more_q.kv_end(0, 2) == 0);
  const sliding_window_mask w({3, 2}, 1, 10);  // one query at position 9
  for (int j = 0; j < 10; ++j) CHECK(w.visible(0, j) == (j < 2 || j >= 7));
  CHECK(w.classify(0, 1, 2, 7) == tile_visibility::empty);
  CHECK(w.classify(0, 1, 7, 10) == tile_visibility::full);
  CHECK(w.classify(0, 1, 0, 2) == tile_visibility::full);
}
