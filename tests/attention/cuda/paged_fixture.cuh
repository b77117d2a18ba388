// Shared fixture of the paged decode / append GPU tests: builds a scattered paged K/V pool
// and page table from fresh random data, runs a plan on the GPU, and checks the result
// against the fp64 reference with FlashAttention's 2x rule (kernel error <= 2 x the error of
// the naive algorithm in storage precision + slack), poisoned outputs, and exact LSE rows.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "kvtile/attention/cuda/append.cuh"
#include "kvtile/attention/cuda/decode.cuh"
#include "kvtile/attention/cuda/paged_attention.cuh"
#include "kvtile/attention/reference.hpp"
#include "support/device_buffer.cuh"
#include "support/test_util.hpp"

namespace paged_test {

using namespace kvtile;
using namespace kvtile::attention;
namespace kc = kvtile::attention::cuda;

using kvtile_test::device_buffer;

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

// Host-side problem: pool, page table, queries; and what one run produced.
template <class T, int D>
struct problem {
  spec s;
  std::int32_t batch = 0, num_blocks = 0;
  std::vector<T> k, v, q;
  std::vector<std::int32_t> q_indptr, kv_indptr, indices, last_page_len, block_table;
  std::int32_t max_blocks = 0;

  problem(const spec& sp, std::mt19937_64& rng) : s(sp), batch(std::int32_t(sp.q_lens.size())) {
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

  template <class Mask>
  kc::paged_plan plan(typename Mask::params mp, const kc::device_limits& dev) const {
    if (s.padded) {
      paging::padded_page_table t{block_table.data(), s.kv_lens.data(), batch, std::max(1, max_blocks)};
      return kc::plan_append<Mask>(q_indptr.data(), t, kernel_problem(), mp, dev, s.opt);
    }
    // CSR tables through the protocol class (padded ones through the free functions above).
    using attn = kc::paged_attention<T, D, Mask>;
    const typename attn::plan_arguments pa{q_indptr.data(), csr(kv_indptr.data(), indices.data(), last_page_len.data()),
                                           kernel_problem(), dev, s.opt};
    return attn::plan(pa, mp);
  }

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

// Device copies of a problem and one run of a plan.
template <class T, int D>
struct device_problem {
  const problem<T, D>& p;
  device_buffer<T> k, v, q, o;
  device_buffer<float> lse;
  device_buffer<std::int32_t> q_indptr, kv_indptr, indices, last_page_len, block_table, kv_lens;
  device_buffer<unsigned char>* ws = nullptr;

  explicit device_problem(const problem<T, D>& pr)
      : p(pr), k(pr.k), v(pr.v), q(pr.q), o(pr.q.size()), lse(std::size_t(pr.q_indptr.back()) * pr.s.hq),
        q_indptr(pr.q_indptr), kv_indptr(pr.kv_indptr), indices(pr.indices), last_page_len(pr.last_page_len),
        block_table(pr.block_table), kv_lens(pr.s.kv_lens) {}
  ~device_problem() { delete ws; }

  void poison() {
    o.upload(std::vector<T>(o.n, kvtile_test::poison<T>()));
    lse.upload(std::vector<float>(lse.n, std::nanf("")));
  }
  void prepare(const kc::paged_plan& plan, cudaStream_t stream = nullptr) {
    delete ws;
    ws = new device_buffer<unsigned char>(plan.workspace_bytes());
    kc::upload_plan(plan, ws->ptr, stream);
  }
  template <class Mask>
  void run(const kc::paged_plan& plan, typename Mask::params mp, float scale, cudaStream_t stream = nullptr) {
    const auto ql = p.q_layout(q_indptr.ptr);
    dense_tensor<T> qv{q.ptr, ql}, ov{o.ptr, ql};
    const auto pool = p.pool_view(k.ptr, v.ptr);
    if (p.s.padded) {
      paging::padded_page_table t{block_table.ptr, kv_lens.ptr, p.batch, std::max(1, p.max_blocks)};
      kc::run_append<Mask, D>(plan, ws->ptr, qv, paging::paged_kv<T, paging::padded_page_table>{pool, t}, ov, lse.ptr, mp,
                              scale, stream);
    } else {
      using attn = kc::paged_attention<T, D, Mask>;
      const auto t = p.csr(kv_indptr.ptr, indices.ptr, last_page_len.ptr);
      const typename attn::arguments args{qv, paging::paged_kv<T, paging::csr_page_table>{pool, t}, ov, lse.ptr, mp, scale};
      attn::check(plan, args);
      attn::run(plan, args, ws->ptr, stream);
    }
  }
};

struct outcome {
  double err = 0, naive_err = 0, lse_err = 0;
  bool nan = false;
};

// Check o / lse of a finished run against the reference; returns the errors for more checks.
template <class T, int D, class Mask>
outcome check_against_reference(const problem<T, D>& pr, typename Mask::params mp, float scale, const std::vector<T>& o,
                                const std::vector<float>& lse) {
  std::vector<double> o_ref, lse_ref;
  std::vector<T> o_low;
  pr.template reference<Mask>(mp, scale, o_ref, lse_ref, o_low);
  const auto ek = kvtile_test::compare(o, o_ref);
  const auto en = kvtile_test::compare(o_low, o_ref);
  outcome r{ek.max_abs, en.max_abs, 0, ek.any_nan};
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
  CHECK(r.err <= 2 * r.naive_err + 2e-3);
  CHECK(r.lse_err <= 2e-3);
  return r;
}

inline float default_scale(int d) { return 1.f / std::sqrt(float(d)); }

inline kc::device_limits limits() {
  static const kc::device_limits d = kc::query_device_limits();
  return d;
}

// Plan, run (poisoned outputs), check; optionally also unsplit == split.
template <class T, int D, class Mask>
void check_problem(const problem<T, D>& pr, typename Mask::params mp, bool compare_unsplit) {
  const spec& sp = pr.s;
  const float scale = default_scale(D);
  device_problem<T, D> dp(pr);
  const auto plan = pr.template plan<Mask>(mp, limits());
  INFO("kernel " << kc::to_string(plan.shape.kind) << ", work items "
                 << plan.work.size() << ", split chunks of " << plan.chunk_tiles << " tiles, partials "
                 << plan.num_partials);
  dp.prepare(plan);
  dp.poison();
  dp.template run<Mask>(plan, mp, scale);
  KVTILE_CUDA_CHECK(cudaDeviceSynchronize());
  const auto o = dp.o.download();
  const auto lse = dp.lse.download();
  const auto r = check_against_reference<T, D, Mask>(pr, mp, scale, o, lse);
  {
    // The same plan and workspace again (as a replayed graph would): the same bits, so nothing a
    // run leaves in the workspace leaks into the next.
    dp.poison();
    dp.template run<Mask>(plan, mp, scale);
    KVTILE_CUDA_CHECK(cudaDeviceSynchronize());
    const auto o_again = dp.o.download();
    const auto lse_again = dp.lse.download();
    CHECK(std::memcmp(o_again.data(), o.data(), o.size() * sizeof(T)) == 0);
    CHECK(std::memcmp(lse_again.data(), lse.data(), lse.size() * sizeof(float)) == 0);
  }
  if (compare_unsplit) {
    spec s2 = sp;
    s2.opt.split_kv = false;
    problem<T, D> pr2 = pr;
    pr2.s = s2;
    const auto plan2 = pr2.template plan<Mask>(mp, limits());
    device_problem<T, D> dp2(pr2);
    dp2.prepare(plan2);
    dp2.poison();
    dp2.template run<Mask>(plan2, mp, scale);
    KVTILE_CUDA_CHECK(cudaDeviceSynchronize());
    const auto o2 = dp2.o.download();
    double diff = 0;
    for (std::size_t i = 0; i < o.size(); ++i) diff = std::max(diff, std::abs(to_double(o[i]) - to_double(o2[i])));
    INFO("split (" << plan.num_partials << " partials) vs unsplit max diff " << diff);
    CHECK(plan2.num_partials == 0);
    CHECK(diff <= r.naive_err + 2e-3);
  }
}

template <class T, int D, class Mask>
void run_and_check(const spec& sp, typename Mask::params mp, std::uint64_t seed, bool compare_unsplit = false) {
  std::mt19937_64 rng(seed);
  const problem<T, D> pr(sp, rng);
  check_problem<T, D, Mask>(pr, mp, compare_unsplit);
  // Where the planner picked an sm_90a kernel, the portable kernel is checked on the same data too.
  const auto kind = pr.template plan<Mask>(mp, limits()).shape.kind;
  if (kind == kc::paged_kernel_kind::append_sm90 || kind == kc::paged_kernel_kind::decode_sm90) {
    problem<T, D> portable = pr;
    portable.s.opt.use_wgmma = false;
    INFO("portable kernel");
    check_problem<T, D, Mask>(portable, mp, compare_unsplit);
  }
}

}  // namespace paged_test
