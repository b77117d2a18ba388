// The rotate-once pass of cuda::prefill's rotary variants (attention/cuda/prefill/rotate.cuh)
// run on the host through tests/emulation, a thread per CUDA thread: every row of Q and K
// against the rotation at the variant's positions with the pass's cosine and sine
// (rotary_cos_sin_fast; the emulation's __sincosf is the host's), bit for bit, and within a
// rounding of the accurate rotation (rotary_rotate_row), for half-split and interleaved layouts, partial
// rotary dims, fixed and varlen Q, strided K; rows outside the tensors stay untouched. The
// inverse pass (cuda::backward's, in place) likewise. Also the variant without its rotation
// (rotary_stripped) and its parameters.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <random>
#include <vector>

#include <cuda_runtime.h>  // the emulation's

#include "kvtile/attention/cuda/prefill/rotate.cuh"
#include "kvtile/attention/variant.hpp"
#include "support/test_util.hpp"

namespace {

using namespace kvtile;
using namespace kvtile::attention;
namespace kd = kvtile::attention::cuda::detail;

template <class T>
bool same_bits(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

// Checks every row of every sequence of one side (K when Keys) against the host rotation (back,
// when Inverse: R(pos)^T = R(-pos)); dst started poisoned (or, in place, as src), and its
// elements outside the rows must have stayed so.
template <class T, int D, class V, bool Keys, bool Inverse = false>
void check_side(const std::vector<T>& src, const std::vector<T>& dst, const ragged_layout& ql, const ragged_layout& kl,
                const typename V::params& vp, bool in_place = false) {
  const ragged_layout& l = Keys ? kl : ql;
  std::vector<bool> written(src.size(), false);
  for (int b = 0; b < l.batch; ++b) {
    const V v(vp, ql.len_of(b), kl.len_of(b));
    const int r = v.rotary_dims(D);
    std::vector<float> inv(std::size_t(r / 2));
    for (int k = 0; k < r / 2; ++k) inv[std::size_t(k)] = rotary_inv_freq(k, r, v.rotary_theta());
    for (int t = 0; t < l.len_of(b); ++t)
      for (int h = 0; h < l.heads; ++h) {
        const std::int64_t o = l.offset(b, t, h);
        float x[D];
        for (int i = 0; i < D; ++i) x[i] = float(src[std::size_t(o + i)]);
        float exact[D];
        std::copy(x, x + D, exact);
        const int pos = Keys ? v.key_position(t) : v.query_position(t);
        rotary_rotate_row<V::rotary_layout_v>(exact, r, Inverse ? -pos : pos, inv.data());
        // The pass's own formula: the decode kernels' reduced hardware sine and cosine.
        for (int k = 0; k < r / 2; ++k) {
          float c, s;
          kvtile::attention::cuda::rotary_cos_sin_fast(float(pos), inv[std::size_t(k)], c, s);
          rotary_rotate_pair(x[rotary_pair_first<V::rotary_layout_v>(k, r)], x[rotary_pair_second<V::rotary_layout_v>(k, r)],
                             c, Inverse ? -s : s);
        }
        for (int i = 0; i < D; ++i) {
          INFO("sequence " << b << " token " << t << " head " << h << " dim " << i << (Keys ? " (K)" : " (Q)"));
          REQUIRE(same_bits(dst[std::size_t(o + i)], T(x[i])));
          // and within a rounding of T of the accurate sincosf's rotation
          REQUIRE(std::fabs(float(dst[std::size_t(o + i)]) - exact[i]) <= 1e-2f * std::fabs(exact[i]) + 1e-6f);
          written[std::size_t(o + i)] = true;
        }
      }
  }
  for (std::size_t i = 0; i < dst.size(); ++i)
    if (!written[i]) REQUIRE(same_bits(dst[i], in_place ? src[i] : kvtile_test::poison<T>()));
}

// Runs the pass (one launch: Q and K) as cuda::prefill launches it and checks both sides.
template <class T, int D, class V>
void check_rotation(const std::vector<T>& q, const std::vector<T>& k, const ragged_layout& ql, const ragged_layout& kl,
                    std::int64_t q_rows_bound, const typename V::params& vp) {
  std::vector<T> q2(q.size(), kvtile_test::poison<T>()), k2(k.size(), kvtile_test::poison<T>());
  const kd::rotate_side<T> qs{{q.data(), ql}, {q2.data(), ql}}, ks{{k.data(), kl}, {k2.data(), kl}};
  const int tasks = kd::rotate_row_tasks<D, V::rotary_layout_v>(V(vp, 1, 1).rotary_dims(D));
  const dim3 grid = kd::rotate_rows_grid(q_rows_bound, std::int64_t(kl.len) * kl.heads, tasks, ql.batch);
  CHECK(grid.z == 2);
  emu::launch(grid, kd::rotate_threads, 0, [&](unsigned char*) { kd::rotate_rows_cta<T, D, V>(qs, ks, ql, kl, vp); });
  check_side<T, D, V, false>(q, q2, ql, kl, vp);
  check_side<T, D, V, true>(k, k2, ql, kl, vp);
}

// The inverse pass in place (as cuda::backward runs it on dQ and dK): copies of q and k rotated
// back where they lie, every other element left as it was.
template <class T, int D, class V>
void check_inverse_in_place(const std::vector<T>& q, const std::vector<T>& k, const ragged_layout& ql,
                            const ragged_layout& kl, std::int64_t q_rows_bound, const typename V::params& vp) {
  std::vector<T> q2 = q, k2 = k;
  const kd::rotate_side<T> qs{{q2.data(), ql}, {q2.data(), ql}}, ks{{k2.data(), kl}, {k2.data(), kl}};
  const int tasks = kd::rotate_row_tasks<D, V::rotary_layout_v>(V(vp, 1, 1).rotary_dims(D));
  const dim3 grid = kd::rotate_rows_grid(q_rows_bound, std::int64_t(kl.len) * kl.heads, tasks, ql.batch);
  emu::launch(grid, kd::rotate_threads, 0, [&](unsigned char*) { kd::rotate_rows_cta<T, D, V, true>(qs, ks, ql, kl, vp); });
  check_side<T, D, V, false, true>(q, q2, ql, kl, vp, true);
  check_side<T, D, V, true, true>(k, k2, ql, kl, vp, true);
}

}  // namespace

TEST_CASE("emulated rotate-once pass: Q at query positions (bottom-right aligned), K at key positions, both layouts") {
  std::mt19937_64 rng(kvtile_test::fresh_seed());
  constexpr int D = 64;
  // Fixed Q (2 x 5 tokens, 4 heads) over fixed K (2 x 9 tokens, 2 heads) whose rows are strided
  // (K interleaved with V: a token stride of twice the heads).
  ragged_layout ql = ragged_layout::fixed(2, 5, 4, D);
  ragged_layout kl = ragged_layout::fixed(2, 9, 2, D);
  kl.stride_token = 2 * 2 * D;
  kl.stride_batch = 9 * kl.stride_token;
  const auto q = kvtile_test::random_vector<bfloat16>(std::size_t(2 * 5 * 4 * D), rng);
  const auto k = kvtile_test::random_vector<bfloat16>(std::size_t(2 * 9 * 4 * D), rng);
  using half_split = rotary<causal_mask>;
  check_rotation<bfloat16, D, half_split>(q, k, ql, kl, 5 * 4, {});
  using inter = rotary<sliding_window_mask, rotary_layout::interleaved>;
  inter::params ip;
  ip.window = 3;
  ip.rotary_dim = 32;  // dims [32, 64) copied
  ip.theta = 500.f;
  check_rotation<bfloat16, D, inter>(q, k, ql, kl, 5 * 4, ip);
  // Half-split over partial dims (R = 32 of 64: one rotated task and four copied a row).
  half_split::params hp;
  hp.rotary_dim = 32;
  check_rotation<bfloat16, D, half_split>(q, k, ql, kl, 5 * 4, hp);
  // Enough rows for every task slot of a thread (kd::rotate_tasks_per_thread) and two CTAs a side.
  const ragged_layout ql3 = ragged_layout::fixed(1, 70, 4, D), kl3 = ragged_layout::fixed(1, 75, 4, D);
  const auto q3 = kvtile_test::random_vector<bfloat16>(std::size_t(70 * 4 * D), rng);
  const auto k3 = kvtile_test::random_vector<bfloat16>(std::size_t(75 * 4 * D), rng);
  static_assert(70 * 4 * (D / 16) > kd::rotate_items_per_cta, "two CTAs on the Q side");
  check_rotation<bfloat16, D, half_split>(q3, k3, ql3, kl3, 70 * 4, {});
  // Varlen Q (3, 1, 4 tokens; the grid's bound from the longest) over fixed K of 6.
  const std::vector<std::int32_t> qptr{0, 3, 4, 8};
  const ragged_layout qv = ragged_layout::varlen(qptr.data(), 3, 4, D);
  const ragged_layout kf = ragged_layout::fixed(3, 6, 4, D);
  const auto q2 = kvtile_test::random_vector<half>(std::size_t(8 * 4 * D), rng);
  const auto k2 = kvtile_test::random_vector<half>(std::size_t(3 * 6 * 4 * D), rng);
  check_rotation<half, D, softcap<half_split>>(q2, k2, qv, kf, 4 * 4, {});
}

TEST_CASE("emulated inverse rotate pass, in place: both layouts, partial dims, strided K, varlen Q, two CTAs a side") {
  std::mt19937_64 rng(kvtile_test::fresh_seed());
  constexpr int D = 64;
  ragged_layout ql = ragged_layout::fixed(2, 5, 4, D);
  ragged_layout kl = ragged_layout::fixed(2, 9, 2, D);
  kl.stride_token = 2 * 2 * D;  // K interleaved with V
  kl.stride_batch = 9 * kl.stride_token;
  const auto q = kvtile_test::random_vector<bfloat16>(std::size_t(2 * 5 * 4 * D), rng);
  const auto k = kvtile_test::random_vector<bfloat16>(std::size_t(2 * 9 * 4 * D), rng);
  check_inverse_in_place<bfloat16, D, rotary<causal_mask>>(q, k, ql, kl, 5 * 4, {});
  rotary<sliding_window_mask, rotary_layout::interleaved>::params ip;
  ip.window = 3;
  ip.rotary_dim = 32;
  ip.theta = 500.f;
  check_inverse_in_place<bfloat16, D, rotary<sliding_window_mask, rotary_layout::interleaved>>(q, k, ql, kl, 5 * 4, ip);
  const ragged_layout ql3 = ragged_layout::fixed(1, 70, 4, D), kl3 = ragged_layout::fixed(1, 75, 4, D);
  const auto q3 = kvtile_test::random_vector<half>(std::size_t(70 * 4 * D), rng);
  const auto k3 = kvtile_test::random_vector<half>(std::size_t(75 * 4 * D), rng);
  check_inverse_in_place<half, D, rotary<causal_mask>>(q3, k3, ql3, kl3, 70 * 4, {});
  const std::vector<std::int32_t> qptr{0, 3, 4, 8};
  const ragged_layout qv = ragged_layout::varlen(qptr.data(), 3, 4, D);
  const ragged_layout kf = ragged_layout::fixed(3, 6, 4, D);
  const auto q2 = kvtile_test::random_vector<half>(std::size_t(8 * 4 * D), rng);
  const auto k2 = kvtile_test::random_vector<half>(std::size_t(3 * 6 * 4 * D), rng);
  rotary<causal_mask>::params hp;
  hp.rotary_dim = 32;
  check_inverse_in_place<half, D, softcap<rotary<causal_mask>>>(q2, k2, qv, kf, 4 * 4, {hp, 30.f});
}

TEST_CASE("rotary_stripped: the variant without its rotation, and its parameters") {
  static_assert(std::is_same_v<rotary_stripped_t<rotary<causal_mask>>, causal_mask>);
  static_assert(std::is_same_v<rotary_stripped_t<softcap<rotary<sliding_window_mask>>>, softcap<sliding_window_mask>>);
  static_assert(std::is_void_v<rotary_stripped_t<causal_mask>>);
  static_assert(std::is_void_v<rotary_stripped_t<softcap<causal_mask>>>);
  softcap<rotary<sliding_window_mask>>::params p;
  p.window = 7;
  p.sinks = 2;
  p.theta = 123.f;
  p.cap = 9.f;
  const auto s = rotary_stripped<softcap<rotary<sliding_window_mask>>>::params(p);
  CHECK(s.window == 7);
  CHECK(s.sinks == 2);
  CHECK(s.cap == 9.f);
}
