// Shared fixture of the prefill GPU tests (prefill_test.cu, prefill_sm90_test.cu): one
// problem (fixed-length or varlen) on fresh random data, run through a kernel type with the
// prefill protocol, checked against the fp64 reference with FlashAttention's rule
// (max|kernel - exact| <= 2 * max|naive_lowp - exact| + slack), with O and LSE poisoned before
// the run (every element must be written) and LSE rows checked, -inf included.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <functional>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include <cuda_runtime.h>

#include "kvtile/attention/reference.hpp"
#include "support/device_buffer.cuh"
#include "support/test_util.hpp"

namespace prefill_test {

using namespace kvtile;
using namespace kvtile::attention;
using kvtile_test::device_buffer;

using namespace kvtile;
using namespace kvtile::attention;


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
// use_workspace: run with a workspace of Kernel::workspace_size(args) bytes (a rotary variant
// then rotates Q and K once into it where it can); else with none.
void check_prefill(const problem& pb, typename Kernel::mask::params mp, std::mt19937_64& rng, bool with_lse = true,
                   bool use_workspace = true) {
  using T = typename Kernel::element;
  constexpr int D = Kernel::head_dim;
  const auto batch = std::int32_t(pb.q_lens.size());
  const bool varlen = pb.varlen;
  const std::vector<std::int32_t> q_ptr = indptr_of(pb.q_lens), kv_ptr = indptr_of(pb.kv_lens);
  const std::int64_t q_rows = q_ptr.back(), kv_rows = kv_ptr.back();
  INFO("D=" << D << " mask=" << Kernel::mask::name << " batch=" << batch << " q_len[0]=" << pb.q_lens[0]
            << " kv_len[0]=" << pb.kv_lens[0] << " hq=" << pb.hq << " hkv=" << pb.hkv << " varlen=" << varlen);
  // A fixed-length problem has one length per side (the test's own mistake otherwise).
  if (!varlen)
    REQUIRE((std::adjacent_find(pb.q_lens.begin(), pb.q_lens.end(), std::not_equal_to<>()) == pb.q_lens.end() &&
             std::adjacent_find(pb.kv_lens.begin(), pb.kv_lens.end(), std::not_equal_to<>()) == pb.kv_lens.end()));

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
  const std::size_t ws_bytes = Kernel::workspace_size(args);
  if constexpr (!kvtile::attention::has_rotary<typename Kernel::mask>) REQUIRE(ws_bytes == 0);
  device_buffer<unsigned char> ws(std::max<std::size_t>(ws_bytes, 1));
  INFO("workspace " << ws_bytes << " bytes" << (use_workspace ? "" : ", not given"));
  Kernel::run(args, use_workspace && ws_bytes ? ws.ptr : nullptr, nullptr);
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

}  // namespace prefill_test
