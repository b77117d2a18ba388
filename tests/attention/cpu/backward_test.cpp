// The CPU backward (dQ, dK, dV recomputed from the saved LSE) against the fp64 backward
// reference, and the fp64 reference against finite differences of the fp64 forward.
#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "attention/cpu/attention_cases.hpp"
#include "kvtile/attention/cpu/backward.hpp"
#include "kvtile/attention/reference_backward.hpp"

using namespace kvtile_test;
namespace cpu = kvtile::attention::cpu;

namespace {

struct grads_double {
  std::vector<double> dq, dk, dv;
};

template <class Mask, class T>
grads_double exact_backward(const problem<T>& p, const std::vector<T>& d_o, typename Mask::params mp, double scale) {
  grads_double g;
  g.dq.assign(p.q_elems(), std::numeric_limits<double>::quiet_NaN());
  g.dk.assign(p.k.size(), std::numeric_limits<double>::quiet_NaN());
  g.dv.assign(p.v.size(), std::numeric_limits<double>::quiet_NaN());
  reference_attention_backward<Mask>(p.q_view(), p.kv_view(), p.hk, mp, scale, dense_tensor<const T>{d_o.data(), p.q_layout()},
                                     dense_tensor<double>{g.dq.data(), p.q_layout()},
                                     dense_tensor<double>{g.dk.data(), p.kv_layout()},
                                     dense_tensor<double>{g.dv.data(), p.kv_layout()});
  return g;
}

template <class G>
struct grads {
  std::vector<G> dq, dk, dv;
};

// Forward (to get O and LSE), then backward into poisoned gradients.
template <class Tile, int D, class Mask, class G, class T, class Src>
grads<G> kernel_backward(const problem<T>& p, const Src& kv, const std::vector<T>& d_o, typename Mask::params mp,
                         float scale) {
  std::vector<T> o(p.q_elems());
  std::vector<float> lse(p.lse_elems());
  cpu::attention_forward<Tile, D, Mask>(p.q_view(), kv, p.hk, mp, scale, dense_tensor<T>{o.data(), p.q_layout()},
                                        lse.data());
  grads<G> g;
  g.dq.assign(p.q_elems(), poison<G>());
  g.dk.assign(p.k.size(), poison<G>());
  g.dv.assign(p.v.size(), poison<G>());
  cpu::attention_backward<Tile, D, Mask>(p.q_view(), kv, p.hk, mp, scale, dense_tensor<const T>{o.data(), p.q_layout()},
                                         lse.data(), dense_tensor<const T>{d_o.data(), p.q_layout()},
                                         dense_tensor<G>{g.dq.data(), p.q_layout()},
                                         dense_tensor<G>{g.dk.data(), p.kv_layout()},
                                         dense_tensor<G>{g.dv.data(), p.kv_layout()});
  return g;
}

// Tolerance relative to the gradient's own size: fp32 arithmetic on exactly-converted inputs,
// plus the storage rounding of O (used in D = dO . O) and of the gradients themselves.
template <class T, class G>
double grad_tolerance(const std::vector<double>& ref) {
  double mx = 0;
  for (double x : ref) mx = std::max(mx, std::abs(x));
  const double eps_t = std::is_same_v<T, float> ? 0 : std::is_same_v<T, half> ? 1e-3 : 8e-3;
  const double eps_g = std::is_same_v<G, float> ? 0 : eps_t;
  return (2e-5 + 4 * eps_t + eps_g) * std::max(1.0, mx);
}

template <class Tile, int D, class Mask, class T, class G = float>
void check_backward(std::mt19937_64& rng, const std::vector<int>& q_lens, const std::vector<int>& kv_lens, int hq,
                    int hk, typename Mask::params mp = {}) {
  INFO("mask " << std::string(Mask::name) << ", " << std::string(element_name<T>) << " -> " << std::string(std::is_same_v<G, float> ? "fp32" : element_name<G>)
               << ", D " << D << ", tile " << Tile::block_q << "x" << Tile::block_kv << ", heads " << hq << "/" << hk
               << ", q_len[0] " << q_lens[0] << ", kv_len[0] " << kv_lens[0]);
  const auto p = make_problem<T>(rng, q_lens, kv_lens, hq, hk, D);
  const auto d_o = random_vector<T>(p.q_elems(), rng);
  const float scale = 1.f / std::sqrt(float(D));
  const auto ref = exact_backward<Mask>(p, d_o, mp, scale);
  const auto got = kernel_backward<Tile, D, Mask, G>(p, p.kv_view(), d_o, mp, scale);
  const auto eq = compare(got.dq, ref.dq), ek = compare(got.dk, ref.dk), ev = compare(got.dv, ref.dv);
  INFO("max err dQ " << eq.max_abs << ", dK " << ek.max_abs << ", dV " << ev.max_abs);
  CHECK_FALSE((eq.any_nan || ek.any_nan || ev.any_nan));
  CHECK(eq.max_abs <= grad_tolerance<T, G>(ref.dq));
  CHECK(ek.max_abs <= grad_tolerance<T, G>(ref.dk));
  CHECK(ev.max_abs <= grad_tolerance<T, G>(ref.dv));
}

// The largest |(loss(x + h e_i) - loss(x - h e_i)) / 2h - grad[i]| over the elements of x (each
// restored after), and the largest |grad[i]|.
template <class X, class G, class Loss>
std::pair<double, double> central_difference_error(std::vector<X>& x, const std::vector<G>& grad, X h, Loss&& loss) {
  double worst = 0, gmax = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const X keep = x[i];
    x[i] = keep + h;
    const double lp = loss();
    x[i] = keep - h;
    const double lm = loss();
    x[i] = keep;
    worst = std::max(worst, std::abs((lp - lm) / (2 * double(h)) - double(grad[i])));
    gmax = std::max(gmax, std::abs(double(grad[i])));
  }
  return {worst, gmax};
}

// The fp64 reference's gradients against central differences of L = sum(dO * O) through the
// fp64 forward (reference_attention, which applies the same variant), on a tiny problem: q_len
// queries of 2 heads on 1 KV head (GQA), kv_len keys, head dim d.
template <class Mask>
void check_reference_by_finite_differences(std::mt19937_64& rng, int q_len, int kv_len, int d,
                                           typename Mask::params mp, double scale) {
  INFO("mask " << std::string(Mask::name) << ", q_len " << q_len << ", kv_len " << kv_len << ", D " << d);
  auto p = make_problem<float>(rng, {q_len}, {kv_len}, 2, 1, d);
  std::vector<double> qd(p.q.begin(), p.q.end()), kd(p.k.begin(), p.k.end()), vd(p.v.begin(), p.v.end());
  const auto d_o = random_vector<float>(p.q_elems(), rng);
  auto loss = [&] {
    std::vector<double> o(p.q_elems());
    reference_attention<Mask>(dense_tensor<const double>{qd.data(), p.q_layout()},
                              dense_kv<const double>{kd.data(), vd.data(), p.kv_layout()}, 1, mp, scale,
                              dense_tensor<double>{o.data(), p.q_layout()});
    double l = 0;
    for (std::size_t i = 0; i < o.size(); ++i) l += double(d_o[i]) * o[i];
    return l;
  };
  grads_double g;
  g.dq.resize(qd.size());
  g.dk.resize(kd.size());
  g.dv.resize(vd.size());
  reference_attention_backward<Mask>(
      dense_tensor<const double>{qd.data(), p.q_layout()}, dense_kv<const double>{kd.data(), vd.data(), p.kv_layout()}, 1,
      mp, scale, dense_tensor<const float>{d_o.data(), p.q_layout()}, dense_tensor<double>{g.dq.data(), p.q_layout()},
      dense_tensor<double>{g.dk.data(), p.kv_layout()}, dense_tensor<double>{g.dv.data(), p.kv_layout()});
  auto fd_check = [&](std::vector<double>& x, const std::vector<double>& grad, const char* what) {
    INFO(what);
    const auto [worst, gmax] = central_difference_error(x, grad, 1e-5, loss);
    CHECK(gmax > 1e-3);  // the check is not vacuous
    CHECK(worst < 1e-7);
  };
  fd_check(qd, g.dq, "dQ");
  fd_check(kd, g.dk, "dK");
  fd_check(vd, g.dv, "dV");
}

}  // namespace

TEST_CASE("cpu backward: fp32 against the fp64 backward reference, odd sizes and every mask") {
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const int pairs[][2] = {{1, 1}, {7, 7}, {63, 65}, {65, 63}, {1, 200}, {7, 130}, {5, 3}};
  for (const auto& pr : pairs) {
    check_backward<tile_shape<32, 64>, 64, no_mask, float>(rng, {pr[0]}, {pr[1]}, 4, 1);
    check_backward<tile_shape<32, 64>, 64, causal_mask, float>(rng, {pr[0]}, {pr[1]}, 5, 1);
    check_backward<tile_shape<32, 64>, 64, sliding_window_mask, float>(rng, {pr[0]}, {pr[1]}, 2, 2, {20, 3});
  }
  check_backward<tile_shape<64, 64>, 64, causal_mask, float>(rng, {1, 30, 0, 65}, {50, 30, 4, 100}, 8, 2);  // varlen
}

TEST_CASE("cpu backward: head dims, GQA groups, low precision, every shipped tile shape") {
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  check_backward<tile_shape<32, 64>, 80, causal_mask, float>(rng, {20}, {33}, 4, 2);
  check_backward<tile_shape<32, 64>, 96, no_mask, float>(rng, {20}, {33}, 2, 1);
  check_backward<tile_shape<32, 64>, 128, causal_mask, bfloat16>(rng, {40}, {70}, 4, 2);
  check_backward<tile_shape<32, 64>, 128, causal_mask, bfloat16, bfloat16>(rng, {40}, {70}, 4, 2);
  check_backward<tile_shape<32, 64>, 256, sliding_window_mask, half>(rng, {9}, {40}, 2, 1, {11, 2});
  check_backward<tile_shape<32, 64>, 64, causal_mask, half, half>(rng, {9}, {40}, 2, 1);
  for (int group : {1, 4, 5, 7, 8, 16}) check_backward<tile_shape<32, 64>, 64, causal_mask, float>(rng, {9}, {21}, group, 1);
  auto tile = [&]<class Tile>() {
    check_backward<Tile, 64, causal_mask, float>(rng, {70}, {150}, 4, 2);
    check_backward<Tile, 128, sliding_window_mask, bfloat16>(rng, {1, 40}, {200, 90}, 2, 1, {50, 4});
  };
  tile.template operator()<tile_shape<8, 16>>();
  tile.template operator()<tile_shape<16, 32>>();
  tile.template operator()<tile_shape<16, 64>>();
  tile.template operator()<tile_shape<32, 64>>();
  tile.template operator()<tile_shape<64, 64>>();
  tile.template operator()<tile_shape<64, 128>>();
  tile.template operator()<tile_shape<128, 64>>();
  tile.template operator()<tile_shape<128, 128>>();
}

TEST_CASE("cpu backward: variants (rotary at query and key positions, soft-capping) against the fp64 reference") {
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  using rot = rotary<causal_mask>;
  using rot_il = rotary<sliding_window_mask, rotary_layout::interleaved>;
  using capped = softcap<causal_mask>;
  using capped_rot = softcap<rotary<causal_mask>>;
  check_backward<tile_shape<32, 64>, 64, rot, float>(rng, {63}, {65}, 4, 1, {{}, 10000.f, 0});
  check_backward<tile_shape<32, 64>, 64, rot, float>(rng, {1, 30, 0, 65}, {50, 30, 4, 100}, 8, 2, {{}, 500.f, 0});
  check_backward<tile_shape<32, 64>, 128, rot, bfloat16>(rng, {40}, {70}, 5, 1, {{}, 10000.f, 32});  // partial
  check_backward<tile_shape<16, 32>, 64, rot_il, float>(rng, {70}, {150}, 4, 2, {{20, 3}, 1000.f, 0});
  check_backward<tile_shape<32, 64>, 96, rot_il, half, half>(rng, {9}, {40}, 2, 1, {{11, 2}, 10000.f, 48});
  check_backward<tile_shape<32, 64>, 64, capped, float>(rng, {65}, {63}, 5, 1, {{}, 0.5f});
  check_backward<tile_shape<64, 64>, 128, capped_rot, bfloat16>(rng, {1, 40}, {200, 90}, 8, 1, {{{}, 10000.f, 0}, 1.f});
}

TEST_CASE("cpu backward: fully masked rows get dQ = 0; paged K/V gives the dense gradients") {
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const auto p = make_problem<float>(rng, {12, 20}, {4, 100}, 4, 2, 64);  // rows 0..7 of sequence 0 see nothing
  const auto d_o = random_vector<float>(p.q_elems(), rng);
  const auto dense = kernel_backward<tile_shape<32, 64>, 64, causal_mask, float>(p, p.kv_view(), d_o, {}, 0.125f);
  const auto ref = exact_backward<causal_mask>(p, d_o, {}, 0.125);
  CHECK(compare(dense.dq, ref.dq).max_abs <= grad_tolerance<float, float>(ref.dq));
  CHECK(compare(dense.dk, ref.dk).max_abs <= grad_tolerance<float, float>(ref.dk));
  for (int r = 0; r < 8; ++r)
    for (int x = 0; x < 4 * 64; ++x) CHECK(dense.dq[r * 4 * 64 + x] == 0.f);
  for (int page : {1, 16})
    for (auto layout : {kv_layout::nhd, kv_layout::hnd}) {
      INFO("page size " << page);
      const auto paged = make_paged(p, page, layout, rng);
      const auto g = kernel_backward<tile_shape<32, 64>, 64, causal_mask, float>(p, paged.csr(), d_o, {}, 0.125f);
      CHECK(g.dq == dense.dq);
      CHECK(g.dk == dense.dk);
      CHECK(g.dv == dense.dv);
    }
}

TEST_CASE("fp64 backward reference agrees with finite differences of the fp64 forward") {
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  // 3 queries of 2 heads on 1 KV head (GQA), 5 keys, D = 4, causal + sinks window.
  check_reference_by_finite_differences<sliding_window_mask>(rng, 3, 5, 4, {2, 1}, 0.7);
}

TEST_CASE("fp64 backward reference with soft-capping agrees with finite differences of the fp64 forward") {
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  // A low cap (0.8) against scores up to ~3, so that tanh saturates and its derivative matters.
  check_reference_by_finite_differences<softcap<sliding_window_mask>>(rng, 4, 6, 8, {{4, 1}, 0.8f}, 1.3);
}

TEST_CASE("fp64 backward reference with rotary embeddings agrees with finite differences of the fp64 forward") {
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  // Queries at positions 2..5 (bottom-right aligned), theta 100 so that every pair turns.
  check_reference_by_finite_differences<rotary<causal_mask>>(rng, 4, 6, 8, {{}, 100.f, 0}, 0.9);
  // Interleaved pairs on 4 of 8 dims (the rest pass), under a window and soft-capping.
  using interleaved_t = softcap<rotary<sliding_window_mask, rotary_layout::interleaved>>;
  check_reference_by_finite_differences<interleaved_t>(rng, 5, 7, 8, {{{3, 1}, 50.f, 4}, 1.1f}, 1.2);
}

TEST_CASE("cpu backward: finite differences of the CPU forward itself (fp32, tiny shape)") {
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  auto p = make_problem<float>(rng, {5}, {9}, 4, 2, 16);
  const auto d_o = random_vector<float>(p.q_elems(), rng);
  const float scale = 0.5f;
  auto loss = [&] {
    std::vector<float> o(p.q_elems());
    cpu::attention_forward<tile_shape<8, 16>, 16, causal_mask>(p.q_view(), p.kv_view(), 2, {}, scale,
                                                               dense_tensor<float>{o.data(), p.q_layout()});
    double l = 0;
    for (std::size_t i = 0; i < o.size(); ++i) l += double(d_o[i]) * o[i];
    return l;
  };
  const auto g = kernel_backward<tile_shape<8, 16>, 16, causal_mask, float>(p, p.kv_view(), d_o, {}, scale);
  auto fd_check = [&](std::vector<float>& x, const std::vector<float>& grad, const char* what) {
    INFO(what);
    const double worst = central_difference_error(x, grad, 1e-2f, loss).first;
    CHECK(worst < 2e-3);  // O(h^2) truncation plus fp32 noise / h
  };
  fd_check(p.q, g.dq, "dQ");
  fd_check(p.k, g.dk, "dK");
  fd_check(p.v, g.dv, "dV");
}

TEST_CASE("cpu backward: the baseline (non-AVX2) compiled copy passes the same checks") {
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  struct pin {
    pin() { cpu::cpu_isa_choice() = cpu::isa_choice::baseline; }
    ~pin() { cpu::cpu_isa_choice() = cpu::isa_choice::best; }
  } pinned;
  check_backward<tile_shape<32, 64>, 64, causal_mask, float>(rng, {65}, {63}, 5, 1);
  check_backward<tile_shape<64, 64>, 128, sliding_window_mask, bfloat16>(rng, {1, 40}, {200, 90}, 2, 1, {50, 4});
}
