// GPU tests of kvtile/attention/cuda/merge.cuh: merging attention states (O, LSE), against an
// fp64 evaluation of the merge formula, with empty (-inf) states; and a cascade: attention over
// two disjoint key sets merged equals attention over their union (fp64 reference).
#include <doctest/doctest.h>

#include "attention/cuda/paged_fixture.cuh"
#include "kvtile/attention/cuda/merge.cuh"

using namespace paged_test;

namespace {

// fp64 merge of states (o_i, lse_i), i = 0..n-1, of one row.
void merge_ref(const std::vector<std::vector<double>>& o, const std::vector<double>& lse, std::vector<double>& out,
               double& out_lse) {
  double m = -INFINITY;
  for (double x : lse) m = std::max(m, x);
  out.assign(o[0].size(), 0.0);
  if (m == -INFINITY) {
    out_lse = -INFINITY;
    return;
  }
  double s = 0;
  for (double x : lse) s += std::exp(x - m);
  out_lse = m + std::log(s);
  for (std::size_t i = 0; i < o.size(); ++i) {
    const double w = std::exp(lse[i] - out_lse);
    for (std::size_t d = 0; d < out.size(); ++d) out[d] += w * o[i][d];
  }
}

}  // namespace

TEST_CASE("merge_states and merge_state_list match the fp64 merge, empty states included") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const std::int64_t rows = 301;
  const int d = 80;
  for (int n : {2, 5}) {
    std::vector<float> lse(std::size_t(n) * rows);
    std::uniform_real_distribution<float> ld(-5.f, 5.f);
    for (auto& x : lse) x = ld(rng);
    for (std::int64_t r = 0; r < rows; r += 7) lse[r] = -INFINITY;                       // one state empty
    for (std::int64_t r = 3; r < rows; r += 11) for (int i = 0; i < n; ++i) lse[i * rows + r] = -INFINITY;  // all empty
    auto o = kvtile_test::random_vector<bfloat16>(std::size_t(n) * rows * d, rng);
    for (std::int64_t r = 3; r < rows; r += 11)  // empty states carry zeros
      for (int i = 0; i < n; ++i) std::fill_n(o.begin() + (i * rows + r) * d, d, bfloat16(0.f));
    device_buffer<bfloat16> o_d(o), out_d(std::size_t(rows) * d);
    device_buffer<float> lse_d(lse), out_lse_d(rows);
    out_d.upload(std::vector<bfloat16>(out_d.n, kvtile_test::poison<bfloat16>()));
    if (n == 2)
      kc::merge_states(o_d.ptr, lse_d.ptr, o_d.ptr + rows * d, lse_d.ptr + rows, out_d.ptr, out_lse_d.ptr, rows, d);
    else
      kc::merge_state_list(o_d.ptr, lse_d.ptr, n, out_d.ptr, out_lse_d.ptr, rows, d);
    KVTILE_CUDA_CHECK(cudaDeviceSynchronize());
    const auto got = out_d.download();
    const auto got_lse = out_lse_d.download();
    std::vector<double> ref(std::size_t(rows) * d), ref_lse(rows);
    double lse_err = 0;
    for (std::int64_t r = 0; r < rows; ++r) {
      std::vector<std::vector<double>> os(n, std::vector<double>(d));
      std::vector<double> ls(n);
      for (int i = 0; i < n; ++i) {
        ls[i] = lse[i * rows + r];
        for (int x = 0; x < d; ++x) os[i][x] = to_double(o[(i * rows + r) * d + x]);
      }
      std::vector<double> out;
      merge_ref(os, ls, out, ref_lse[r]);
      std::copy(out.begin(), out.end(), ref.begin() + r * d);
      if (std::isinf(ref_lse[r])) {
        CHECK((std::isinf(got_lse[r]) && got_lse[r] < 0));
      } else {
        lse_err = std::max(lse_err, std::abs(got_lse[r] - ref_lse[r]));
      }
    }
    const auto e = kvtile_test::compare(got, ref);
    INFO("states " << n << " max err " << e.max_abs << " lse err " << lse_err);
    CHECK_FALSE(e.any_nan);
    CHECK(e.max_abs <= 8e-3);  // one bf16 rounding of values in [-1, 1]
    CHECK(lse_err <= 1e-4);
  }
}

TEST_CASE("cascade: attention over a shared prefix and a suffix, merged, equals attention over both") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  // Two requests, one query token each; keys = prefix (300) ++ suffix (lengths below).
  const std::vector<std::int32_t> pre = {300, 300}, suf = {77, 1};
  spec full, a, b;
  for (spec* s : {&full, &a, &b}) {
    s->hkv = 2;
    s->hq = 10;
    s->page_size = 16;
    s->q_lens = {1, 1};
  }
  full.kv_lens = {pre[0] + suf[0], pre[1] + suf[1]};
  a.kv_lens = pre;
  b.kv_lens = suf;
  problem<bfloat16, 128> pf(full, rng), pa(a, rng), pb(b, rng);
  pa.q = pf.q;
  pb.q = pf.q;
  // Copy the full problem's tokens into the prefix / suffix problems.
  const auto vf = pf.pool_view(pf.k.data(), pf.v.data());
  for (int bi = 0; bi < 2; ++bi)
    for (int t = 0; t < full.kv_lens[bi]; ++t)
      for (int h = 0; h < 2; ++h) {
        problem<bfloat16, 128>& dst = t < pre[bi] ? pa : pb;
        const int tt = t < pre[bi] ? t : t - pre[bi];
        const auto vd = dst.pool_view(dst.k.data(), dst.v.data());
        const auto so = vf.offset(pf.indices[pf.kv_indptr[bi] + t / 16], t % 16, h);
        const auto dof = vd.offset(dst.indices[dst.kv_indptr[bi] + tt / 16], tt % 16, h);
        std::copy_n(pf.k.begin() + so, 128, dst.k.begin() + dof);
        std::copy_n(pf.v.begin() + so, 128, dst.v.begin() + dof);
      }
  const float scale = default_scale(128);
  device_problem<bfloat16, 128> da(pa), db(pb);
  const auto plan_a = pa.plan<no_mask>({}, limits()), plan_b = pb.plan<no_mask>({}, limits());
  da.prepare(plan_a);
  db.prepare(plan_b);
  da.poison();
  db.poison();
  da.run<no_mask>(plan_a, {}, scale);
  db.run<no_mask>(plan_b, {}, scale);
  // o_a <- merge(o_a, o_b), in place: rows = tokens x heads.
  const std::int64_t rows = std::int64_t(pf.q_indptr.back()) * full.hq;
  kc::merge_states(da.o.ptr, da.lse.ptr, db.o.ptr, db.lse.ptr, da.o.ptr, da.lse.ptr, rows, 128);
  KVTILE_CUDA_CHECK(cudaDeviceSynchronize());
  const auto r = check_against_reference<bfloat16, 128, no_mask>(pf, {}, scale, da.o.download(), da.lse.download());
  (void)r;
}
