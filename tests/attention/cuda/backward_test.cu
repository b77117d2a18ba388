// Tests of kvtile/attention/cuda/backward.cuh: dQ, dK and dV against the fp64 backward
// reference with FlashAttention's rule (per gradient, max|kernel - exact| <= 2 * max|naive_lowp
// - exact| + slack, the naive backward run in the same precision), on fresh random inputs, with
// the gradients poisoned (NaN) before every run; O and LSE come from cuda::prefill (soft-capping
// included: its backward multiplies dS by the cap's derivative). Also: the
// deterministic mode is bit-identical over runs, the CPU backward agrees, bad arguments give
// errors naming the value, a run captured in a CUDA graph replays to the same gradients.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "kvtile/attention/cpu/backward.hpp"
#include "kvtile/attention/cuda/backward.cuh"
#include "kvtile/attention/cuda/prefill.cuh"
#include "kvtile/attention/reference_backward.hpp"
#include "support/device_buffer.cuh"
#include "support/test_util.hpp"

namespace {

using namespace kvtile;
using namespace kvtile::attention;
using kvtile_test::device_buffer;

// The slack of the rule, relative to the gradient's largest element (an absolute floor for
// gradients the naive backward gets exactly, e.g. a single key).
template <class T>
constexpr double rel_slack = std::is_same_v<T, bfloat16> ? 2e-3 : 3e-4;

struct problem {
  std::vector<std::int32_t> q_lens, kv_lens;
  bool varlen = false;
  std::int32_t hq = 1, hkv = 1;
  float scale = 0.f;  // 0: 1/sqrt(D)
};

std::vector<std::int32_t> indptr_of(const std::vector<std::int32_t>& lens) {
  std::vector<std::int32_t> p(lens.size() + 1, 0);
  std::partial_sum(lens.begin(), lens.end(), p.begin() + 1);
  return p;
}

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::abs(x));
  return m;
}

// One problem on the device: inputs, the forward's O and LSE, poisoned gradients.
template <class Kernel>
struct device_problem {
  using T = typename Kernel::element;
  using Mask = typename Kernel::mask;
  static constexpr int D = Kernel::head_dim;

  problem pb;
  std::int32_t batch;
  std::vector<std::int32_t> q_ptr, kv_ptr;
  std::vector<T> q, k, v, d_o;
  device_buffer<T> q_d, k_d, v_d, o_d, do_d, dq_d, dk_d, dv_d;
  device_buffer<float> lse_d;
  device_buffer<std::int32_t> q_ptr_d, kv_ptr_d;
  typename Kernel::arguments args;

  device_problem(const problem& p, typename Mask::params mp, std::mt19937_64& rng)
      : pb(p),
        batch(std::int32_t(p.q_lens.size())),
        q_ptr(indptr_of(p.q_lens)),
        kv_ptr(indptr_of(p.kv_lens)),
        q(kvtile_test::random_vector<T>(std::size_t(q_ptr.back()) * p.hq * D, rng)),
        k(kvtile_test::random_vector<T>(std::size_t(kv_ptr.back()) * p.hkv * D, rng)),
        v(kvtile_test::random_vector<T>(std::size_t(kv_ptr.back()) * p.hkv * D, rng)),
        d_o(kvtile_test::random_vector<T>(q.size(), rng)),
        q_d(q), k_d(k), v_d(v), o_d(q.size()), do_d(d_o), dq_d(q.size()), dk_d(k.size()), dv_d(v.size()),
        lse_d(std::size_t(q_ptr.back()) * p.hq), q_ptr_d(q_ptr), kv_ptr_d(kv_ptr) {
    if (!pb.varlen)
      REQUIRE((std::adjacent_find(pb.q_lens.begin(), pb.q_lens.end(), std::not_equal_to<>()) == pb.q_lens.end() &&
               std::adjacent_find(pb.kv_lens.begin(), pb.kv_lens.end(), std::not_equal_to<>()) == pb.kv_lens.end()));
    const ragged_layout ql = q_layout(q_ptr_d.ptr), kl = kv_layout(kv_ptr_d.ptr);
    using fwd = cuda::prefill<T, D, Mask>;
    typename fwd::arguments f;
    f.q = {q_d.ptr, ql};
    f.kv = {k_d.ptr, v_d.ptr, kl};
    f.o = {o_d.ptr, ql};
    f.lse = lse_d.ptr;
    f.mask_params = mp;
    f.scale = pb.scale;
    f.max_q_len = *std::max_element(pb.q_lens.begin(), pb.q_lens.end());
    fwd::run(f, nullptr, nullptr);
    KVTILE_CUDA_CHECK(cudaDeviceSynchronize());

    args.q = {q_d.ptr, ql};
    args.kv = {k_d.ptr, v_d.ptr, kl};
    args.o = {o_d.ptr, ql};
    args.d_o = {do_d.ptr, ql};
    args.lse = lse_d.ptr;
    args.dq = {dq_d.ptr, ql};
    args.dk = {dk_d.ptr, kl};
    args.dv = {dv_d.ptr, kl};
    args.mask_params = mp;
    args.scale = pb.scale;
    args.max_q_len = f.max_q_len;
    args.max_kv_len = *std::max_element(pb.kv_lens.begin(), pb.kv_lens.end());
  }

  ragged_layout q_layout(const std::int32_t* indptr) const {
    return pb.varlen ? ragged_layout::varlen(indptr, batch, pb.hq, D) : ragged_layout::fixed(batch, pb.q_lens[0], pb.hq, D);
  }
  ragged_layout kv_layout(const std::int32_t* indptr) const {
    return pb.varlen ? ragged_layout::varlen(indptr, batch, pb.hkv, D)
                     : ragged_layout::fixed(batch, pb.kv_lens[0], pb.hkv, D);
  }
  double scale() const { return pb.scale > 0.f ? double(pb.scale) : 1.0 / std::sqrt(double(D)); }

  // Poisons the gradients, runs the backward, downloads them.
  struct grads {
    std::vector<T> dq, dk, dv;
  };
  // portable: the mma.sync kernels even where run() would take the sm_90a one.
  grads run(bool deterministic, bool portable = false) {
    dq_d.upload(std::vector<T>(q.size(), kvtile_test::poison<T>()));
    dk_d.upload(std::vector<T>(k.size(), kvtile_test::poison<T>()));
    dv_d.upload(std::vector<T>(v.size(), kvtile_test::poison<T>()));
    args.deterministic = deterministic;
    device_buffer<unsigned char> ws(Kernel::workspace_size(args));
    KVTILE_CUDA_CHECK(cudaMemset(ws.ptr, 0xFF, ws.n));  // NaN: the passes must write what they read
    if (portable)
      Kernel::run_portable(args, ws.ptr, nullptr);
    else
      Kernel::run(args, ws.ptr, nullptr);
    KVTILE_CUDA_CHECK(cudaDeviceSynchronize());
    return {dq_d.download(), dk_d.download(), dv_d.download()};
  }
};

template <class T>
void check_rule(const char* what, const std::vector<T>& got, const std::vector<T>& naive, const std::vector<double>& ref) {
  const auto err = kvtile_test::compare(got, ref);
  const auto base = kvtile_test::compare(naive, ref);
  const double slack = 1e-6 + rel_slack<T> * max_abs(ref);
  INFO(what << ": kernel max_abs=" << err.max_abs << " rel_l2=" << err.rel_l2 << ", naive max_abs=" << base.max_abs
            << " rel_l2=" << base.rel_l2 << ", max|ref|=" << max_abs(ref));
  CHECK_FALSE(err.any_nan);
  CHECK(err.max_abs <= 2 * base.max_abs + slack);
  CHECK(err.rel_l2 <= 2 * base.rel_l2 + 1e-3);
}

// Whether run() takes the sm_90a kernel for Kernel's arguments on this device (then the tests
// check the mma.sync kernels through run_portable() too).
template <class Kernel>
bool runs_sm90(const typename Kernel::arguments& a) {
  return std::string(Kernel::dispatch(a).kernel).find("wgmma") != std::string::npos;
}

// The backward of `Kernel` on one problem against the fp64 reference, with the rule; both dQ
// modes unless `modes` says one (1: atomic, 2: deterministic, 3: both), on every kernel family
// run() or run_portable() reaches on this device.
template <class Kernel>
void check_backward(const problem& pb, typename Kernel::mask::params mp, std::mt19937_64& rng, int modes = 3) {
  using T = typename Kernel::element;
  using Mask = typename Kernel::mask;
  constexpr int D = Kernel::head_dim;
  INFO("D=" << D << " mask=" << Mask::name << " batch=" << pb.q_lens.size() << " q_len[0]=" << pb.q_lens[0]
            << " kv_len[0]=" << pb.kv_lens[0] << " hq=" << pb.hq << " hkv=" << pb.hkv << " varlen=" << pb.varlen);
  device_problem<Kernel> dp(pb, mp, rng);

  const ragged_layout ql = dp.q_layout(dp.q_ptr.data()), kl = dp.kv_layout(dp.kv_ptr.data());
  const dense_tensor<const T> q_h{dp.q.data(), ql}, do_h{dp.d_o.data(), ql};
  const dense_kv<const T> kv_h{dp.k.data(), dp.v.data(), kl};
  std::vector<double> dq_ref(dp.q.size()), dk_ref(dp.k.size()), dv_ref(dp.v.size());
  reference_attention_backward<Mask>(q_h, kv_h, pb.hkv, mp, dp.scale(), do_h, dense_tensor<double>{dq_ref.data(), ql},
                                     dense_tensor<double>{dk_ref.data(), kl}, dense_tensor<double>{dv_ref.data(), kl});
  std::vector<T> dq_low(dp.q.size()), dk_low(dp.k.size()), dv_low(dp.v.size());
  naive_attention_backward_lowp<Mask>(q_h, kv_h, pb.hkv, mp, dp.scale(), do_h, dense_tensor<T>{dq_low.data(), ql},
                                      dense_tensor<T>{dk_low.data(), kl}, dense_tensor<T>{dv_low.data(), kl});

  const int paths = runs_sm90<Kernel>(dp.args) ? 2 : 1;
  for (int path = 0; path < paths; ++path)
    for (int mode = 1; mode <= 2; ++mode) {
      if (!(modes & mode)) continue;
      INFO((mode == 2 ? "deterministic dQ" : "atomic dQ") << (path == 0 ? "" : ", mma.sync kernels (run_portable)"));
      const auto g = dp.run(mode == 2, path == 1);
      check_rule("dQ", g.dq, dq_low, dq_ref);
      check_rule("dK", g.dk, dk_low, dk_ref);
      check_rule("dV", g.dv, dv_low, dv_ref);
    }
}

using b64_causal = cuda::backward<bfloat16, 64, causal_mask>;
using b64_none = cuda::backward<bfloat16, 64, no_mask>;
using h64_none = cuda::backward<kvtile::half, 64, no_mask>;
using b96_window = cuda::backward<bfloat16, 96, sliding_window_mask>;
using b128_causal = cuda::backward<bfloat16, 128, causal_mask>;
using h128_none = cuda::backward<kvtile::half, 128, no_mask>;
using b128_window = cuda::backward<bfloat16, 128, sliding_window_mask>;
using b256_none = cuda::backward<bfloat16, 256, no_mask>;
using h256_causal = cuda::backward<kvtile::half, 256, causal_mask>;
using b64_user = cuda::backward<bfloat16, 64, causal_mask, tile_shape<32, 32, 2, 2>>;
using b64_softcap = cuda::backward<bfloat16, 64, softcap<causal_mask>>;
using h128_softcap_window = cuda::backward<kvtile::half, 128, softcap<sliding_window_mask>>;
using h64_wide = cuda::backward<kvtile::half, 64, sliding_window_mask, tile_shape<64, 128, 8, 2>>;
using b128_rotary = cuda::backward<bfloat16, 128, rotary<causal_mask>>;
using h64_rotary_il = cuda::backward<kvtile::half, 64, rotary<sliding_window_mask, rotary_layout::interleaved>>;
using b64_softcap_rotary = cuda::backward<bfloat16, 64, softcap<rotary<causal_mask>>>;
using h256_rotary = cuda::backward<kvtile::half, 256, rotary<no_mask>>;

}  // namespace

TEST_CASE("backward bf16 D=64 causal: odd lengths, GQA 1/4/5/8, fully masked rows, varlen") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  check_backward<b64_causal>({{1}, {1}, false, 1, 1}, {}, rng);
  check_backward<b64_causal>({{17, 17}, {17, 17}, false, 4, 1}, {}, rng);
  check_backward<b64_causal>({{1000}, {1000}, false, 5, 1, 0.5f}, {}, rng);  // peaky softmax
  check_backward<b64_causal>({{100, 100}, {1000, 1000}, false, 8, 1}, {}, rng);
  check_backward<b64_causal>({{33}, {17}, false, 2, 2}, {}, rng);  // rows 0..15 see no key
  check_backward<b64_causal>({{4097}, {4097}, false, 2, 1}, {}, rng, 1);
  check_backward<b64_causal>({{1, 17, 300, 0, 40}, {5, 17, 700, 3, 0}, true, 4, 1}, {}, rng);  // varlen
}

TEST_CASE("backward D=64 no mask, bf16 and fp16") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  check_backward<b64_none>({{17}, {1000}, false, 8, 1}, {}, rng);
  check_backward<b64_none>({{1000}, {17}, false, 1, 1}, {}, rng);
  check_backward<h64_none>({{1000}, {1000}, false, 4, 1, 0.3f}, {}, rng);
  check_backward<h64_none>({{3, 129, 64}, {200, 1, 64}, true, 5, 1}, {}, rng);
}

TEST_CASE("backward bf16 D=96 sliding window with sinks") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  check_backward<b96_window>({{1000}, {1000}, false, 5, 1}, {100, 4}, rng);
  check_backward<b96_window>({{17, 17}, {4097, 4097}, false, 2, 2}, {64, 0}, rng);
  check_backward<b96_window>({{700}, {700}, false, 4, 1}, {130, 70}, rng);  // gap between sinks and window
  check_backward<b96_window>({{50, 1, 333}, {50, 900, 400}, true, 8, 1}, {50, 3}, rng);
}

TEST_CASE("backward D=128: causal bf16, no mask fp16, window bf16") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  check_backward<b128_causal>({{1000}, {1000}, false, 8, 1}, {}, rng);
  check_backward<b128_causal>({{4097}, {4097}, false, 1, 1}, {}, rng, 1);
  check_backward<b128_causal>({{1, 1}, {1000, 1000}, false, 4, 4}, {}, rng);
  check_backward<b128_causal>({{200, 65, 1}, {100, 65, 7}, true, 4, 2}, {}, rng);  // q_len > kv_len rows
  check_backward<h128_none>({{17}, {17}, false, 4, 1}, {}, rng);
  check_backward<h128_none>({{300}, {1000}, false, 2, 1}, {}, rng);
  check_backward<b128_window>({{1000}, {1000}, false, 4, 1}, {100, 4}, rng);
  check_backward<b128_window>({{50, 1, 333}, {50, 900, 400}, true, 8, 1}, {257, 3}, rng);
}

TEST_CASE("backward D=256: no mask bf16, causal fp16 (dK / dV columns split over two CTAs)") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  check_backward<b256_none>({{17}, {17}, false, 2, 1}, {}, rng);
  check_backward<b256_none>({{300}, {1000}, false, 4, 1}, {}, rng);
  check_backward<h256_causal>({{1000}, {1000}, false, 2, 1}, {}, rng);
  check_backward<h256_causal>({{5, 90, 33}, {1, 90, 100}, true, 4, 2}, {}, rng);
}

TEST_CASE("backward with user tiles <32, 32, 2, 2> and <64, 128, 8, 2>") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  check_backward<b64_user>({{1000}, {1000}, false, 4, 1}, {}, rng);
  check_backward<b64_user>({{1, 40, 77}, {5, 17, 300}, true, 5, 1}, {}, rng);
  check_backward<h64_wide>({{1000}, {1000}, false, 4, 2}, {200, 8}, rng);
  check_backward<h64_wide>({{17}, {4097}, false, 8, 1}, {300, 0}, rng);
}

// Soft-capping: dS times 1 - tanh^2(s / cap). Low caps against scale >= 0.5 so that tanh
// saturates and the derivative matters.
TEST_CASE("backward with soft-capping (softcap<causal>, softcap<window>)") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  check_backward<b64_softcap>({{1000}, {1000}, false, 4, 1, 1.f}, {{}, 2.f}, rng);
  check_backward<b64_softcap>({{33}, {17}, false, 2, 2, 1.f}, {{}, 1.f}, rng);
  check_backward<b64_softcap>({{1, 17, 300, 0, 40}, {5, 17, 700, 3, 0}, true, 5, 1}, {{}, 0.5f}, rng);
  check_backward<h128_softcap_window>({{700}, {700}, false, 4, 2, 0.5f}, {{130, 70}, 3.f}, rng);
  check_backward<h128_softcap_window>({{50, 1, 333}, {50, 900, 400}, true, 8, 1}, {{257, 3}, 30.f}, rng);
}

TEST_CASE("backward with rotary embeddings: Q and K rotated once, dQ and dK rotated back (half-split, interleaved partial, softcap<rotary>)") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  check_backward<b128_rotary>({{1000}, {1000}, false, 8, 1}, {{}, 10000.f, 0}, rng);
  check_backward<b128_rotary>({{200, 65, 1}, {100, 65, 7}, true, 4, 2}, {{}, 500.f, 0}, rng);  // varlen, q_len > kv_len
  check_backward<b128_rotary>({{17}, {4097}, false, 5, 1}, {{}, 10000.f, 64}, rng, 1);  // partial: dims [64, 128) pass
  check_backward<h64_rotary_il>({{17, 17}, {300, 300}, false, 5, 1}, {{40, 4}, 500.f, 32}, rng);
  check_backward<h64_rotary_il>({{1, 129, 64}, {200, 1, 64}, true, 4, 4}, {{100, 0}, 10000.f, 0}, rng);
  check_backward<b64_softcap_rotary>({{333}, {333}, false, 4, 1, 0.5f}, {{{}, 10000.f, 0}, 2.f}, rng);
  check_backward<h256_rotary>({{40}, {70}, false, 2, 1}, {{}, 10000.f, 0}, rng);
  // The dispatch names the passes around the plain backward's kernels.
  device_problem<b128_rotary> dp({{17}, {17}, false, 2, 1}, {}, rng);
  const auto c = b128_rotary::dispatch(dp.args);
  MESSAGE("D=128 rotary(causal): " << std::string(c.kernel) << " (" << c.reason << ")");
  CHECK(c.reason.find("rotated once") != std::string::npos);
  CHECK(c.reason.find("rotated back") != std::string::npos);
  CHECK(std::string(c.kernel) == std::string(b128_causal::dispatch(device_problem<b128_causal>({{17}, {17}, false, 2, 1}, {}, rng).args).kernel));
  // A rotary_dim the rotate pass cannot take is refused by name.
  auto bad = dp.args;
  bad.mask_params.rotary_dim = 48;
  kvtile_test::expect_error(kvtile::errc::unsupported, "rotary_dim", [&] { b128_rotary::check(bad); });
  // Workspace: the plain backward's, then the rotated Q (17 x 2 heads) and K (17 x 1 head).
  device_problem<b128_causal> plain({{17}, {17}, false, 2, 1}, {}, rng);
  auto up = [](std::size_t x) { return (x + 255) / 256 * 256; };
  CHECK(b128_rotary::workspace_size(dp.args) ==
        up(b128_causal::workspace_size(plain.args)) + up(17 * 2 * 128 * 2) + up(17 * 1 * 128 * 2));
}

TEST_CASE("backward deterministic mode: bit-identical over 20 runs") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  auto same_over_runs = [&]<class K>(const problem& pb, typename K::mask::params mp) {
    device_problem<K> dp(pb, mp, rng);
    const auto first = dp.run(true);
    int differing = 0;
    for (int r = 1; r < 20; ++r) {
      const auto g = dp.run(true);
      differing += std::memcmp(g.dq.data(), first.dq.data(), g.dq.size() * sizeof(g.dq[0])) != 0;
      differing += std::memcmp(g.dk.data(), first.dk.data(), g.dk.size() * sizeof(g.dk[0])) != 0;
      differing += std::memcmp(g.dv.data(), first.dv.data(), g.dv.size() * sizeof(g.dv[0])) != 0;
    }
    CHECK(differing == 0);
  };
  same_over_runs.template operator()<b64_causal>({{2000}, {2000}, false, 8, 2}, {});
  same_over_runs.template operator()<b128_window>({{50, 1, 333, 1000}, {50, 900, 400, 1000}, true, 4, 1}, {100, 4});
  same_over_runs.template operator()<b256_none>({{300}, {700}, false, 2, 1}, {});
}

// A small representative set, cheap enough for compute-sanitizer memcheck and racecheck.
TEST_CASE("backward small set (sanitizer)") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  check_backward<b64_causal>({{17, 17}, {70, 70}, false, 4, 1}, {}, rng);
  check_backward<b64_causal>({{1, 40, 0}, {5, 17, 3}, true, 5, 1}, {}, rng);
  check_backward<b96_window>({{150}, {150}, false, 2, 1}, {40, 3}, rng);
  check_backward<b128_causal>({{33}, {17}, false, 2, 2}, {}, rng);
  check_backward<b256_none>({{20}, {45}, false, 2, 2}, {}, rng);
  check_backward<h64_wide>({{65}, {33}, false, 8, 1}, {20, 2}, rng);
  check_backward<b64_softcap>({{40}, {70}, false, 2, 1, 1.f}, {{}, 2.f}, rng);
  check_backward<b64_softcap_rotary>({{1, 40, 0}, {5, 70, 3}, true, 4, 2}, {{{}, 10000.f, 0}, 2.f}, rng);
}

TEST_CASE("backward: a run captured in a CUDA graph and replayed gives the direct run's gradients") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  device_problem<b128_window> dp({{50, 1, 333}, {50, 900, 400}, true, 8, 2}, {100, 4}, rng);
  for (bool det : {true, false}) {
    INFO("deterministic " << det);
    const auto direct = dp.run(det);
    device_buffer<unsigned char> ws(b128_window::workspace_size(dp.args));
    cudaStream_t stream;
    KVTILE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    cudaGraph_t graph;
    KVTILE_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    b128_window::run(dp.args, ws.ptr, stream);
    KVTILE_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    cudaGraphExec_t exec;
    KVTILE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    for (int replay = 0; replay < 3; ++replay) {
      INFO("replay " << replay);
      using T = bfloat16;
      dp.dq_d.upload(std::vector<T>(dp.q.size(), kvtile_test::poison<T>()));
      dp.dk_d.upload(std::vector<T>(dp.k.size(), kvtile_test::poison<T>()));
      dp.dv_d.upload(std::vector<T>(dp.v.size(), kvtile_test::poison<T>()));
      KVTILE_CUDA_CHECK(cudaDeviceSynchronize());  // the uploads, before a stream that does not wait for them
      // On the replay's own stream: a plain cudaMemset runs on the legacy stream, which a
      // non-blocking stream does not wait for, and would race with the replay.
      KVTILE_CUDA_CHECK(cudaMemsetAsync(ws.ptr, 0xFF, ws.n, stream));
      KVTILE_CUDA_CHECK(cudaGraphLaunch(exec, stream));
      KVTILE_CUDA_CHECK(cudaStreamSynchronize(stream));
      const auto dq = dp.dq_d.download(), dk = dp.dk_d.download(), dv = dp.dv_d.download();
      // dK and dV never use atomics; dQ does unless deterministic (then it is bit-identical too).
      CHECK(std::memcmp(dk.data(), direct.dk.data(), dk.size() * sizeof(T)) == 0);
      CHECK(std::memcmp(dv.data(), direct.dv.data(), dv.size() * sizeof(T)) == 0);
      if (det) {
        CHECK(std::memcmp(dq.data(), direct.dq.data(), dq.size() * sizeof(T)) == 0);
      } else {
        double worst = 0, mx = 0;
        bool nan = false;
        for (std::size_t i = 0; i < dq.size(); ++i) {
          nan |= std::isnan(to_float(dq[i]));
          worst = std::max(worst, double(std::abs(to_float(dq[i]) - to_float(direct.dq[i]))));
          mx = std::max(mx, double(std::abs(to_float(direct.dq[i]))));
        }
        CHECK_FALSE(nan);
        CHECK(worst <= 1e-2 * mx);  // the order of the fp32 reductions, then one bf16 rounding
      }
    }
    KVTILE_CUDA_CHECK(cudaGraphExecDestroy(exec));
    KVTILE_CUDA_CHECK(cudaGraphDestroy(graph));
    KVTILE_CUDA_CHECK(cudaStreamDestroy(stream));
  }
}

TEST_CASE("backward: the CPU backward and the GPU backward agree") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  auto agree = [&]<class K>(const problem& pb, typename K::mask::params mp) {
    using T = typename K::element;
    using Mask = typename K::mask;
    constexpr int D = K::head_dim;
    device_problem<K> dp(pb, mp, rng);
    const auto g = dp.run(false);
    const std::vector<T> o = dp.o_d.download();
    const std::vector<float> lse = dp.lse_d.download();
    const ragged_layout ql = dp.q_layout(dp.q_ptr.data()), kl = dp.kv_layout(dp.kv_ptr.data());
    std::vector<float> dq(dp.q.size()), dk(dp.k.size()), dv(dp.v.size());
    cpu::attention_backward<tile_shape<32, 64>, D, Mask>(
        dense_tensor<const T>{dp.q.data(), ql}, dense_kv<const T>{dp.k.data(), dp.v.data(), kl}, pb.hkv, mp,
        float(dp.scale()), dense_tensor<const T>{o.data(), ql}, lse.data(), dense_tensor<const T>{dp.d_o.data(), ql},
        dense_tensor<float>{dq.data(), ql}, dense_tensor<float>{dk.data(), kl}, dense_tensor<float>{dv.data(), kl});
    auto close = [](const char* what, const std::vector<T>& gpu, const std::vector<float>& cpu_g) {
      const std::vector<double> ref(cpu_g.begin(), cpu_g.end());
      const auto e = kvtile_test::compare(gpu, ref);
      const double tol = (std::is_same_v<T, bfloat16> ? 2e-2 : 3e-3) * std::max(1e-3, max_abs(ref));
      INFO(what << ": max_abs=" << e.max_abs << " rel_l2=" << e.rel_l2 << " max|cpu|=" << max_abs(ref));
      CHECK_FALSE(e.any_nan);
      CHECK(e.max_abs <= tol);
      CHECK(e.rel_l2 <= (std::is_same_v<T, bfloat16> ? 1e-2 : 2e-3));
    };
    close("dQ", g.dq, dq);
    close("dK", g.dk, dk);
    close("dV", g.dv, dv);
  };
  agree.template operator()<b64_causal>({{300}, {500}, false, 4, 1}, {});
  agree.template operator()<h128_none>({{1, 40, 0, 65}, {50, 30, 4, 100}, true, 8, 2}, {});
  agree.template operator()<b96_window>({{400}, {400}, false, 2, 1}, {60, 4});
  agree.template operator()<b128_rotary>({{300}, {500}, false, 4, 1}, {{}, 10000.f, 0});
  agree.template operator()<b64_softcap_rotary>({{1, 40, 0, 65}, {50, 30, 4, 100}, true, 8, 2}, {{{}, 500.f, 0}, 3.f});
}

TEST_CASE("backward: fully masked rows get dQ = 0, keys no query sees get dK = dV = 0") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  // Causal with q_len 40 > kv_len 10: rows 0..29 see no key (LSE -inf).
  device_problem<b64_causal> dp({{40}, {10}, false, 2, 1}, {}, rng);
  for (bool det : {false, true}) {
    const auto g = dp.run(det);
    for (int r = 0; r < 30; ++r)
      for (int x = 0; x < 2 * 64; ++x) CHECK(to_float(g.dq[r * 2 * 64 + x]) == 0.f);
  }
  // A window of 8 without sinks over 100 keys seen by 4 queries: keys 0..88 get no gradient.
  device_problem<b128_window> w({{4}, {100}, false, 2, 1}, {8, 0}, rng);
  const auto g = w.run(false);
  for (int j = 0; j < 89; ++j)
    for (int x = 0; x < 128; ++x) {
      CHECK(to_float(g.dk[j * 128 + x]) == 0.f);
      CHECK(to_float(g.dv[j * 128 + x]) == 0.f);
    }
}

TEST_CASE("backward dispatch: the wgmma kernel on Hopper at D 64 / 128, the mma.sync kernels elsewhere, with the reason") {
  std::mt19937_64 rng(kvtile_test::fresh_seed());
  int device = 0, major = 0;
  KVTILE_CUDA_CHECK(cudaGetDevice(&device));
  KVTILE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  device_problem<b128_causal> d128({{17}, {17}, false, 2, 1}, {}, rng);
  device_problem<b96_window> d96({{17}, {17}, false, 2, 1}, {8, 0}, rng);
  device_problem<b64_user> user({{17}, {17}, false, 2, 1}, {}, rng);
  const kvtile::attention::cuda::kernel_choice c128 = b128_causal::dispatch(d128.args);
  MESSAGE("D=128 causal: " << std::string(c128.kernel) << " (" << c128.reason << ")");
  CHECK(runs_sm90<b128_causal>(d128.args) == (major == 9 && kvtile::attention::cuda::detail::sm90_kernels_available(device)));
  CHECK_FALSE(runs_sm90<b96_window>(d96.args));
  CHECK(b96_window::dispatch(d96.args).reason.find("head dims 64 and 128") != std::string::npos);
  CHECK_FALSE(runs_sm90<b64_user>(user.args));
  CHECK(b64_user::dispatch(user.args).reason.find("user tile") != std::string::npos);
}

TEST_CASE("backward argument errors name the offending value") {
  using K = b64_causal;
  alignas(16) static bfloat16 buf[8 * 64 * 4];
  static float lse[8 * 4];
  const ragged_layout l = ragged_layout::fixed(1, 8, 4, 64), kl = ragged_layout::fixed(1, 8, 2, 64);
  K::arguments good;
  good.q = {buf, l};
  good.kv = {buf, buf, kl};
  good.o = {buf, l};
  good.d_o = {buf, l};
  good.lse = lse;
  good.dq = {buf, l};
  good.dk = {buf, kl};
  good.dv = {buf, kl};
  CHECK(K::can_implement(good));
  auto expect = [](const K::arguments& a, const char* needle) {
    kvtile_test::expect_error(kvtile::errc::invalid_argument, needle, [&] { K::check(a); });
  };
  auto a = good;
  a.q.layout.head_dim = 80;
  expect(a, "q head_dim is 80");
  a = good;
  a.kv.layout.heads = 3;
  expect(a, "KV heads (3)");
  a = good;
  a.dk.layout.heads = 4;
  expect(a, "dk heads 4");
  a = good;
  a.d_o.layout.len = 7;
  expect(a, "d_o len 7");
  a = good;
  a.dv.layout.head_dim = 32;
  expect(a, "dv head_dim is 32");
  a = good;
  a.dq.data = reinterpret_cast<bfloat16*>(reinterpret_cast<char*>(buf) + 2);
  expect(a, "16-byte aligned");
  a = good;
  a.lse = nullptr;
  expect(a, "lse must be non-null");
  a = good;
  a.scale = -1.f;
  expect(a, "got -1");
  a = good;
  static const std::int32_t indptr[2] = {0, 8};
  a.q.layout = ragged_layout::varlen(indptr, 1, 4, 64);
  a.o.layout = a.d_o.layout = a.dq.layout = a.q.layout;
  expect(a, "max_q_len");
  a = good;
  a.kv.layout = ragged_layout::varlen(indptr, 1, 2, 64);
  a.dk.layout = a.dv.layout = a.kv.layout;
  expect(a, "max_kv_len");
  a = good;
  a.o.layout = ragged_layout::varlen(indptr, 1, 4, 64);
  expect(a, "o must use the same indptr as q");
  // run() checks before touching the device, and wants its workspace.
  a = good;
  a.q.layout.head_dim = 32;
  CHECK_THROWS_AS(K::run(a, nullptr), kvtile::error);
  kvtile_test::expect_error(kvtile::errc::invalid_argument, "workspace", [&] { K::run(good, nullptr); });
  // dispatch() names the kernels and the dQ mode without launching anything.
  CHECK(std::string(K::dispatch(good).kernel).find(runs_sm90<K>(good) ? "TMA bulk reductions" : "fp32 atomics") !=
        std::string::npos);
  a = good;
  a.deterministic = true;
  CHECK(std::string(K::dispatch(a).kernel).find("without atomics") != std::string::npos);
  CHECK(std::string(K::dispatch(a).reason).find("D 64, mask causal") != std::string::npos);
  // Workspace: lse2 + Delta per (row, head), plus the fp32 dQ accumulator unless deterministic,
  // after 64 rows that the sm_90a kernel's reduction boxes may start in (never read).
  a = good;
  CHECK(K::workspace_size(a) == 256 + 256 + 8 * 4 * 64 * 4 + 64 * 4 * 64 * 4);
  a.deterministic = true;
  CHECK(K::workspace_size(a) == 256 + 256);
}

TEST_CASE("backward: nothing to compute is a no-op; no queries give dK = dV = 0") {
  using K = b64_causal;
  K::arguments empty;
  empty.q = empty.o = empty.d_o = {nullptr, ragged_layout::fixed(0, 8, 4, 64)};
  empty.dq = {nullptr, ragged_layout::fixed(0, 8, 4, 64)};
  empty.kv = {nullptr, nullptr, ragged_layout::fixed(0, 8, 2, 64)};
  empty.dk = empty.dv = {nullptr, ragged_layout::fixed(0, 8, 2, 64)};
  CHECK(K::can_implement(empty));
  K::run(empty, nullptr);
  CHECK(cudaDeviceSynchronize() == cudaSuccess);

  std::mt19937_64 rng(kvtile_test::fresh_seed());
  device_problem<K> dp({{0}, {70}, false, 2, 1}, {}, rng);
  const auto g = dp.run(false);
  for (auto x : g.dk) CHECK(to_float(x) == 0.f);
  for (auto x : g.dv) CHECK(to_float(x) == 0.f);
}
