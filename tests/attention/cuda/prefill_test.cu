// Tests of kvtile/attention/cuda/prefill.cuh against the fp64 reference with FlashAttention's
// rule: max|kernel - exact| <= 2 * max|naive_lowp - exact| + slack, on fresh random inputs,
// with O and LSE poisoned before every run (every element must be written).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "kvtile/attention/cuda/prefill.cuh"
#include "attention/cuda/prefill_fixture.cuh"

namespace {

using namespace prefill_test;

// The shipped instantiations: defaults for D 64/80/96/128/256, one mask each, plus one user
// tile in fp16.
using k64_causal = cuda::prefill<bfloat16, 64, causal_mask>;
using k80_none = cuda::prefill<bfloat16, 80, no_mask>;
using k96_window = cuda::prefill<bfloat16, 96, sliding_window_mask>;
using k128_window = cuda::prefill<bfloat16, 128, sliding_window_mask>;  // run(): the sm_90a kernel on Hopper
using k128_causal = cuda::prefill<bfloat16, 128, causal_mask>;
using k256_none = cuda::prefill<bfloat16, 256, no_mask>;
using k64_user_fp16 = cuda::prefill<kvtile::half, 64, no_mask, tile_shape<64, 32, 2, 3>>;

// The same configuration forced onto the mma.sync kernel (run_portable): on Hopper, run()
// dispatches D 64 / 128 with the default tile to the sm_90a kernel (prefill_sm90.cuh).
template <class K>
struct mma_sync_path : K {
  static void run(const typename K::arguments& a, void* workspace, cudaStream_t stream) {
    K::run_portable(a, workspace, stream);
  }
};

}  // namespace

TEST_CASE("prefill bf16 D=64 causal: odd lengths, GQA 1/4/5/8, q_len < kv_len, fully masked rows") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  check_prefill<k64_causal>({{1}, {1}, false, 1, 1}, {}, rng);
  check_prefill<k64_causal>({{17, 17}, {17, 17}, false, 4, 1}, {}, rng);
  check_prefill<k64_causal>({{1000}, {1000}, false, 5, 1, 0.5f}, {}, rng);  // peaky softmax
  check_prefill<k64_causal>({{100, 100}, {1000, 1000}, false, 8, 1}, {}, rng);
  check_prefill<k64_causal>({{33}, {17}, false, 2, 2}, {}, rng);  // rows 0..15 see no key
  check_prefill<k64_causal>({{4097}, {4097}, false, 2, 1}, {}, rng);
  check_prefill<k64_causal>({{1, 17, 300, 0, 40}, {5, 17, 700, 3, 0}, true, 4, 1}, {}, rng);  // varlen
}

TEST_CASE("prefill bf16 D=80 no mask") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  check_prefill<k80_none>({{17}, {1000}, false, 8, 1}, {}, rng);
  check_prefill<k80_none>({{1000}, {1000}, false, 1, 1}, {}, rng);
  check_prefill<k80_none>({{3, 129, 64}, {200, 1, 64}, true, 5, 1}, {}, rng);
}

TEST_CASE("prefill bf16 D=96 sliding window with sinks") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  check_prefill<k96_window>({{1000}, {1000}, false, 5, 1}, {100, 4}, rng);
  check_prefill<k96_window>({{17, 17}, {4097, 4097}, false, 2, 2}, {64, 0}, rng);
  check_prefill<k96_window>({{700}, {700}, false, 4, 1}, {130, 70}, rng);  // gap between sinks and window
  check_prefill<k96_window>({{50, 1, 333}, {50, 900, 400}, true, 8, 1}, {50, 3}, rng);
}

TEST_CASE("prefill bf16 D=128 sliding window with sinks (default tile: dispatched to the sm_90a kernel on Hopper)") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  check_prefill<k128_window>({{1000}, {1000}, false, 4, 1}, {100, 4}, rng);
  check_prefill<k128_window>({{300, 300}, {4097, 4097}, false, 2, 2}, {64, 0}, rng);
  check_prefill<k128_window>({{700}, {700}, false, 4, 1}, {130, 70}, rng);
  check_prefill<k128_window>({{50, 1, 333}, {50, 900, 400}, true, 8, 1}, {257, 3}, rng);
}

TEST_CASE("prefill bf16 D=128 causal") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  check_prefill<k128_causal>({{1000}, {1000}, false, 8, 1}, {}, rng);
  check_prefill<k128_causal>({{4097}, {4097}, false, 1, 1}, {}, rng);
  check_prefill<k128_causal>({{1, 1}, {1000, 1000}, false, 4, 4}, {}, rng);
  check_prefill<k128_causal>({{200, 65, 1}, {100, 65, 7}, true, 4, 2}, {}, rng);  // q_len > kv_len rows
}

TEST_CASE("prefill bf16 D=256 no mask") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  check_prefill<k256_none>({{17}, {17}, false, 2, 1}, {}, rng);
  check_prefill<k256_none>({{300}, {1000}, false, 4, 1}, {}, rng);
}

TEST_CASE("prefill fp16 D=64 with a user tile <64, 32, 2, 3>") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  check_prefill<k64_user_fp16>({{1000}, {1000}, false, 4, 1, 0.3f}, {}, rng);
  check_prefill<k64_user_fp16>({{1}, {4097}, false, 1, 1}, {}, rng);
}

TEST_CASE("prefill mma.sync path forced (run_portable) at D=64 and 128") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  check_prefill<mma_sync_path<k64_causal>>({{1000}, {1000}, false, 4, 1}, {}, rng);
  check_prefill<mma_sync_path<k64_causal>>({{33}, {17}, false, 2, 2}, {}, rng);
  check_prefill<mma_sync_path<k128_causal>>({{200, 65, 1}, {100, 65, 7}, true, 4, 2}, {}, rng);
}

// A small representative set, cheap enough for compute-sanitizer memcheck and racecheck.
TEST_CASE("prefill small set (sanitizer)") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  check_prefill<k64_causal>({{17, 17}, {70, 70}, false, 4, 1}, {}, rng);
  check_prefill<k64_causal>({{1, 40, 0}, {5, 17, 3}, true, 5, 1}, {}, rng, /*with_lse=*/false);
  check_prefill<k96_window>({{150}, {150}, false, 2, 1}, {40, 3}, rng);
  check_prefill<k128_causal>({{33}, {17}, false, 2, 2}, {}, rng);
  check_prefill<k256_none>({{20}, {45}, false, 2, 2}, {}, rng);
  check_prefill<k64_user_fp16>({{65}, {33}, false, 8, 1}, {}, rng);
}

TEST_CASE("prefill argument errors name the offending value") {
  using K = k64_causal;
  alignas(16) static bfloat16 buf[8 * 64 * 4];
  const ragged_layout l = ragged_layout::fixed(1, 8, 4, 64);
  K::arguments good;
  good.q = {buf, l};
  good.kv = {buf, buf, ragged_layout::fixed(1, 8, 2, 64)};
  good.o = {buf, l};
  CHECK(K::can_implement(good));

  auto expect = [](const K::arguments& a, const char* needle) {
    try {
      K::check(a);
      FAIL("no error for ", needle);
    } catch (const kvtile::error& e) {
      CHECK(e.code() == kvtile::errc::invalid_argument);
      CHECK(std::string(e.what()).find(needle) != std::string::npos);
    }
  };
  auto a = good;
  a.q.layout.head_dim = 80;
  expect(a, "q head_dim is 80");
  a = good;
  a.kv.layout.heads = 3;
  expect(a, "KV heads (3)");
  a = good;
  a.o.data = reinterpret_cast<bfloat16*>(reinterpret_cast<char*>(buf) + 2);
  expect(a, "16-byte aligned");
  a = good;
  a.scale = -1.f;
  expect(a, "got -1");
  a = good;
  static const std::int32_t indptr[2] = {0, 8};
  a.q.layout = ragged_layout::varlen(indptr, 1, 4, 64);
  a.o.layout = a.q.layout;
  expect(a, "max_q_len");
  a = good;
  a.kv.layout.batch = 2;
  expect(a, "kv batch 2");
  // run() checks before touching the device or launching.
  a = good;
  a.q.layout.head_dim = 32;
  CHECK_THROWS_AS(K::run(a), kvtile::error);
}

TEST_CASE("prefill: nothing to compute is a no-op, null pointers allowed (zero-element tensors)") {
  using K = k64_causal;
  K::arguments empty;
  empty.q = {nullptr, ragged_layout::fixed(0, 8, 4, 64)};
  empty.kv = {nullptr, nullptr, ragged_layout::fixed(0, 8, 2, 64)};
  empty.o = {nullptr, ragged_layout::fixed(0, 8, 4, 64)};
  CHECK(K::can_implement(empty));
  K::run(empty);  // empty batch
  empty.q.layout = empty.o.layout = ragged_layout::fixed(3, 0, 4, 64);
  empty.kv.layout = ragged_layout::fixed(3, 5, 2, 64);
  K::run(empty);  // three requests of zero query tokens
  static const std::int32_t indptr[1] = {0};
  empty.q.layout = empty.o.layout = ragged_layout::varlen(indptr, 0, 4, 64);
  empty.kv.layout = ragged_layout::varlen(indptr, 0, 2, 64);
  K::run(empty);  // varlen, empty batch (max_q_len 0 is fine here)
  CHECK(cudaDeviceSynchronize() == cudaSuccess);
  // Shapes are still checked when there is nothing to compute.
  empty.q.layout.head_dim = 80;
  CHECK_THROWS_AS(K::run(empty), kvtile::error);
}
