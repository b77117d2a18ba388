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
#include "kvtile/attention/reference.hpp"
#include "support/test_util.hpp"

namespace {

using namespace kvtile;
using namespace kvtile::attention;

template <class T>
struct device_buffer {
  T* ptr = nullptr;
  std::size_t n = 0;
  explicit device_buffer(std::size_t count) : n(count) {
    KVTILE_CUDA_CHECK(cudaMalloc(&ptr, std::max<std::size_t>(count, 1) * sizeof(T)));
  }
  explicit device_buffer(const std::vector<T>& host) : device_buffer(host.size()) { upload(host); }
  ~device_buffer() { cudaFree(ptr); }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  void upload(const std::vector<T>& host) {
    KVTILE_CUDA_CHECK(cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> host(n);
    KVTILE_CUDA_CHECK(cudaMemcpy(host.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }
};

template <class T>
constexpr double slack = std::is_same_v<T, bfloat16> ? 1e-3 : 1.5e-4;

// One sequence set: fixed-length when every length is equal and varlen is false, otherwise
// packed rows with indptr (on the host for the reference, on the device for the kernel).
struct problem {
  std::vector<std::int32_t> q_lens, kv_lens;
  bool varlen = false;
  std::int32_t hq = 1, hkv = 1;
  float scale = 0.f;  // 0: the kernel's default 1/sqrt(D)
};

std::vector<std::int32_t> indptr_of(const std::vector<std::int32_t>& lens) {
  std::vector<std::int32_t> p(lens.size() + 1, 0);
  std::partial_sum(lens.begin(), lens.end(), p.begin() + 1);
  return p;
}

template <class Kernel>
void check_prefill(const problem& pb, typename Kernel::mask::params mp, std::mt19937_64& rng, bool with_lse = true) {
  using T = typename Kernel::element;
  constexpr int D = Kernel::head_dim;
  const auto batch = std::int32_t(pb.q_lens.size());
  const bool varlen = pb.varlen;
  const std::vector<std::int32_t> q_ptr = indptr_of(pb.q_lens), kv_ptr = indptr_of(pb.kv_lens);
  const std::int64_t q_rows = q_ptr.back(), kv_rows = kv_ptr.back();
  INFO("D=" << D << " mask=" << Kernel::mask::name << " batch=" << batch << " q_len[0]=" << pb.q_lens[0]
            << " kv_len[0]=" << pb.kv_lens[0] << " hq=" << pb.hq << " hkv=" << pb.hkv << " varlen=" << varlen);

  const auto q = kvtile_test::random_vector<T>(std::size_t(q_rows) * pb.hq * D, rng);
  const auto k = kvtile_test::random_vector<T>(std::size_t(kv_rows) * pb.hkv * D, rng);
  const auto v = kvtile_test::random_vector<T>(std::size_t(kv_rows) * pb.hkv * D, rng);
  const double scale = pb.scale > 0.f ? double(pb.scale) : 1.0 / std::sqrt(double(D));

  auto layout_of = [&](const std::vector<std::int32_t>& lens, const std::int32_t* indptr, std::int32_t heads) {
    return varlen ? ragged_layout::varlen(indptr, batch, heads, D) : ragged_layout::fixed(batch, lens[0], heads, D);
  };

  // fp64 reference and the naive low-precision baseline, on the host.
  const ragged_layout hq_l = layout_of(pb.q_lens, q_ptr.data(), pb.hq);
  const ragged_layout hkv_l = layout_of(pb.kv_lens, kv_ptr.data(), pb.hkv);
  const dense_tensor<const T> hq_t{q.data(), hq_l};
  const dense_kv<const T> hkv_t{k.data(), v.data(), hkv_l};
  std::vector<double> o_ref(q.size()), lse_ref(std::size_t(q_rows) * pb.hq);
  reference_attention<typename Kernel::mask>(hq_t, hkv_t, pb.hkv, mp, scale, dense_tensor<double>{o_ref.data(), hq_l},
                                             lse_ref.data());
  std::vector<T> o_low(q.size());
  std::vector<float> lse_low(lse_ref.size());
  naive_attention_lowp<typename Kernel::mask>(hq_t, hkv_t, pb.hkv, mp, scale, dense_tensor<T>{o_low.data(), hq_l},
                                              lse_low.data());

  // The kernel, on poisoned outputs.
  device_buffer<T> dq(q), dk(k), dv(v);
  device_buffer<T> dout(std::vector<T>(q.size(), kvtile_test::poison<T>()));
  device_buffer<float> dlse(std::vector<float>(lse_ref.size(), std::numeric_limits<float>::quiet_NaN()));
  device_buffer<std::int32_t> dq_ptr(q_ptr), dkv_ptr(kv_ptr);
  const ragged_layout dq_l = layout_of(pb.q_lens, dq_ptr.ptr, pb.hq);
  const ragged_layout dkv_l = layout_of(pb.kv_lens, dkv_ptr.ptr, pb.hkv);
  typename Kernel::arguments args;
  args.q = {dq.ptr, dq_l};
  args.kv = {dk.ptr, dv.ptr, dkv_l};
  args.o = {dout.ptr, dq_l};
  args.lse = with_lse ? dlse.ptr : nullptr;
  args.mask_params = mp;
  args.scale = pb.scale;
  args.max_q_len = *std::max_element(pb.q_lens.begin(), pb.q_lens.end());
  REQUIRE(Kernel::workspace_size(args) == 0);
  Kernel::run(args, nullptr, nullptr);
  KVTILE_CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<T> o_got = dout.download();
  const std::vector<float> lse_got = dlse.download();

  const auto err = kvtile_test::compare(o_got, o_ref);
  const auto base = kvtile_test::compare(o_low, o_ref);
  INFO("kernel max_abs=" << err.max_abs << " rel_l2=" << err.rel_l2 << " naive max_abs=" << base.max_abs);
  CHECK_FALSE(err.any_nan);
  CHECK(err.max_abs <= 2 * base.max_abs + slack<T>);
  CHECK(err.rel_l2 <= 2 * base.rel_l2 + 1e-3);

  if (!with_lse) return;
  double lse_err = 0, lse_base = 0;
  int inf_mismatch = 0, nan_count = 0;
  for (std::size_t i = 0; i < lse_ref.size(); ++i) {
    if (std::isnan(lse_got[i])) {
      ++nan_count;
      continue;
    }
    if (std::isinf(lse_ref[i])) {
      inf_mismatch += !(std::isinf(lse_got[i]) && lse_got[i] < 0);
      continue;
    }
    lse_err = std::max(lse_err, std::abs(double(lse_got[i]) - lse_ref[i]));
    lse_base = std::max(lse_base, std::abs(double(lse_low[i]) - lse_ref[i]));
  }
  INFO("lse max_abs=" << lse_err << " naive lse max_abs=" << lse_base);
  CHECK(nan_count == 0);
  CHECK(inf_mismatch == 0);
  CHECK(lse_err <= 2 * lse_base + 1e-3);
}

// The shipped instantiations: defaults for D 64/80/96/128/256, one mask each, plus one user
// tile in fp16.
using k64_causal = cuda::prefill<bfloat16, 64, causal_mask>;
using k80_none = cuda::prefill<bfloat16, 80, no_mask>;
using k96_window = cuda::prefill<bfloat16, 96, sliding_window_mask>;
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
