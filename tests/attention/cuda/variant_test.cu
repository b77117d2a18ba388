// GPU tests of attention variants (attention/variant.hpp) on the CUDA kernels: logit
// soft-capping on the prefill kernels (the sm_90a one through run() on Hopper, the mma.sync one
// through run_portable) and on the paged decode and append kernels, against the fp64 reference
// that applies the same transform, with FlashAttention's 2x rule, odd lengths, GQA 1 / 5 / 8.
#include <doctest/doctest.h>

#include <random>

#include <cuda_runtime.h>

#include "kvtile/attention/cuda/decode.cuh"
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

}  // namespace

TEST_CASE("softcap prefill: D=128 causal on run() and run_portable, odd lengths, GQA 1/5/8") {
  using namespace prefill_test;
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const auto mp = cap_of<causal_mask>(2.f);
  check_prefill<capped_causal_128>({{1000}, {1000}, false, 5, 1, 3.f}, mp, rng);  // scores well past the cap
  check_prefill<capped_causal_128>({{17, 1}, {4097, 17}, false, 8, 1}, mp, rng);
  check_prefill<capped_causal_128>({{50, 1, 333}, {50, 900, 400}, true, 3, 3}, mp, rng);
  check_prefill<mma_sync_path<capped_causal_128>>({{1000}, {1000}, false, 5, 1, 3.f}, mp, rng);
  check_prefill<mma_sync_path<capped_causal_128>>({{17, 1}, {4097, 17}, false, 8, 1}, mp, rng);
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
  const int groups[] = {1, 5, 8};
  const int pages[] = {1, 16, 256};
  for (int i = 0; i < 3; ++i) {
    spec s;
    s.hkv = 2;
    s.hq = 2 * groups[i];
    s.page_size = pages[i];
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
  const int groups[] = {1, 5, 8};
  const int pages[] = {1, 16, 256};
  for (int i = 0; i < 3; ++i) {
    spec s;
    s.hkv = 2;
    s.hq = 2 * groups[i];
    s.page_size = pages[i];
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

TEST_CASE("rotary on the GPU: what the kernels cannot take is a clear error") {
  using namespace paged_test;
  using kvtile::attention::rotary;
  std::mt19937_64 rng(7);
  spec s;
  s.q_lens = {40};  // 40 tokens x group 4: more than 16 packed rows
  s.kv_lens = {100};
  const problem<bfloat16, 128> pr(s, rng);
  const auto expect = [](auto&& f, const char* what) {
    try {
      f();
      FAIL("no error");
    } catch (const kvtile::error& e) {
      CHECK(std::string(e.what()).find(what) != std::string::npos);
    }
  };
  expect([&] { (void)pr.plan<rotary<causal_mask>>({}, limits()); }, "at most 16 packed query rows");
  static_assert(!kc::cuda_variant_supported<rotary<causal_mask>>, "prefill refuses rotary at compile time");
}
