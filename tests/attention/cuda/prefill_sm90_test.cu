// Tests of kvtile/attention/cuda/prefill_sm90.cuh (Hopper, wgmma) against the fp64 reference
// with FlashAttention's rule: max|kernel - exact| <= 2 * max|naive_lowp - exact| + slack, on
// fresh random inputs, with O and LSE poisoned before every run (every element must be
// written). On a device that is not compute capability 9.x, or a binary without sm_90a code,
// the numeric cases are skipped and run() must throw kvtile::error (unsupported).
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

#include "kvtile/attention/cuda/prefill_sm90.cuh"
#include "attention/cuda/prefill_fixture.cuh"

namespace {

using namespace prefill_test;

using k64_causal = cuda::prefill_sm90<bfloat16, 64, causal_mask>;
using k64_none_fp16 = cuda::prefill_sm90<kvtile::half, 64, no_mask>;
using k128_causal = cuda::prefill_sm90<bfloat16, 128, causal_mask>;
using k128_none = cuda::prefill_sm90<bfloat16, 128, no_mask>;
using k128_window = cuda::prefill_sm90<bfloat16, 128, sliding_window_mask>;
using k128_causal_fp16_kv64 = cuda::prefill_sm90<kvtile::half, 128, causal_mask, tile_shape<64, 64, 4, 2>>;
// The default tiles are the warp-specialised kernel's (TMA producer + consumer warpgroups) on
// fixed-length tensors; varlen cases above run the cp.async kernel. These name both explicitly.
using ws64_kv64_s3 = cuda::prefill_sm90<bfloat16, 64, causal_mask, tile_shape<128, 64, 12, 3>>;
using ws64_three = cuda::prefill_sm90<kvtile::half, 64, no_mask, tile_shape<192, 128, 16, 2>>;
using ws128_one = cuda::prefill_sm90<bfloat16, 128, causal_mask, tile_shape<64, 128, 8, 2>>;
using ws128_s3 = cuda::prefill_sm90<kvtile::half, 128, sliding_window_mask, tile_shape<128, 128, 12, 3>>;
using cp128_default = cuda::prefill_sm90<bfloat16, 128, causal_mask, tile_shape<128, 128, 8, 3>>;
using ws256_causal = cuda::prefill_sm90<bfloat16, 256, causal_mask>;
using ws256_fp16_one = cuda::prefill_sm90<kvtile::half, 256, no_mask, tile_shape<64, 64, 8, 2>>;
static_assert(k128_causal::warp_specialised && ws64_three::warp_specialised && ws128_one::warp_specialised);
static_assert(!cp128_default::warp_specialised && !k128_causal_fp16_kv64::warp_specialised);

// A tiny valid problem: can the current device and binary run the sm_90a kernels?
bool sm90_here() {
  alignas(16) static bfloat16 buf[8 * 64];
  const ragged_layout l = ragged_layout::fixed(1, 8, 1, 64);
  k64_causal::arguments a;
  a.q = {buf, l};
  a.kv = {buf, buf, l};
  a.o = {buf, l};
  const bool ok = k64_causal::can_implement(a);
  if (!ok) MESSAGE("no compute capability 9.x device with sm_90a code in this binary: numeric cases skipped");
  return ok;
}

}  // namespace

TEST_CASE("prefill_sm90 bf16 D=64 causal: odd lengths, GQA 1/4/5, q_len < kv_len, fully masked rows, varlen") {
  if (!sm90_here()) return;
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  check_prefill<k64_causal>({{1}, {1}, false, 1, 1}, {}, rng);
  check_prefill<k64_causal>({{17, 17}, {17, 17}, false, 4, 1}, {}, rng);
  check_prefill<k64_causal>({{1000}, {1000}, false, 5, 1, 0.5f}, {}, rng);  // peaky softmax
  check_prefill<k64_causal>({{100, 100}, {1000, 1000}, false, 4, 1}, {}, rng);
  check_prefill<k64_causal>({{33}, {17}, false, 2, 2}, {}, rng);  // rows 0..15 see no key
  check_prefill<k64_causal>({{4097}, {4097}, false, 2, 1}, {}, rng);
  check_prefill<k64_causal>({{1, 17, 300, 0, 40}, {5, 17, 700, 3, 0}, true, 4, 1}, {}, rng);
}

TEST_CASE("prefill_sm90 fp16 D=64 no mask") {
  if (!sm90_here()) return;
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  check_prefill<k64_none_fp16>({{1000}, {1000}, false, 4, 1, 0.3f}, {}, rng);
  check_prefill<k64_none_fp16>({{1}, {4097}, false, 5, 1}, {}, rng);
  check_prefill<k64_none_fp16>({{17}, {1}, false, 1, 1}, {}, rng);
  check_prefill<k64_none_fp16>({{3, 129, 64}, {200, 1, 64}, true, 5, 1}, {}, rng);
}

TEST_CASE("prefill_sm90 bf16 D=128 causal and no mask") {
  if (!sm90_here()) return;
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  check_prefill<k128_causal>({{1000}, {1000}, false, 5, 1}, {}, rng);
  check_prefill<k128_causal>({{4097}, {4097}, false, 1, 1}, {}, rng);
  check_prefill<k128_causal>({{1, 1}, {1000, 1000}, false, 4, 4}, {}, rng);
  check_prefill<k128_causal>({{200, 65, 1}, {100, 65, 7}, true, 4, 2}, {}, rng);  // q_len > kv_len rows
  check_prefill<k128_none>({{17}, {1000}, false, 4, 1}, {}, rng);
  check_prefill<k128_none>({{1000}, {17}, false, 1, 1}, {}, rng);
  check_prefill<k128_none>({{4097}, {4097}, false, 1, 1}, {}, rng, /*with_lse=*/false);
}

TEST_CASE("prefill_sm90 fp16 D=128 causal with a one-warpgroup tile <64, 64, 4, 2>") {
  if (!sm90_here()) return;
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  check_prefill<k128_causal_fp16_kv64>({{1000}, {1000}, false, 5, 1}, {}, rng);
  check_prefill<k128_causal_fp16_kv64>({{17, 300}, {40, 200}, true, 4, 1}, {}, rng);
}

TEST_CASE("prefill_sm90 bf16 D=128 sliding window with sinks") {
  if (!sm90_here()) return;
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  check_prefill<k128_window>({{1000}, {1000}, false, 4, 1}, {100, 4}, rng);
  check_prefill<k128_window>({{700}, {700}, false, 2, 2}, {130, 70}, rng);  // gap between sinks and window
  check_prefill<k128_window>({{17, 17}, {4097, 4097}, false, 5, 1}, {64, 0}, rng);
  check_prefill<k128_window>({{50, 1, 333}, {50, 900, 400}, true, 4, 1}, {1, 3}, rng);
}

TEST_CASE("prefill_sm90 warp-specialised tiles: 1, 2 and 3 consumer warpgroups, 64-key tiles, 3 stages") {
  if (!sm90_here()) return;
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  check_prefill<ws64_kv64_s3>({{1000}, {1000}, false, 5, 1}, {}, rng);
  check_prefill<ws64_kv64_s3>({{33}, {17}, false, 2, 2}, {}, rng);  // rows 0..15 see no key
  check_prefill<ws64_three>({{4097}, {4097}, false, 2, 1}, {}, rng);
  check_prefill<ws64_three>({{1}, {700}, false, 8, 1}, {}, rng);
  check_prefill<ws128_one>({{1000, 1000}, {1000, 1000}, false, 4, 4}, {}, rng);
  check_prefill<ws128_one>({{300}, {17}, false, 1, 1}, {}, rng);
  check_prefill<ws128_s3>({{1000}, {1000}, false, 4, 1}, {100, 4}, rng);
  check_prefill<ws128_s3>({{700}, {700}, false, 2, 2}, {130, 70}, rng);
  check_prefill<cp128_default>({{1000}, {1000}, false, 4, 1}, {}, rng);  // the cp.async kernel, fixed length
}

TEST_CASE("prefill_sm90 D=256 on the warp-specialised kernel; a strided batch at D=256 runs the mma.sync kernel") {
  if (!sm90_here()) return;
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  check_prefill<ws256_causal>({{1000}, {1000}, false, 4, 1}, {}, rng);
  check_prefill<ws256_causal>({{33, 33}, {17, 17}, false, 2, 2}, {}, rng);
  check_prefill<ws256_fp16_one>({{300}, {777}, false, 5, 1}, {}, rng);
  using P = cuda::prefill<bfloat16, 256, causal_mask>;
  check_prefill<P>({{1000}, {1000}, false, 2, 1}, {}, rng);
  check_prefill<P>({{17, 300}, {40, 300}, true, 4, 1}, {}, rng);  // varlen, warp-specialised
  alignas(16) static bfloat16 buf[2 * 64 * 256];
  P::arguments a;
  a.q = {buf, ragged_layout::fixed(2, 32, 1, 256)};
  a.q.layout.stride_batch = 64 * 256;  // padded batch: no tensor map of rows
  a.kv = {buf, buf, ragged_layout::fixed(2, 32, 1, 256)};
  a.o = {buf, a.q.layout};
  const auto c = P::dispatch(a);
  INFO(c.kernel << ": " << c.reason);
  CHECK(std::string(c.kernel).find("mma.sync") != std::string::npos);
  CHECK_FALSE(ws256_causal::can_implement(a));
}

// The consumer warpgroups take turns through named barriers and the producer refills a slot
// after every consumer warp released it: a wrong order fails only sometimes. So one causal
// problem (diagonal tiles where one warpgroup sees nothing) many times, with fresh inputs.
TEST_CASE("prefill_sm90 warp-specialised kernel, 50 repetitions") {
  if (!sm90_here()) return;
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (int r = 0; r < 50; ++r) {
    check_prefill<k128_causal>({{777, 777}, {777, 777}, false, 4, 2}, {}, rng);
    check_prefill<ws64_three>({{515}, {515}, false, 3, 1}, {}, rng);
  }
}

// More work tiles (q tile, head, sequence) than SMs, sequences of at most
// tuning::prefill_sm90_persistent_max_q queries: the warp-specialised kernel runs persistent CTAs
// that walk several tiles each, the K/V ring, its barrier phases, the ping-pong turns and the Q
// buffer running on from tile to tile (tiles of different lengths, varlen and fixed, causal and
// not, repeated with fresh inputs).
TEST_CASE("prefill_sm90 warp-specialised kernel: persistent CTAs over more work tiles than SMs") {
  if (!sm90_here()) return;
  int sms = 0;
  REQUIRE(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0) == cudaSuccess);
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed << ", " << sms << " SMs");
  std::mt19937_64 rng(seed);
  for (int r = 0; r < 3; ++r) {
    // D 128 causal varlen: 8 q tiles x 10 heads x 3 sequences; D 128 full: 5 x 12 x 3; D 64
    // (three consumer warpgroups) varlen: 6 x 8 x 3. Each above 132 work tiles.
    static_assert(cuda::tuning::prefill_sm90_persistent_max_q >= 1001, "the cases below must run persistent");
    check_prefill<k128_causal>({{900, 250, 1000}, {900, 250, 1000}, true, 10, 2}, {}, rng);
    check_prefill<k128_none>({{600, 600, 600}, {600, 600, 600}, false, 12, 4}, {}, rng);
    check_prefill<ws64_three>({{700, 333, 1001}, {700, 333, 1001}, true, 8, 2}, {}, rng, r % 2 == 0);
  }
}

TEST_CASE("cuda::prefill's dispatch: the warp-specialised kernel on fixed and varlen tensors, cp.async on strided batches") {
  if (!sm90_here()) return;
  using P = cuda::prefill<bfloat16, 128, causal_mask>;
  alignas(16) static bfloat16 buf[64 * 128];
  P::arguments a;
  a.q = {buf, ragged_layout::fixed(1, 64, 1, 128)};
  a.kv = {buf, buf, ragged_layout::fixed(1, 64, 1, 128)};
  a.o = {buf, ragged_layout::fixed(1, 64, 1, 128)};
  const auto fixed = P::dispatch(a);
  INFO(fixed.kernel << ": " << fixed.reason);
  CHECK(std::string(fixed.kernel).find("warp-specialised") != std::string::npos);
  static const std::int32_t indptr[2] = {0, 64};
  auto v = a;
  v.q.layout = v.o.layout = ragged_layout::varlen(indptr, 1, 1, 128);
  v.max_q_len = 64;
  const auto varlen = P::dispatch(v);
  INFO(varlen.kernel << ": " << varlen.reason);
  CHECK(std::string(varlen.kernel).find("warp-specialised") != std::string::npos);
  // D 64: short queries take the 128-row tile, long ones the 192-row default (tuning.hpp).
  using P64 = cuda::prefill<bfloat16, 64, causal_mask>;
  alignas(16) static bfloat16 buf64[2048 * 64];
  P64::arguments s64;
  s64.q = {buf64, ragged_layout::fixed(1, 1024, 1, 64)};
  s64.kv = {buf64, buf64, ragged_layout::fixed(1, 1024, 1, 64)};
  s64.o = {buf64, ragged_layout::fixed(1, 1024, 1, 64)};
  const auto c_short = P64::dispatch(s64);
  INFO(c_short.kernel << ": " << c_short.reason);
  CHECK(c_short.reason.find("<128, 128, 12, 3>") != std::string::npos);
  s64.q.layout = s64.kv.layout = s64.o.layout = ragged_layout::fixed(1, 2048, 1, 64);
  const auto c_long = P64::dispatch(s64);
  INFO(c_long.kernel << ": " << c_long.reason);
  CHECK(c_long.reason.find("<192, 128, 16, 3>") != std::string::npos);
  auto strided = a;  // sequences 2 x 32 tokens apart: no tensor map of rows
  strided.q.layout = strided.o.layout = ragged_layout::fixed(1, 32, 1, 128);
  strided.q.layout.stride_batch = strided.o.layout.stride_batch = 64 * 128;
  const auto c = P::dispatch(strided);
  INFO(c.kernel << ": " << c.reason);
  CHECK(std::string(c.kernel).find("cp.async") != std::string::npos);
  CHECK(c.reason.find("stride_batch") != std::string::npos);
}

// A small representative set, cheap enough for compute-sanitizer memcheck and racecheck.
TEST_CASE("prefill_sm90 small set (sanitizer)") {
  if (!sm90_here()) return;
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  check_prefill<k64_causal>({{17, 17}, {70, 70}, false, 4, 1}, {}, rng);
  check_prefill<k64_causal>({{1, 40, 0}, {5, 17, 3}, true, 5, 1}, {}, rng, /*with_lse=*/false);
  check_prefill<k64_none_fp16>({{150}, {150}, false, 2, 1}, {}, rng);
  check_prefill<k128_causal>({{33}, {17}, false, 2, 2}, {}, rng);
  check_prefill<k128_none>({{20}, {300}, false, 2, 2}, {}, rng);
  check_prefill<k128_window>({{150}, {150}, false, 2, 1}, {40, 3}, rng);
  check_prefill<ws64_three>({{200}, {200}, false, 1, 1}, {}, rng);
  check_prefill<ws128_one>({{70}, {130}, false, 2, 1}, {}, rng);
  check_prefill<k64_causal>({{200, 200}, {200, 200}, false, 80, 8}, {}, rng);  // 2 x 80 x 2 work tiles: persistent
}

TEST_CASE("prefill_sm90 argument errors and unsupported devices") {
  using K = k64_causal;
  alignas(16) static bfloat16 buf[8 * 64 * 4];
  const ragged_layout l = ragged_layout::fixed(1, 8, 4, 64);
  K::arguments good;
  good.q = {buf, l};
  good.kv = {buf, buf, ragged_layout::fixed(1, 8, 2, 64)};
  good.o = {buf, l};
  auto a = good;
  a.q.layout.head_dim = 80;
  CHECK_FALSE(K::can_implement(a));
  try {
    K::check(a);
    FAIL("no error for head_dim 80");
  } catch (const kvtile::error& e) {
    CHECK(e.code() == kvtile::errc::invalid_argument);
    CHECK(std::string(e.what()).find("q head_dim is 80") != std::string::npos);
  }
  CHECK_THROWS_AS(K::run(a), kvtile::error);
  if (!K::can_implement(good)) {
    // Not Hopper, or no sm_90a code: run() refuses clearly instead of launching.
    try {
      K::run(good);
      FAIL("run() did not throw without sm_90a support");
    } catch (const kvtile::error& e) {
      CHECK(e.code() == kvtile::errc::unsupported);
    }
  }
}
