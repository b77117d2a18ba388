// Host side of the paged attention tests: a scattered paged K/V pool and page table built from
// fresh random data (only slots that hold a token get data; the rest stay poisoned), and the
// check of a run against the fp64 reference with FlashAttention's 2x rule (kernel error <= 2 x
// the error of the naive algorithm in storage precision + slack) and exact LSE rows. The GPU
// tests (cuda/paged_fixture.cuh) and the host emulation of the kernels share it.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "kvtile/attention/cuda/plan.hpp"
#include "kvtile/attention/reference.hpp"
#include "kvtile/paging/paged_view.hpp"
#include "support/test_util.hpp"

namespace paged_test {

using namespace kvtile;
using namespace kvtile::attention;
namespace kc = kvtile::attention::cuda;

struct spec {
  std::vector<std::int32_t> q_lens;
  std::vector<std::int32_t> kv_lens;
  std::int32_t hq = 8, hkv = 2;
  std::int32_t page_size = 16;
  kv_layout layout = kv_layout::nhd;
  bool padded = false;      // vLLM-style block table instead of CSR
  bool contiguous = false;  // blocks of each request consecutive and in order (dense memory)
  kc::plan_options opt{};
};

// Host-side problem: pool, page table, queries; the fp64 reference of a run.
template <class T, int D>
struct host_problem {
  spec s;
  std::int32_t batch = 0, num_blocks = 0;
  std::vector<T> k, v, q;
  std::vector<std::int32_t> q_indptr, kv_indptr, indices, last_page_len, block_table;
  std::int32_t max_blocks = 0;

  host_problem(const spec& sp, std::mt19937_64& rng) : s(sp), batch(std::int32_t(sp.q_lens.size())) {
    REQUIRE(sp.kv_lens.size() == sp.q_lens.size());
    q_indptr.assign(1, 0);
    kv_indptr.assign(1, 0);
    for (std::int32_t b = 0; b < batch; ++b) {
      q_indptr.push_back(q_indptr.back() + sp.q_lens[b]);
      const std::int32_t nb = (sp.kv_lens[b] + sp.page_size - 1) / sp.page_size;
      kv_indptr.push_back(kv_indptr.back() + nb);
      max_blocks = std::max(max_blocks, nb);
      last_page_len.push_back(nb ? sp.kv_lens[b] - (nb - 1) * sp.page_size : 0);
    }
    const std::int32_t used = kv_indptr.back();
    num_blocks = sp.contiguous ? used : used + used / 4 + 3;  // spare blocks stay poisoned
    std::vector<std::int32_t> ids(num_blocks);
    std::iota(ids.begin(), ids.end(), 0);
    if (!sp.contiguous) std::shuffle(ids.begin(), ids.end(), rng);
    indices.assign(ids.begin(), ids.begin() + used);
    block_table.assign(std::size_t(batch) * std::max(1, max_blocks), -1);
    for (std::int32_t b = 0; b < batch; ++b)
      for (std::int32_t i = kv_indptr[b]; i < kv_indptr[b + 1]; ++i)
        block_table[std::size_t(b) * std::max(1, max_blocks) + (i - kv_indptr[b])] = indices[i];
    const std::size_t pool = std::size_t(num_blocks) * sp.page_size * sp.hkv * D;
    k.assign(pool, kvtile_test::poison<T>());
    v.assign(pool, kvtile_test::poison<T>());
    // Only slots that hold a token get data: a kernel that reads past kv_len reads NaN.
    const auto view = pool_view(k.data(), v.data());
    std::uniform_real_distribution<float> dist(-1.f, 1.f);
    for (std::int32_t b = 0; b < batch; ++b)
      for (std::int32_t t = 0; t < sp.kv_lens[b]; ++t)
        for (std::int32_t h = 0; h < sp.hkv; ++h) {
          const std::int64_t off = view.offset(indices[kv_indptr[b] + t / sp.page_size], t % sp.page_size, h);
          for (int x = 0; x < D; ++x) {
            k[off + x] = from_float<T>(dist(rng));
            v[off + x] = from_float<T>(dist(rng));
          }
        }
    q = kvtile_test::random_vector<T>(std::size_t(q_indptr.back()) * sp.hq * D, rng);
  }

  paging::kv_pool_view<T> pool_view(T* kp, T* vp) const {
    return paging::kv_pool_view<T>::make(kp, vp, s.layout, num_blocks, s.page_size, s.hkv, D);
  }
  paging::csr_page_table csr(const std::int32_t* ip, const std::int32_t* ix, const std::int32_t* lp) const {
    return {ip, ix, lp, batch};
  }
  ragged_layout q_layout(const std::int32_t* ip) const { return ragged_layout::varlen(ip, batch, s.hq, D); }
  kc::paged_problem kernel_problem() const { return {s.hq, s.hkv, D, s.page_size, num_blocks, 2}; }

  // fp64 reference and the naive low-precision baseline, through the same paged view.
  template <class Mask>
  void reference(typename Mask::params mp, float scale, std::vector<double>& o_ref, std::vector<double>& lse_ref,
                 std::vector<T>& o_low) const {
    const auto table = csr(kv_indptr.data(), indices.data(), last_page_len.data());
    paging::paged_kv<T, paging::csr_page_table> src{pool_view(const_cast<T*>(k.data()), const_cast<T*>(v.data())), table};
    const auto ql = q_layout(q_indptr.data());
    dense_tensor<T> qv{const_cast<T*>(q.data()), ql};
    o_ref.assign(q.size(), 0.0);
    lse_ref.assign(std::size_t(q_indptr.back()) * s.hq, 0.0);
    reference_attention<Mask>(qv, src, s.hkv, mp, double(scale), dense_tensor<double>{o_ref.data(), ql}, lse_ref.data());
    o_low.assign(q.size(), T{});
    naive_attention_lowp<Mask>(qv, src, s.hkv, mp, double(scale), dense_tensor<T>{o_low.data(), ql});
  }
};

struct outcome {
  double err = 0, naive_err = 0, lse_err = 0;
  bool nan = false;
};

// Check o / lse of a finished run against a reference (o_ref, lse_ref in fp64) with the 2x rule
// over the naive algorithm's error naive_err, plus the rounding of the output to T at its largest
// magnitude (half an ulp, which any kernel may pay where the naive one happened not to: with
// outputs near 2^20 the naive bf16 error can be 1.9e3 and an exact-then-rounded output off by
// 4.1e3); returns the errors for more checks.
template <class T>
outcome check_outputs(const std::vector<T>& o, const std::vector<float>& lse, const std::vector<double>& o_ref,
                      const std::vector<double>& lse_ref, double naive_err) {
  const auto ek = kvtile_test::compare(o, o_ref);
  outcome r{ek.max_abs, naive_err, 0, ek.any_nan};
  for (std::size_t i = 0; i < lse.size(); ++i) {
    if (std::isinf(lse_ref[i])) {
      if (!(std::isinf(lse[i]) && lse[i] < 0)) r.lse_err = 1e30;
    } else {
      r.lse_err = std::max(r.lse_err, std::abs(double(lse[i]) - lse_ref[i]));
      if (std::isnan(lse[i])) r.nan = true;
    }
  }
  INFO("kernel max err " << r.err << ", naive " << std::string(element_name<T>) << " max err " << r.naive_err << ", lse err "
                         << r.lse_err);
  CHECK_FALSE(r.nan);
  double ref_max = 0;
  for (double x : o_ref) ref_max = std::max(ref_max, std::abs(x));
  const double rounding = ref_max * (std::is_same_v<T, kvtile::bfloat16> ? 0x1p-8
                                     : std::is_same_v<T, kvtile::half>   ? 0x1p-11
                                                                         : 0x1p-24);  // half an ulp of T
  CHECK(r.err <= 2 * r.naive_err + 2e-3 + rounding);
  CHECK(r.lse_err <= 2e-3);
  return r;
}

// The same against the problem's own reference.
template <class T, int D, class Mask>
outcome check_against_reference(const host_problem<T, D>& pr, typename Mask::params mp, float scale, const std::vector<T>& o,
                                const std::vector<float>& lse) {
  std::vector<double> o_ref, lse_ref;
  std::vector<T> o_low;
  pr.template reference<Mask>(mp, scale, o_ref, lse_ref, o_low);
  return check_outputs(o, lse, o_ref, lse_ref, kvtile_test::compare(o_low, o_ref).max_abs);
}

}  // namespace paged_test
