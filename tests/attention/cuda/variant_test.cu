// GPU tests of attention variants (attention/variant.hpp) on the CUDA kernels: logit
// soft-capping on the prefill kernels (the sm_90a one through run() on Hopper, the mma.sync one
// through run_portable) and on the paged decode and append kernels, rotary embeddings on the
// paged kernels and the prefill kernels (rotated once, or in shared memory), against the fp64 reference that applies the same
// transform, with FlashAttention's 2x rule, odd lengths, GQA 1 / 5 / 8.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include <cuda_runtime.h>

#include "kvtile/attention/cuda/decode.cuh"
#include "kvtile/attention/cuda/paged_attention.cuh"
#include "kvtile/attention/cuda/prefill.cuh"
#include "kvtile/attention/variant.hpp"
#include "attention/cuda/paged_fixture.cuh"
#include "attention/cuda/prefill_fixture.cuh"

namespace {

namespace kc = kvtile::attention::cuda;
using kvtile::attention::softcap;

template <class K>
struct mma_sync_path : K {
  static void run(const typename K::arguments& a, void* workspace, cudaStream_t stream) {
    K::run_portable(a, workspace, stream);
  }
};

template <class Mask>
typename softcap<Mask>::params cap_of(float cap, typename Mask::params inner = {}) {
  typename softcap<Mask>::params p;
  static_cast<typename Mask::params&>(p) = inner;
  p.cap = cap;
  return p;
}

using capped_causal_128 = kc::prefill<kvtile::bfloat16, 128, softcap<kvtile::attention::causal_mask>>;
using capped_window_64 = kc::prefill<kvtile::bfloat16, 64, softcap<kvtile::attention::sliding_window_mask>>;
using capped_none_96 = kc::prefill<kvtile::half, 96, softcap<kvtile::attention::no_mask>>;

// The paged cases of the variant tests: case i of GQA groups 1 / 5 / 8 over pages 1 / 16 / 256.
constexpr int groups[] = {1, 5, 8};
constexpr int pages[] = {1, 16, 256};
paged_test::spec variant_spec(int i) {
  paged_test::spec s;
  s.hkv = 2;
  s.hq = 2 * groups[i];
  s.page_size = pages[i];
  return s;
}

}  // namespace

TEST_CASE("softcap prefill: D=128 causal on run() and run_portable, odd lengths, GQA 1/5/8") {
  using namespace prefill_test;
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const auto mp = cap_of<causal_mask>(2.f);
  check_prefill<capped_causal_128>({{1000}, {1000}, false, 5, 1, 3.f}, mp, rng);  // scores well past the cap
  check_prefill<capped_causal_128>({{17, 1}, {4097, 17}, true, 8, 1}, mp, rng);
  check_prefill<capped_causal_128>({{50, 1, 333}, {50, 900, 400}, true, 3, 3}, mp, rng);
  check_prefill<mma_sync_path<capped_causal_128>>({{1000}, {1000}, false, 5, 1, 3.f}, mp, rng);
  check_prefill<mma_sync_path<capped_causal_128>>({{17, 1}, {4097, 17}, true, 8, 1}, mp, rng);
}

TEST_CASE("softcap prefill: D=64 sliding window with sinks, and fp16 D=96 with no mask") {
  using namespace prefill_test;
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  check_prefill<capped_window_64>({{1000}, {1000}, false, 4, 1, 3.f}, cap_of<sliding_window_mask>(5.f, {100, 4}), rng);
  check_prefill<mma_sync_path<capped_window_64>>({{700}, {700}, false, 2, 1}, cap_of<sliding_window_mask>(5.f, {130, 70}),
                                                 rng);
  check_prefill<capped_none_96>({{17}, {1000}, false, 8, 1, 3.f}, cap_of<no_mask>(1.5f), rng);
}

TEST_CASE("softcap paged decode and append: GQA 1/5/8, pages 1/16/256 (sm_90a kernels where the device has them)") {
  using namespace paged_test;
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (int i = 0; i < 3; ++i) {
    spec s = variant_spec(i);
    s.q_lens = {1, 1, 3};
    s.kv_lens = {1, 1000, 4097};
    INFO("decode, group " << groups[i] << ", page " << pages[i]);
    run_and_check<bfloat16, 128, softcap<causal_mask>>(s, cap_of<causal_mask>(2.f), rng(), true);
    s.q_lens = {300, 1, 17};
    s.kv_lens = {301, 1000, 4097};
    INFO("append, group " << groups[i] << ", page " << pages[i]);
    run_and_check<bfloat16, 128, softcap<causal_mask>>(s, cap_of<causal_mask>(2.f), rng());
    run_and_check<bfloat16, 64, softcap<sliding_window_mask>>(s, cap_of<sliding_window_mask>(3.f, {200, 4}), rng());
  }
}

TEST_CASE("rotary paged decode: half-split and interleaved, GQA 1/5/8, pages 1/16/256, split and unsplit") {
  using namespace paged_test;
  using kvtile::attention::rotary;
  using kvtile::attention::rotary_layout;
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (int i = 0; i < 3; ++i) {
    spec s = variant_spec(i);
    s.q_lens = {1, 1, groups[i] <= 5 ? 3 : 2};  // at most 16 packed rows per request
    s.kv_lens = {1, 1000, 4097};
    s.layout = i == 1 ? kv_layout::hnd : kv_layout::nhd;
    INFO("group " << groups[i] << ", page " << pages[i]);
    rotary<causal_mask>::params half;
    run_and_check<bfloat16, 128, rotary<causal_mask>>(s, half, rng(), true);
    rotary<causal_mask, rotary_layout::interleaved>::params inter;
    inter.theta = 500000.f;  // Llama 3's base
    run_and_check<bfloat16, 128, rotary<causal_mask, rotary_layout::interleaved>>(s, inter, rng());
    // Partial rotary (the first 64 of 128 dims) composed with soft-capping and a window with sinks.
    softcap<rotary<sliding_window_mask>>::params mixed;
    mixed.window = 300;
    mixed.sinks = 4;
    mixed.rotary_dim = 64;
    mixed.cap = 3.f;
    run_and_check<kvtile::half, 128, softcap<rotary<sliding_window_mask>>>(s, mixed, rng());
    rotary<causal_mask>::params d64;
    run_and_check<bfloat16, 64, rotary<causal_mask>>(s, d64, rng());
  }
}

TEST_CASE("rotary paged append: chunks on the warp-specialised sm_90a append kernel (pages with tensor maps) and the mma.sync ones (32 rows per warp, and 16 above D 128)") {
  using namespace paged_test;
  using kvtile::attention::rotary;
  using kvtile::attention::rotary_layout;
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  spec s;
  s.q_lens = {40, 1, 17};  // 40 tokens x group 4: more than 16 packed rows
  s.kv_lens = {100, 33, 17};
  for (const int page : {16, 5}) {
    INFO("page " << page);
    s.page_size = page;
    const problem<bfloat16, 128> pr(s, rng);
    const auto plan = pr.plan<rotary<causal_mask>>({}, limits());
    const bool ws = limits().wgmma && page == 16;  // pages of 5 slots have no TMA tensor maps
    CHECK(plan.shape.kind == (ws ? kc::paged_kernel_kind::append_sm90 : kc::paged_kernel_kind::append));
    CHECK(plan.warp_specialised_append == ws);
    if (limits().wgmma) CHECK(plan.reason.find("rotary") != std::string::npos);
    run_and_check<bfloat16, 128, rotary<causal_mask>>(s, {}, rng(), true);
    rotary<causal_mask, rotary_layout::interleaved>::params inter;
    inter.rotary_dim = 64;
    run_and_check<kvtile::half, 64, rotary<causal_mask, rotary_layout::interleaved>>(s, inter, rng());
    run_and_check<bfloat16, 256, rotary<sliding_window_mask>>(s, {{24, 4}}, rng());
  }
  // Longer chunks over longer prefixes (several work items, key tiles and, where planned, splits),
  // GQA 5 and 8, partial rotary and soft-capping over it.
  for (int i = 1; i < 3; ++i) {
    spec l = variant_spec(i);
    l.q_lens = {300, 17, 1};
    l.kv_lens = {1301, 4097, 60};
    INFO("group " << groups[i] << ", page " << pages[i]);
    run_and_check<bfloat16, 128, rotary<causal_mask>>(l, {}, rng());
    softcap<rotary<causal_mask>>::params capped;
    capped.rotary_dim = 64;
    capped.cap = 4.f;
    run_and_check<kvtile::half, 128, softcap<rotary<causal_mask>>>(l, capped, rng());
  }
}

TEST_CASE("rotary prefill: rotated once into the workspace (then the plain kernel), in shared memory by the sm_90a warp-specialised kernel and by the mma.sync kernel; odd lengths, GQA 1/5/8, varlen") {
  using namespace prefill_test;
  using kvtile::attention::rotary;
  using kvtile::attention::rotary_layout;
  using rope_128 = kc::prefill<kvtile::bfloat16, 128, rotary<causal_mask>>;
  using rope_64 = kc::prefill<kvtile::half, 64, rotary<sliding_window_mask, rotary_layout::interleaved>>;
  using rope_256 = kc::prefill<kvtile::bfloat16, 256, rotary<causal_mask>>;
  using rope_176 = kc::prefill<kvtile::bfloat16, 128, rotary<no_mask>, kvtile::attention::tile_shape<128, 176, 12, 2>>;
  static_assert(rope_128::sm90_dispatch && rope_64::sm90_dispatch && rope_256::sm90_dispatch && rope_176::sm90_dispatch,
                "rotary variants run on the warp-specialised sm_90a kernel");
  static_assert(rope_128::rotate_once && rope_64::rotate_once);
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  constexpr bool once = true, fused = false;  // with the workspace / without
  // Rotated once into the workspace (more keys than tuning::prefill_rotary_fused_max_kv: on
  // Hopper too).
  check_prefill<rope_128>({{1100}, {1100}, false, 5, 1}, {}, rng, true, once);
  check_prefill<rope_128>({{300, 300}, {1300, 1300}, false, 4, 4}, {}, rng, true, once);  // q_len < kv_len
  // In shared memory: on Hopper the warp-specialised kernel (its producer warps rotate K, each
  // consumer warpgroup its Q rows), elsewhere the mma.sync kernel; and the mma.sync kernel on
  // every device.
  check_prefill<rope_128>({{1000}, {1000}, false, 5, 1}, {}, rng, true, fused);
  check_prefill<rope_128>({{300, 300}, {777, 777}, false, 4, 4}, {}, rng, true, fused);
  check_prefill<rope_128>({{17, 1}, {4097, 17}, true, 8, 1}, {}, rng);  // varlen K: no workspace asked
  check_prefill<rope_128>({{50, 1, 333}, {50, 900, 400}, true, 3, 3}, {}, rng);
  check_prefill<rope_128>({std::vector<std::int32_t>(16, 256), std::vector<std::int32_t>(16, 256), false, 8, 8}, {}, rng,
                          false, fused);  // many short work tiles: the persistent schedule
  check_prefill<mma_sync_path<rope_128>>({{1000}, {1000}, false, 5, 1}, {}, rng, true, fused);
  rotary<causal_mask>::params partial;
  partial.rotary_dim = 64;  // half-split pairs (d, d + 32) of the first 64 dims
  check_prefill<rope_128>({{333}, {700}, false, 8, 1}, partial, rng, true, fused);
  check_prefill<rope_256>({{257}, {300}, false, 5, 1}, {}, rng, true, fused);
  int device = 0;
  REQUIRE(cudaGetDevice(&device) == cudaSuccess);
  if (kvtile::detail::compute_capability_major(device) == 9 && kc::detail::sm90_kernels_available(device))
    check_prefill<rope_176>({{401}, {401}, false, 2, 2}, {}, rng, true, fused);  // a user tile, sm_90a only
  rotary<sliding_window_mask, rotary_layout::interleaved>::params inter;
  inter.window = 100;
  inter.sinks = 4;
  inter.rotary_dim = 32;
  check_prefill<rope_64>({{1200}, {1200}, false, 2, 1}, inter, rng, true, once);
  check_prefill<rope_64>({{700}, {700}, false, 2, 1}, inter, rng, true, fused);
  check_prefill<mma_sync_path<rope_64>>({{700}, {700}, false, 2, 1}, inter, rng, true, fused);
  using capped = kc::prefill<kvtile::bfloat16, 128, softcap<rotary<causal_mask>>>;
  softcap<rotary<causal_mask>>::params cap;
  cap.cap = 5.f;
  check_prefill<capped>({{513}, {1100}, false, 8, 2}, cap, rng, true, once);
  check_prefill<capped>({{513}, {600}, false, 8, 2}, cap, rng, true, fused);
  // The dispatch says which path and why. Long sequences: with a workspace the prefill without
  // the rotation. Short ones (at most tuning::prefill_rotary_fused_max_kv keys): on Hopper the
  // warp-specialised kernel rotating in shared memory, no workspace asked; elsewhere rotated once.
  using plain = kc::prefill<kvtile::bfloat16, 128, causal_mask>;
  alignas(16) static unsigned char probe[16];
  const bool hopper = kvtile::detail::compute_capability_major(device) == 9 && kc::detail::sm90_kernels_available(device);
  for (const int len : {64, 4096}) {
    INFO("kv_len " << len);
    rope_128::arguments a{};
    a.q = {nullptr, kvtile::attention::ragged_layout::fixed(1, len, 8, 128)};
    a.kv = {nullptr, nullptr, kvtile::attention::ragged_layout::fixed(1, len, 8, 128)};
    a.o = {nullptr, a.q.layout};
    const plain::arguments pa{a.q, a.kv, a.o};
    const bool fused_here = hopper && len <= kc::tuning::prefill_rotary_fused_max_kv;
    CHECK(rope_128::workspace_size(a) == (fused_here ? 0 : std::size_t(2) * len * 8 * 128 * 2));
    CHECK(rope_128::dispatch(a).reason.find("rotary") != std::string::npos);
    const auto with_ws = rope_128::dispatch(a, probe);
    CHECK((with_ws.reason.find("rotated once") != std::string::npos) == !fused_here);
    CHECK(with_ws.kernel == plain::dispatch(pa).kernel);
    if (hopper) CHECK(rope_128::dispatch(a).kernel == plain::dispatch(pa).kernel);
  }
}

TEST_CASE("rotary at cache positions on the GPU: decode over a [sinks + window] page table equals attention over that cache built explicitly") {
  using namespace kvtile;
  using namespace kvtile::attention;
  using kvtile_test::device_buffer;
  using T = bfloat16;
  constexpr int D = 128, P = 16, HKV = 2, HQ = 8;
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  for (const int L : {1000, 4097}) {
    // The whole sequence, block i of the text in pool block i; K stored before rotation.
    const int blocks = (L + P - 1) / P;
    const std::int64_t per_block = std::int64_t(P) * HKV * D;
    std::vector<T> k(std::size_t(blocks * per_block)), v(k.size()), q(std::size_t(HQ) * D);
    for (auto& x : k) x = T(float(nd(rng)));
    for (auto& x : v) x = T(float(nd(rng)));
    for (auto& x : q) x = T(float(nd(rng)));
    // Kept: 2 sink blocks and the blocks of the last 200 tokens (the tail block is partial).
    std::vector<std::int32_t> kept{0, 1};
    for (int b = (L - 200) / P; b < blocks; ++b) kept.push_back(b);
    const int tail = L - (blocks - 1) * P;
    const int n_cache = (int(kept.size()) - 1) * P + tail;
    // The cache built explicitly: [n_cache, HKV, D], token c of the cache from its kept block.
    std::vector<double> kc(std::size_t(n_cache) * HKV * D), vc(kc.size());
    for (int c = 0; c < n_cache; ++c)
      for (int h = 0; h < HKV; ++h)
        for (int d = 0; d < D; ++d) {
          const std::int64_t src = kept[c / P] * per_block + (std::int64_t(c % P) * HKV + h) * D + d;
          kc[(std::size_t(c) * HKV + h) * D + d] = to_double(k[src]);
          vc[(std::size_t(c) * HKV + h) * D + d] = to_double(v[src]);
        }
    // fp64 reference by hand: Q at cache position n_cache - 1, key c at c, then plain attention.
    const double scale = 1.0 / std::sqrt(double(D));
    std::vector<double> ref(std::size_t(HQ) * D, 0.0);
    for (int h = 0; h < HQ; ++h) {
      std::vector<double> qr(D);
      for (int d = 0; d < D; ++d) qr[d] = to_double(q[std::size_t(h) * D + d]);
      rotary_rotate_row_f64<rotary_layout::half_split>(qr.data(), D, n_cache - 1, 10000.0);
      std::vector<double> s(n_cache);
      double mx = -1e300;
      for (int c = 0; c < n_cache; ++c) {
        std::vector<double> kr(kc.begin() + (std::size_t(c) * HKV + h / (HQ / HKV)) * D,
                               kc.begin() + (std::size_t(c) * HKV + h / (HQ / HKV) + 1) * D);
        rotary_rotate_row_f64<rotary_layout::half_split>(kr.data(), D, c, 10000.0);
        double dot = 0;
        for (int d = 0; d < D; ++d) dot += qr[d] * kr[d];
        s[c] = dot * scale;
        mx = std::max(mx, s[c]);
      }
      double sum = 0;
      for (int c = 0; c < n_cache; ++c) sum += (s[c] = std::exp(s[c] - mx));
      for (int c = 0; c < n_cache; ++c)
        for (int d = 0; d < D; ++d) ref[std::size_t(h) * D + d] += s[c] / sum * vc[(std::size_t(c) * HKV + h / (HQ / HKV)) * D + d];
    }
    // The GPU: one decode query over the page table of the kept blocks.
    const std::vector<std::int32_t> q_indptr{0, 1}, kv_indptr{0, std::int32_t(kept.size())}, last{tail};
    device_buffer<T> dk(k), dv(v), dq(q), dout(q.size());
    device_buffer<std::int32_t> dqi(q_indptr), dki(kv_indptr), dkept(kept), dlast(last);
    using attn = cuda::paged_attention<T, D, rotary<causal_mask>>;
    const paging::csr_page_table host{kv_indptr.data(), kept.data(), last.data(), 1};
    const cuda::paged_problem pr{HQ, HKV, D, P, blocks, 2};
    for (const bool tma : {true, false}) {
      typename attn::plan_arguments pa{q_indptr.data(), host, pr, cuda::query_device_limits()};
      pa.options.use_wgmma = tma;  // the TMA decode kernel where the device has it, and the cp.async one
      const cuda::paged_plan plan = attn::plan(pa, {});
      INFO("L " << L << ", cache " << n_cache << " tokens, kernel " << plan.kernel());
      device_buffer<unsigned char> ws(attn::workspace_size(plan));
      attn::initialize(plan, ws.ptr);
      dout.upload(std::vector<T>(dout.n, kvtile_test::poison<T>()));
      const auto ql = ragged_layout::varlen(dqi.ptr, 1, HQ, D);
      const paging::csr_page_table table{dki.ptr, dkept.ptr, dlast.ptr, 1};
      const typename attn::arguments args{dense_tensor<T>{dq.ptr, ql},
                                          paging::paged_kv<T, paging::csr_page_table>{
                                              paging::kv_pool_view<T>::make(dk.ptr, dv.ptr, kv_layout::nhd, blocks, P, HKV, D),
                                              table},
                                          dense_tensor<T>{dout.ptr, ql}, nullptr, {}, float(scale)};
      attn::run(plan, args, ws.ptr);
      KVTILE_CUDA_CHECK(cudaDeviceSynchronize());
      const auto e = kvtile_test::compare(dout.download(), ref);
      INFO("max error " << e.max_abs);
      CHECK_FALSE(e.any_nan);
      // bf16 output of O(1 / sqrt(n)) values: a few bf16 ulps; a wrong position breaks it by far.
      CHECK(e.max_abs < 2e-2);
      CHECK(e.rel_l2 < 1e-2);
    }
  }
}
