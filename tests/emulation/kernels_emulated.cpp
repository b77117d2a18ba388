// The mma.sync kernels of the CUDA attention, run on the host through tests/emulation (a thread
// per CUDA thread, warp collectives as the PTX ISA defines them): a check of their index
// arithmetic, masks, GQA and varlen handling on machines without a GPU. The forward prefill
// kernel (tested on GPUs) runs first, as a check of the emulation itself; then the backward's
// pre-pass, K/V-outer kernel, post-pass and deterministic dQ kernel against the fp64 backward
// reference with FlashAttention's rule, as tests/attention/cuda/backward_test.cu does on a GPU.
// Built with -DKVTILE_EMULATION_TESTS=ON (slow: about a minute).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include <cuda_runtime.h>  // the emulation's

#include "kvtile/attention/cuda/backward/dq_kernel.cuh"
#include "kvtile/attention/cuda/backward/kernel.cuh"
#include "kvtile/attention/cuda/backward/passes.cuh"
#include "kvtile/attention/cuda/prefill/kernel.cuh"
#include "kvtile/attention/reference.hpp"
#include "kvtile/attention/reference_backward.hpp"
#include "support/test_util.hpp"

namespace {

using namespace kvtile;
using namespace kvtile::attention;

struct problem {
  std::vector<std::int32_t> q_lens, kv_lens;
  bool varlen = false;
  std::int32_t hq = 1, hkv = 1;
  float scale = 0.f;  // 0: 1/sqrt(D)
};

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::abs(x));
  return m;
}

template <class T, int D, class Mask, class Tile>
void check_prefill(int q_len, int kv_len, int hq, int hkv, typename Mask::params mp, std::mt19937_64& rng) {
  INFO("prefill D=" << D << " mask=" << Mask::name << " q_len=" << q_len << " kv_len=" << kv_len);
  const auto q = kvtile_test::random_vector<T>(std::size_t(q_len) * hq * D, rng);
  const auto k = kvtile_test::random_vector<T>(std::size_t(kv_len) * hkv * D, rng);
  const auto v = kvtile_test::random_vector<T>(std::size_t(kv_len) * hkv * D, rng);
  const auto ql = ragged_layout::fixed(1, q_len, hq, D), kl = ragged_layout::fixed(1, kv_len, hkv, D);
  const double scale = 1 / std::sqrt(double(D));
  std::vector<double> o_ref(q.size());
  reference_attention<Mask>(dense_tensor<const T>{q.data(), ql}, dense_kv<const T>{k.data(), v.data(), kl}, hkv, mp, scale,
                            dense_tensor<double>{o_ref.data(), ql});
  std::vector<T> o_low(q.size());
  naive_attention_lowp<Mask>(dense_tensor<const T>{q.data(), ql}, dense_kv<const T>{k.data(), v.data(), kl}, hkv, mp,
                             scale, dense_tensor<T>{o_low.data(), ql});
  std::vector<T> o(q.size(), kvtile_test::poison<T>());
  std::vector<float> lse(std::size_t(q_len) * hq);
  struct {
    dense_tensor<const T> q;
    dense_kv<const T> kv;
    dense_tensor<T> o;
    float* lse;
    typename Mask::params mask_params;
    float scale;
  } a{{q.data(), ql}, {k.data(), v.data(), kl}, {o.data(), ql}, lse.data(), mp, 0.f};
  using K = cuda::detail::prefill_kernel<T, D, Tile, Mask>;
  const auto p = cuda::detail::make_prefill_params<T, Mask, D>(a);
  emu::launch(cuda::detail::prefill_grid(ql, q_len, Tile::block_q), Tile::threads, K::G::smem_bytes,
              [&](unsigned char* s) { K::run(p, reinterpret_cast<T*>(s)); });
  const auto err = kvtile_test::compare(o, o_ref), base = kvtile_test::compare(o_low, o_ref);
  INFO("max_abs " << err.max_abs << ", naive " << base.max_abs);
  CHECK_FALSE(err.any_nan);
  CHECK(err.max_abs <= 2 * base.max_abs + 1e-3);
}

template <class T, int D, class Mask, class Tile>
void check_backward(const problem& pb, typename Mask::params mp, std::mt19937_64& rng, bool deterministic) {
  const auto batch = std::int32_t(pb.q_lens.size());
  INFO("backward D=" << D << " mask=" << Mask::name << " q_len[0]=" << pb.q_lens[0] << " kv_len[0]=" << pb.kv_lens[0]
                     << " hq=" << pb.hq << " hkv=" << pb.hkv << " varlen=" << pb.varlen
                     << " deterministic=" << deterministic);
  std::vector<std::int32_t> qp(batch + 1, 0), kp(batch + 1, 0);
  std::partial_sum(pb.q_lens.begin(), pb.q_lens.end(), qp.begin() + 1);
  std::partial_sum(pb.kv_lens.begin(), pb.kv_lens.end(), kp.begin() + 1);
  const auto ql = pb.varlen ? ragged_layout::varlen(qp.data(), batch, pb.hq, D)
                            : ragged_layout::fixed(batch, pb.q_lens[0], pb.hq, D);
  const auto kl = pb.varlen ? ragged_layout::varlen(kp.data(), batch, pb.hkv, D)
                            : ragged_layout::fixed(batch, pb.kv_lens[0], pb.hkv, D);
  const auto q = kvtile_test::random_vector<T>(std::size_t(qp.back()) * pb.hq * D, rng);
  const auto k = kvtile_test::random_vector<T>(std::size_t(kp.back()) * pb.hkv * D, rng);
  const auto v = kvtile_test::random_vector<T>(std::size_t(kp.back()) * pb.hkv * D, rng);
  const auto d_o = kvtile_test::random_vector<T>(q.size(), rng);
  const double scale = pb.scale > 0 ? pb.scale : 1.0 / std::sqrt(double(D));
  const dense_tensor<const T> q_t{q.data(), ql}, do_t{d_o.data(), ql};
  const dense_kv<const T> kv_t{k.data(), v.data(), kl};

  // O and LSE from the fp64 forward, stored as the forward stores them.
  std::vector<double> o_ref(q.size()), lse_ref(std::size_t(qp.back()) * pb.hq);
  reference_attention<Mask>(q_t, kv_t, pb.hkv, mp, scale, dense_tensor<double>{o_ref.data(), ql}, lse_ref.data());
  std::vector<T> o(q.size());
  for (std::size_t i = 0; i < o.size(); ++i) o[i] = from_float<T>(float(o_ref[i]));
  const std::vector<float> lse(lse_ref.begin(), lse_ref.end());

  std::vector<double> dq_ref(q.size()), dk_ref(k.size()), dv_ref(v.size());
  reference_attention_backward<Mask>(q_t, kv_t, pb.hkv, mp, scale, do_t, dense_tensor<double>{dq_ref.data(), ql},
                                     dense_tensor<double>{dk_ref.data(), kl}, dense_tensor<double>{dv_ref.data(), kl});
  std::vector<T> dq_low(q.size()), dk_low(k.size()), dv_low(v.size());
  naive_attention_backward_lowp<Mask>(q_t, kv_t, pb.hkv, mp, scale, do_t, dense_tensor<T>{dq_low.data(), ql},
                                      dense_tensor<T>{dk_low.data(), kl}, dense_tensor<T>{dv_low.data(), kl});

  // The launches of cuda::backward::run, with the workspace poisoned as well as the outputs.
  std::vector<T> dq(q.size(), kvtile_test::poison<T>()), dk(k.size(), kvtile_test::poison<T>()),
      dv(v.size(), kvtile_test::poison<T>());
  using K = cuda::detail::backward_kernel<T, D, Tile, Mask>;
  using KQ = cuda::detail::backward_dq_kernel<T, D, Tile, Mask>;
  typename K::params p{};
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.o = o.data();
  p.d_o = d_o.data();
  p.lse = lse.data();
  p.dq = dq.data();
  p.dk = dk.data();
  p.dv = dv.data();
  p.q_layout = p.o_layout = p.do_layout = p.dq_layout = ql;
  p.kv_layout = p.dk_layout = p.dv_layout = kl;
  p.mask = mp;
  p.scale = float(scale);
  p.scale_log2 = p.scale * log2e;
  p.group = pb.hq / pb.hkv;
  const int max_q = *std::max_element(pb.q_lens.begin(), pb.q_lens.end());
  const int max_kv = *std::max_element(pb.kv_lens.begin(), pb.kv_lens.end());
  p.ws_rows = std::int64_t(batch) * max_q;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> acc(std::size_t(p.ws_rows) * pb.hq * D + 1, nan), lse2(std::size_t(p.ws_rows) * pb.hq + 1, nan),
      delta(lse2.size(), nan);
  p.dq_acc = deterministic ? nullptr : acc.data();
  p.lse2 = lse2.data();
  p.delta = delta.data();
  const dim3 pass_grid = cuda::detail::backward_pass_grid<D>(ql, max_q);
  if (max_q > 0)
    emu::launch(pass_grid, 32 * cuda::detail::backward_pass_warps, 0,
                [&](unsigned char*) { cuda::detail::backward_prepass<T, D>(p); });
  emu::launch(cuda::detail::backward_grid<typename K::G>(kl, max_kv), K::G::threads, K::G::smem_bytes,
              [&](unsigned char* s) { K::run(p, s); });
  if (max_q > 0) {
    using GQ = typename KQ::G;
    if (deterministic)
      emu::launch(dim3((max_q + GQ::block_q - 1) / GQ::block_q, pb.hq, batch), GQ::threads, GQ::smem_bytes,
                  [&](unsigned char* s) { KQ::run(p, s); });
    else
      emu::launch(pass_grid, 32 * cuda::detail::backward_pass_warps, 0,
                  [&](unsigned char*) { cuda::detail::backward_postpass<T, D>(p); });
  }

  auto rule = [&](const char* what, const std::vector<T>& got, const std::vector<T>& low, const std::vector<double>& ref) {
    const auto err = kvtile_test::compare(got, ref), base = kvtile_test::compare(low, ref);
    const double slack = 1e-6 + (std::is_same_v<T, bfloat16> ? 2e-3 : 3e-4) * max_abs(ref);
    INFO(what << ": max_abs " << err.max_abs << " rel_l2 " << err.rel_l2 << ", naive " << base.max_abs << " / "
              << base.rel_l2);
    CHECK_FALSE(err.any_nan);
    CHECK(err.max_abs <= 2 * base.max_abs + slack);
    CHECK(err.rel_l2 <= 2 * base.rel_l2 + 1e-3);
  };
  rule("dQ", dq, dq_low, dq_ref);
  rule("dK", dk, dk_low, dk_ref);
  rule("dV", dv, dv_low, dv_ref);
}

using t64 = tile_shape<64, 64, 4, 2>;

}  // namespace

TEST_CASE("emulation: the forward prefill kernel (checks the emulation itself)") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  check_prefill<bfloat16, 64, causal_mask, tile_shape<128, 64, 4, 2>>(150, 200, 2, 1, {}, rng);
  check_prefill<half, 128, sliding_window_mask, tile_shape<128, 64, 4, 2>>(100, 130, 2, 1, {40, 3}, rng);
  check_prefill<bfloat16, 96, no_mask, tile_shape<128, 64, 4, 2>>(70, 90, 1, 1, {}, rng);
}

TEST_CASE("emulation: the prefill kernel with rotary variants (Q and K tiles rotated in shared memory)") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  check_prefill<bfloat16, 128, rotary<causal_mask>, tile_shape<128, 64, 4, 2>>(40, 70, 2, 1, {}, rng);
  rotary<sliding_window_mask, rotary_layout::interleaved>::params inter;
  inter.window = 30;
  inter.sinks = 3;
  inter.rotary_dim = 32;
  check_prefill<half, 64, rotary<sliding_window_mask, rotary_layout::interleaved>, tile_shape<64, 32, 4, 2>>(75, 90, 3, 1, inter,
                                                                                                            rng);
}

TEST_CASE("emulation: backward kernels, both dQ modes, every mask, GQA, varlen, head dims 64..256") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (bool det : {false, true}) {
    check_backward<bfloat16, 64, causal_mask, t64>({{17}, {17}, false, 1, 1}, {}, rng, det);
    check_backward<bfloat16, 64, no_mask, t64>({{70}, {100}, false, 2, 1}, {}, rng, det);
    check_backward<bfloat16, 64, causal_mask, t64>({{33}, {17}, false, 2, 2}, {}, rng, det);  // fully masked rows
    check_backward<bfloat16, 64, causal_mask, t64>({{1, 17, 100, 0, 40}, {5, 17, 150, 3, 0}, true, 4, 1}, {}, rng, det);
    check_backward<half, 96, sliding_window_mask, t64>({{150}, {150}, false, 2, 1}, {40, 3}, rng, det);
    check_backward<bfloat16, 128, causal_mask, t64>({{80}, {80}, false, 5, 1}, {}, rng, det);
    check_backward<bfloat16, 128, causal_mask, tile_shape<32, 64, 4, 2>>({{1, 90, 33}, {70, 90, 20}, true, 4, 2}, {},
                                                                         rng, det);
    check_backward<bfloat16, 256, no_mask, tile_shape<32, 64, 4, 2>>({{20}, {45}, false, 2, 2}, {}, rng, det);
    check_backward<half, 64, sliding_window_mask, tile_shape<64, 128, 8, 2>>({{65}, {140}, false, 8, 1}, {20, 2}, rng,
                                                                             det);
    check_backward<bfloat16, 64, causal_mask, tile_shape<32, 32, 2, 2>>({{50}, {70}, false, 4, 1}, {}, rng, det);
    check_backward<bfloat16, 64, softcap<causal_mask>, t64>({{100}, {100}, false, 2, 1, 1.f}, {{}, 2.f}, rng, det);
    check_backward<half, 128, softcap<sliding_window_mask>, t64>({{70}, {130}, false, 4, 2, 0.5f}, {{40, 3}, 3.f},
                                                                 rng, det);
  }
}
