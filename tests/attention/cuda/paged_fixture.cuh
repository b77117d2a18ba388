// Shared fixture of the paged decode / append GPU tests: a host problem (attention/
// paged_problem.hpp: a scattered paged K/V pool from fresh random data, the fp64 reference and
// its 2x rule) planned, run on the GPU with poisoned outputs, and checked.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "kvtile/attention/cuda/append.cuh"
#include "kvtile/attention/cuda/decode.cuh"
#include "kvtile/attention/cuda/paged_attention.cuh"
#include "attention/paged_problem.hpp"
#include "support/device_buffer.cuh"
#include "support/test_util.hpp"

namespace paged_test {

using kvtile_test::device_buffer;

// A host problem that plans itself (CSR tables through the protocol class).
template <class T, int D>
struct problem : host_problem<T, D> {
  using host_problem<T, D>::host_problem;
  using host_problem<T, D>::s;
  using host_problem<T, D>::batch;

  template <class Mask>
  kc::paged_plan plan(typename Mask::params mp, const kc::device_limits& dev) const {
    if (s.padded) {
      paging::padded_page_table t{this->block_table.data(), s.kv_lens.data(), batch, std::max(1, this->max_blocks)};
      return kc::plan_append<Mask>(this->q_indptr.data(), t, this->kernel_problem(), mp, dev, s.opt);
    }
    // CSR tables through the protocol class (padded ones through the free functions above).
    using attn = kc::paged_attention<T, D, Mask>;
    const auto table = this->csr(this->kv_indptr.data(), this->indices.data(), this->last_page_len.data());
    const typename attn::plan_arguments pa{this->q_indptr.data(), table, this->kernel_problem(), dev, s.opt};
    return attn::plan(pa, mp);
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
