// Test fixtures for the CPU attention kernels: random problems (dense fixed, dense varlen, or
// paged CSR / padded in NHD / HND with shuffled blocks) and the FlashAttention error rule.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "kvtile/attention/dense_view.hpp"
#include "kvtile/attention/reference.hpp"
#include "kvtile/paging/paged_view.hpp"
#include "support/test_util.hpp"

namespace kvtile_test {

using namespace kvtile;
using namespace kvtile::attention;

// Q, K, V of a batch, packed [tokens, heads, dim] with cumulative lengths.
template <class T>
struct problem {
  std::vector<std::int32_t> q_indptr, kv_indptr;
  std::int32_t hq = 0, hk = 0, d = 0;
  std::vector<T> q, k, v;
  bool fixed = false;  // all sequences equal: use the fixed-length layout

  std::int32_t batch() const { return std::int32_t(q_indptr.size()) - 1; }
  ragged_layout q_layout() const {
    if (fixed) return ragged_layout::fixed(batch(), q_indptr[1], hq, d);
    return ragged_layout::varlen(q_indptr.data(), batch(), hq, d);
  }
  ragged_layout kv_layout() const {
    if (fixed) return ragged_layout::fixed(batch(), kv_indptr[1], hk, d);
    return ragged_layout::varlen(kv_indptr.data(), batch(), hk, d);
  }
  dense_tensor<const T> q_view() const { return {q.data(), q_layout()}; }
  dense_kv<const T> kv_view() const { return {k.data(), v.data(), kv_layout()}; }
  std::size_t q_elems() const { return std::size_t(q_indptr.back()) * hq * d; }
  std::size_t lse_elems() const { return std::size_t(q_indptr.back()) * hq; }
};

inline std::vector<std::int32_t> indptr_of(const std::vector<int>& lens) {
  std::vector<std::int32_t> p(1, 0);
  for (int l : lens) p.push_back(p.back() + l);
  return p;
}

template <class T>
problem<T> make_problem(std::mt19937_64& rng, const std::vector<int>& q_lens, const std::vector<int>& kv_lens, int hq,
                        int hk, int d, float range = 1.f) {
  problem<T> p;
  p.q_indptr = indptr_of(q_lens);
  p.kv_indptr = indptr_of(kv_lens);
  p.hq = hq;
  p.hk = hk;
  p.d = d;
  p.fixed = std::all_of(q_lens.begin(), q_lens.end(), [&](int l) { return l == q_lens[0]; }) &&
            std::all_of(kv_lens.begin(), kv_lens.end(), [&](int l) { return l == kv_lens[0]; });
  p.q = random_vector<T>(std::size_t(p.q_indptr.back()) * hq * d, rng, -range, range);
  p.k = random_vector<T>(std::size_t(p.kv_indptr.back()) * hk * d, rng, -range, range);
  p.v = random_vector<T>(std::size_t(p.kv_indptr.back()) * hk * d, rng);
  return p;
}

// The same K/V copied into a pool of shuffled blocks (plus unused ones, filled with poison),
// described by a CSR and a padded page table.
template <class T>
struct paged_copy {
  std::vector<T> k, v;
  std::vector<std::int32_t> indptr, indices, last_page_len, block_table, kv_lens;
  paging::kv_pool_view<const T> pool;
  std::int32_t max_blocks = 0;

  paging::paged_kv<const T, paging::csr_page_table> csr() const {
    return {pool, {indptr.data(), indices.data(), last_page_len.data(), std::int32_t(kv_lens.size())}};
  }
  paging::paged_kv<const T, paging::padded_page_table> padded() const {
    return {pool, {block_table.data(), kv_lens.data(), std::int32_t(kv_lens.size()), max_blocks}};
  }
};

template <class T>
paged_copy<T> make_paged(const problem<T>& p, int page_size, kv_layout layout, std::mt19937_64& rng) {
  paged_copy<T> c;
  const int batch = p.batch();
  std::vector<int> blocks_of(batch);
  int total = 0;
  for (int b = 0; b < batch; ++b) {
    const int len = p.kv_indptr[b + 1] - p.kv_indptr[b];
    c.kv_lens.push_back(len);
    blocks_of[b] = (len + page_size - 1) / page_size;
    c.max_blocks = std::max(c.max_blocks, blocks_of[b] + 1);  // one spare column
    total += blocks_of[b];
  }
  const int num_blocks = total + 3;  // a few blocks no sequence uses
  std::vector<std::int32_t> perm(num_blocks);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  const std::int64_t block_elems = std::int64_t(page_size) * p.hk * p.d + 8;  // padded blocks
  c.k.assign(std::size_t(num_blocks * block_elems), poison<T>());
  c.v.assign(c.k.size(), poison<T>());
  auto pool = paging::kv_pool_view<T>::make(c.k.data(), c.v.data(), layout, num_blocks, page_size, p.hk, p.d, block_elems);
  c.indptr.push_back(0);
  c.block_table.assign(std::size_t(batch) * c.max_blocks, -1);
  int next = 0;
  for (int b = 0; b < batch; ++b) {
    for (int i = 0; i < blocks_of[b]; ++i) {
      c.indices.push_back(perm[next++]);
      c.block_table[std::size_t(b) * c.max_blocks + i] = c.indices.back();
    }
    c.indptr.push_back(std::int32_t(c.indices.size()));
    c.last_page_len.push_back(c.kv_lens[b] == 0 ? 0 : c.kv_lens[b] - (blocks_of[b] - 1) * page_size);
    for (int t = 0; t < c.kv_lens[b]; ++t)
      for (int h = 0; h < p.hk; ++h) {
        const std::int64_t dst = pool.offset(c.block_table[std::size_t(b) * c.max_blocks + t / page_size], t % page_size, h);
        const std::size_t src = (std::size_t(p.kv_indptr[b] + t) * p.hk + h) * p.d;
        std::copy_n(&p.k[src], p.d, &c.k[dst]);
        std::copy_n(&p.v[src], p.d, &c.v[dst]);
      }
  }
  c.pool = {c.k.data(), c.v.data(), pool.stride_block, pool.stride_token, pool.stride_head,
            pool.num_blocks, pool.page_size, pool.num_kv_heads, pool.head_dim};
  return c;
}

// The fp64 answer and the naive low-precision answer's error: FlashAttention's yardstick.
template <class Mask, class T>
struct exact_answer {
  std::vector<double> o, lse;
  double naive_err = 0;  // max |naive_lowp - exact|
};

template <class Mask, class T>
exact_answer<Mask, T> exact_forward(const problem<T>& p, typename Mask::params mp, double scale) {
  exact_answer<Mask, T> e;
  e.o.assign(p.q_elems(), 0);
  e.lse.assign(p.lse_elems(), 0);
  reference_attention<Mask>(p.q_view(), p.kv_view(), p.hk, mp, scale, dense_tensor<double>{e.o.data(), p.q_layout()},
                            e.lse.data());
  std::vector<T> naive(p.q_elems());
  naive_attention_lowp<Mask>(p.q_view(), p.kv_view(), p.hk, mp, scale, dense_tensor<T>{naive.data(), p.q_layout()});
  e.naive_err = compare(naive, e.o).max_abs;
  return e;
}

// Slack of the 2x rule: a few units of the storage type's rounding at |o| <= 1.
template <class T>
constexpr double rule_slack() {
  if constexpr (std::is_same_v<T, float>) return 2e-6;
  else if constexpr (std::is_same_v<T, half>) return 2e-3;
  else return 1e-2;
}

// Checks o/lse of a kernel against the exact answer: the 2x rule, no NaN, LSE close (and -inf
// exactly where the reference has it).
template <class Mask, class T>
void check_rule(const std::vector<T>& o, const std::vector<float>& lse, const exact_answer<Mask, T>& e) {
  const auto s = compare(o, e.o);
  // fp32 scores carry an absolute error of a few ulps of the largest score, and an error d in a
  // score moves the output by up to ~d (|v| <= 1). Scores are bounded by the rows' LSE, so the
  // slack grows with them; at ordinary logits it stays ~1e-6, at logits near 1e4 ~5e-3.
  double max_lse = 0;
  for (double l : e.lse)
    if (std::isfinite(l)) max_lse = std::max(max_lse, std::abs(l));
  const double slack = rule_slack<T>() + 8 * 5.96e-8 * max_lse;
  INFO("kernel max err " << s.max_abs << ", naive low-precision max err " << e.naive_err << ", slack " << slack);
  CHECK_FALSE(s.any_nan);
  CHECK(s.max_abs <= 2 * e.naive_err + slack);
  REQUIRE(lse.size() == e.lse.size());
  int lse_bad = 0;
  for (std::size_t i = 0; i < lse.size(); ++i) {
    if (std::isinf(e.lse[i])) lse_bad += !(std::isinf(lse[i]) && lse[i] < 0);
    else lse_bad += !(std::abs(lse[i] - e.lse[i]) <= 1e-4 * (1 + std::abs(e.lse[i])));
  }
  CHECK(lse_bad == 0);
}

}  // namespace kvtile_test
