// Host tests of kvtile/attention/cuda/plan.hpp (no GPU): argument checks against the host page
// table, and the split-KV partition: every key of every row tile is covered exactly once, small
// batches get split to fill the device, large ones are not over-split.
#include <doctest/doctest.h>

#include <algorithm>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "kvtile/attention/cuda/plan.hpp"
#include "support/test_util.hpp"

using namespace kvtile;
using namespace kvtile::attention;
namespace kc = kvtile::attention::cuda;

namespace {

struct host_csr {
  std::vector<std::int32_t> indptr{0}, indices, last;
  host_csr(const std::vector<std::int32_t>& kv_lens, int page, std::int32_t pool, std::mt19937_64& rng) {
    std::vector<std::int32_t> ids(pool);
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    std::size_t next = 0;
    for (auto l : kv_lens) {
      const int nb = (l + page - 1) / page;
      for (int i = 0; i < nb; ++i) indices.push_back(ids.at(next++));
      indptr.push_back(std::int32_t(indices.size()));
      last.push_back(nb ? l - (nb - 1) * page : 0);
    }
  }
  paging::csr_page_table table() const {
    return {indptr.data(), indices.data(), last.data(), std::int32_t(last.size())};
  }
};

// H100 as query_device_limits() describes it to a binary with sm_90a code.
kc::device_limits h100_sm90() {
  kc::device_limits d{132, 228 * 1024, 227 * 1024, 32};
  d.wgmma = true;
  return d;
}

std::vector<std::int32_t> indptr_of(const std::vector<std::int32_t>& lens) {
  std::vector<std::int32_t> p{0};
  for (auto l : lens) p.push_back(p.back() + l);
  return p;
}

// Every (request, kv head, row tile)'s hull is covered by disjoint, contiguous work ranges,
// and split tiles have exactly one merge item naming their partials.
template <class Mask>
void check_partition(const kc::paged_plan& plan, typename Mask::params mp) {
  std::map<std::tuple<int, int, int>, std::vector<std::pair<int, int>>> ranges;
  std::map<std::tuple<int, int, int>, std::vector<int>> partials;
  for (const auto& w : plan.work) {
    ranges[{w.batch, w.kv_head, w.row0}].push_back({w.kv_begin, w.kv_end});
    if (w.partial >= 0) partials[{w.batch, w.kv_head, w.row0}].push_back(w.partial);
  }
  const int group = plan.group(), bm = plan.shape.block_m;
  std::size_t tiles = 0;
  for (int b = 0; b < plan.batch; ++b) {
    const int rows = plan.q_len[b] * group;
    const Mask mask(mp, plan.q_len[b], plan.kv_len[b]);
    for (int row0 = 0; row0 < rows; row0 += bm)
      for (int h = 0; h < plan.problem.num_kv_heads; ++h) {
        ++tiles;
        auto rs = ranges[{b, h, row0}];
        REQUIRE(!rs.empty());
        std::sort(rs.begin(), rs.end());
        const int t0 = row0 / group, t1 = (std::min(row0 + bm, rows) - 1) / group + 1;
        // The TMA decode kernel's items start at a multiple of the tile (keys before the mask's
        // first visible one are masked in the kernel).
        const int kb = std::max(0, mask.kv_begin(t0, t1));
        const int bn = plan.shape.block_n;
        CHECK(rs.front().first == (plan.shape.kind == kc::paged_kernel_kind::decode_sm90 ? kb - kb % bn : kb));
        CHECK(rs.back().second == std::min(plan.kv_len[b], std::max(rs.front().first, mask.kv_end(t0, t1))));
        for (std::size_t i = 1; i < rs.size(); ++i) CHECK(rs[i].first == rs[i - 1].second);
        CHECK((rs.size() == 1) == partials[{b, h, row0}].empty());
      }
  }
  CHECK(ranges.size() == tiles);
  std::size_t merged = 0;
  for (const auto& m : plan.merges) {
    auto ps = partials[{m.batch, m.kv_head, m.row0}];
    std::sort(ps.begin(), ps.end());
    REQUIRE(int(ps.size()) == m.count);
    for (int i = 0; i < m.count; ++i) CHECK(ps[i] == m.first + i);
    merged += m.count;
  }
  CHECK(merged == std::size_t(plan.num_partials));
  // TMA decode of small batches: every work item belongs to exactly one CTA's run, in order.
  if (!plan.cta_items.empty()) {
    CHECK(plan.shape.kind == kc::paged_kernel_kind::decode_sm90);
    REQUIRE(plan.cta_items.size() >= 2);
    CHECK(plan.ctas() == plan.cta_items.size() - 1);
    CHECK(plan.cta_items.front() == 0);
    CHECK(plan.cta_items.back() == std::int32_t(plan.work.size()));
    for (std::size_t c = 1; c < plan.cta_items.size(); ++c) CHECK(plan.cta_items[c] > plan.cta_items[c - 1]);
    CHECK(plan.cta_items_offset() % 256 == 0);
  } else {
    CHECK(plan.ctas() == plan.work.size());
  }
  CHECK(plan.work_offset() % 256 == 0);
  CHECK(plan.merge_offset() % 256 == 0);
  CHECK(plan.partial_o_offset() % 256 == 0);
  CHECK(plan.partial_lse_offset() % 256 == 0);
  CHECK(plan.workspace_bytes() >= plan.partial_lse_offset() + std::size_t(plan.num_partials) * bm * 4);
}

}  // namespace

TEST_CASE("plan: small batches are split to fill the device; large batches are not over-split") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const kc::device_limits h100{132, 228 * 1024, 227 * 1024, 32};
  const kc::paged_problem pr{32, 8, 128, 16, 70000, 2};
  struct shape {
    int batch, len;
  };
  for (const shape s : {shape{1, 4096}, shape{1, 32768}, shape{16, 4096}, shape{64, 2048}, shape{128, 4096}}) {
    host_csr t(std::vector<std::int32_t>(s.batch, s.len), 16, 70000, rng);
    const auto q = indptr_of(std::vector<std::int32_t>(s.batch, 1));
    const auto plan = kc::plan_paged_attention<causal_mask>(q.data(), t.table(), pr, {}, h100);
    INFO("batch " << s.batch << " len " << s.len << ": " << plan.work.size() << " items, " << plan.num_partials
                  << " partials");
    CHECK(plan.shape.kind == kc::paged_kernel_kind::decode);
    check_partition<causal_mask>(plan, {});
    // Enough CTAs for one full wave of the device, never absurdly many.
    CHECK(plan.work.size() >= std::size_t(h100.num_sms));
    CHECK(plan.work.size() <= std::size_t(8 * h100.num_sms * plan.ctas_per_sm));
    if (s.batch == 1) CHECK(plan.num_partials > 0);
  }
  // Splitting off: one item per row tile.
  host_csr t({4096}, 16, 70000, rng);
  const auto q = indptr_of({1});
  kc::plan_options no_split;
  no_split.split_kv = false;
  const auto plan = kc::plan_paged_attention<causal_mask>(q.data(), t.table(), pr, {}, h100, no_split);
  CHECK(plan.num_partials == 0);
  CHECK(plan.work.size() == 8);
}

TEST_CASE("plan: mixed decodes and chunks, windows; the partition covers each hull once") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const kc::device_limits small{8, 100 * 1024, 99 * 1024, 16};
  for (int page : {1, 16, 24, 256}) {
    const kc::paged_problem pr{21, 3, 64, page, 5000, 2};
    const std::vector<std::int32_t> ql = {1, 300, 8, 17, 1};
    const std::vector<std::int32_t> kl = {1000, 300, 2000, 517, 1};
    host_csr t(kl, page, 5000, rng);
    const auto q = indptr_of(ql);
    const auto causal = kc::plan_paged_attention<causal_mask>(q.data(), t.table(), pr, {}, small);
    CHECK(causal.shape.kind == kc::paged_kernel_kind::append);
    check_partition<causal_mask>(causal, {});
    const sliding_window_mask::params wp{100, 4};
    const auto window = kc::plan_paged_attention<sliding_window_mask>(q.data(), t.table(), pr, wp, small);
    check_partition<sliding_window_mask>(window, wp);
    const sliding_window_mask::params wp2{50, 0};
    const auto window2 = kc::plan_paged_attention<sliding_window_mask>(q.data(), t.table(), pr, wp2, small);
    check_partition<sliding_window_mask>(window2, wp2);
  }
}

TEST_CASE("plan: the sm_90a append kernel where the device runs it, for head dims 64 and 128 only") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  kc::device_limits hopper = h100_sm90();
  const std::vector<std::int32_t> ql = {512, 1, 40};
  const std::vector<std::int32_t> kl = {4608, 900, 40};
  host_csr t(kl, 16, 20000, rng);
  const auto q = indptr_of(ql);
  for (int d : {64, 96, 128, 256}) {
    const kc::paged_problem pr{32, 8, d, 16, 20000, 2};
    const auto plan = kc::plan_paged_attention<causal_mask>(q.data(), t.table(), pr, {}, hopper);
    INFO("head_dim " << d);
    const bool sm90 = d == 64 || d == 128;
    CHECK((plan.shape.kind == kc::paged_kernel_kind::append_sm90) == sm90);
    if (sm90) {
      CHECK(plan.shape.block_m == (d == 64 ? 192 : 128));
      CHECK(plan.ctas_per_sm == 1);
      CHECK(plan.shape.smem_bytes(d, 2) <= hopper.smem_per_cta);
    }
    check_partition<causal_mask>(plan, {});
    kc::plan_options portable;
    portable.use_wgmma = false;
    CHECK(kc::plan_paged_attention<causal_mask>(q.data(), t.table(), pr, {}, hopper, portable).shape.kind ==
          kc::paged_kernel_kind::append);
  }
  // Decodes take the TMA decode kernel where D is a multiple of 64 and gcd(page, 64) >= 8, the
  // cp.async one elsewhere; a device without sm_90a code never gets either sm_90a kernel.
  const kc::paged_problem pr{32, 8, 128, 16, 20000, 2};
  const auto dq = indptr_of({1, 1, 1});
  for (int d : {64, 96, 128, 256})
    for (int page : {1, 4, 8, 16, 24, 40, 256}) {
      host_csr tp({4608, 900, 40}, page, 20000, rng);
      const kc::paged_problem pp{32, 8, d, page, 20000, 2};
      const auto plan = kc::plan_paged_attention<sliding_window_mask>(dq.data(), tp.table(), pp, {700, 3}, hopper);
      INFO("head_dim " << d << " page " << page);
      const bool tma = d % 64 == 0 && (page % 8 == 0);
      CHECK(plan.shape.kind == (tma ? kc::paged_kernel_kind::decode_sm90 : kc::paged_kernel_kind::decode));
      CHECK(plan.shape.smem_bytes(d, 2) <= hopper.smem_per_cta);
      check_partition<sliding_window_mask>(plan, {700, 3});
      for (const auto& w : plan.work)
        if (tma) CHECK(w.kv_begin % plan.shape.block_n == 0);
    }
  hopper.wgmma = false;
  CHECK(kc::plan_paged_attention<causal_mask>(dq.data(), t.table(), pr, {}, hopper).shape.kind ==
        kc::paged_kernel_kind::decode);
  CHECK(std::string(kc::to_string(kc::paged_kernel_kind::decode_sm90)) == "decode_sm90");
  CHECK(std::string(kc::to_string(kc::paged_kernel_kind::append)) == "append");
  CHECK(kc::plan_paged_attention<causal_mask>(q.data(), t.table(), pr, {}, hopper).shape.kind ==
        kc::paged_kernel_kind::append);
}

// Visible key tiles of a work item (what the TMA decode kernel runs): tiles from kv_begin in
// steps of block_n that the mask does not hide.
template <class Mask>
int visible_tiles(const kc::paged_plan& plan, const kc::paged_work_item& w, typename Mask::params mp) {
  const int group = plan.group(), bn = plan.shape.block_n, rows = w.q_len * group;
  const int t0 = w.row0 / group, t1 = (std::min(w.row0 + plan.shape.block_m, rows) - 1) / group + 1;
  const Mask mask(mp, w.q_len, w.kv_len);
  int n = 0;
  for (int k0 = w.kv_begin; k0 < w.kv_end; k0 += bn)
    n += mask.classify(t0, t1, k0, std::min(k0 + bn, w.kv_end)) != tile_visibility::empty;
  return n;
}

TEST_CASE("plan: TMA decode: a CTA per row tile for large batches; for small ones, one CTA per SM running an even share") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const kc::device_limits hopper = h100_sm90();
  const kc::paged_problem pr{32, 8, 128, 16, 300000, 2};
  struct shape {
    int batch, len;
    std::size_t ctas;
    bool runs;
  };
  // 1 x 4k: 512 tiles, 128 CTAs of 4; 1 x 32k: 128 CTAs of 32 (one piece each, rather than 132
  // of 31 with a cut in most); from 16 x 4k (128 row tiles) on, a CTA per row tile.
  for (const shape s : {shape{1, 4096, 128, true}, shape{1, 32768, 128, true}, shape{13, 4096, 132, true},
                        shape{16, 4096, 128, false}, shape{64, 2048, 512, false}, shape{128, 4096, 1024, false},
                        shape{3, 100, 12, true}}) {
    host_csr t(std::vector<std::int32_t>(s.batch, s.len), 16, 300000, rng);
    const auto q = indptr_of(std::vector<std::int32_t>(s.batch, 1));
    const auto plan = kc::plan_paged_attention<causal_mask>(q.data(), t.table(), pr, {}, hopper);
    INFO("batch " << s.batch << " len " << s.len << ": " << plan.ctas() << " CTAs, " << plan.work.size() << " items");
    REQUIRE(plan.shape.kind == kc::paged_kernel_kind::decode_sm90);
    check_partition<causal_mask>(plan, {});
    CHECK(plan.ctas() == s.ctas);
    CHECK(plan.cta_items.empty() == !s.runs);
    CHECK(plan.early_launch == s.runs);  // persistent runs launch early; one-item CTAs plainly
    if (!s.runs) {
      CHECK(plan.ctas_per_sm == 2);
      CHECK(plan.num_partials == 0);
      continue;
    }
    const int total = 8 * s.batch * ((s.len + 63) / 64);
    for (std::size_t c = 0; c + 1 < plan.cta_items.size(); ++c) {
      int n = 0;
      for (int i = plan.cta_items[c]; i < plan.cta_items[c + 1]; ++i) n += visible_tiles<causal_mask>(plan, plan.work[i], {});
      CHECK(n >= total / int(plan.ctas()));
      CHECK(n <= (total + int(plan.ctas()) - 1) / int(plan.ctas()));
    }
  }
  // Windows with sinks: the hidden middle counts for nothing; every piece of a cut row tile
  // starts at a tile boundary and runs at least one visible tile.
  for (const auto [window, sinks] : {std::pair{700, 3}, std::pair{1000, 64}, std::pair{64, 1}}) {
    const std::vector<std::int32_t> kl = {30000, 900, 40, 7000, 5000};
    host_csr t(kl, 16, 300000, rng);
    const auto q = indptr_of({1, 1, 1, 1, 1});
    const sliding_window_mask::params wp{window, sinks};
    const auto plan = kc::plan_paged_attention<sliding_window_mask>(q.data(), t.table(), pr, wp, hopper);
    INFO("window " << window << " sinks " << sinks);
    check_partition<sliding_window_mask>(plan, wp);
    int total = 0, most = 0, least = 1 << 30;
    for (std::size_t c = 0; c + 1 < plan.cta_items.size(); ++c) {
      int n = 0;
      for (int i = plan.cta_items[c]; i < plan.cta_items[c + 1]; ++i) {
        const int v = visible_tiles<sliding_window_mask>(plan, plan.work[i], wp);
        CHECK(plan.work[i].kv_begin % 64 == 0);
        if (plan.work[i].partial >= 0) CHECK(v >= 1);
        n += v;
      }
      total += n;
      most = std::max(most, n);
      least = std::min(least, n);
    }
    CHECK(most - least <= 1);
    CHECK(total >= int(plan.ctas()) * 4);
  }
  // Splitting off, or capped: cuts move to row-tile ends.
  host_csr t(std::vector<std::int32_t>(12, 4096), 16, 300000, rng);
  const auto q = indptr_of(std::vector<std::int32_t>(12, 1));
  kc::plan_options no_split;
  no_split.split_kv = false;
  const auto whole = kc::plan_paged_attention<causal_mask>(q.data(), t.table(), pr, {}, hopper, no_split);
  check_partition<causal_mask>(whole, {});
  CHECK(whole.num_partials == 0);
  CHECK(whole.merges.empty());
  CHECK(whole.ctas() == 96);  // one row tile each: the cuts moved to row-tile ends
  host_csr t1({32768}, 16, 300000, rng);
  const auto q1 = indptr_of({1});
  kc::plan_options capped;
  capped.max_splits = 8;
  const auto few = kc::plan_paged_attention<causal_mask>(q1.data(), t1.table(), pr, {}, hopper, capped);
  check_partition<causal_mask>(few, {});
  CHECK(few.ctas() >= 8 * 7);
  for (const auto& m : few.merges) CHECK(m.count <= 8);
  kc::plan_options narrow;
  narrow.max_ctas = 100;
  const auto narrowed = kc::plan_paged_attention<causal_mask>(q1.data(), t1.table(), pr, {}, hopper, narrow);
  CHECK(narrowed.ctas() <= 100);
  CHECK(narrowed.ctas() == 96);  // 12 per row tile: no CTA holds a cut
  kc::plan_options plain;
  plain.early_launch = false;
  CHECK_FALSE(kc::plan_paged_attention<causal_mask>(q1.data(), t1.table(), pr, {}, hopper, plain).early_launch);
  kc::device_limits portable = hopper;  // no sm_90a code: the mma.sync kernels, never launched early
  portable.wgmma = false;
  CHECK_FALSE(kc::plan_paged_attention<causal_mask>(q1.data(), t1.table(), pr, {}, portable).early_launch);
}

TEST_CASE("plan: a rotary variant on the TMA decode kernel fills two one-item CTAs per SM where the batch has one per SM") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const kc::device_limits hopper = h100_sm90();
  const kc::paged_problem pr{32, 8, 128, 16, 300000, 2};
  struct shape {
    int batch, len;
    std::size_t ctas;
    bool split;  // cut into one-item CTAs where the plain plan is not
  };
  // 16 x 4k and 15 x 4k: 128 / 120 row tiles (one CTA per SM for the plain mask), cut in two;
  // 64 x 2k: 512 row tiles, two waves already, unsplit; 13 x 9000, 1 x 32k and 3 x 1000:
  // persistent runs, as for the plain mask (ctas: 0, not checked).
  for (const shape s : {shape{16, 4096, 256, true}, shape{15, 4096, 240, true}, shape{64, 2048, 512, false},
                        shape{13, 9000, 0, false}, shape{1, 32768, 0, false}, shape{3, 1000, 0, false}}) {
    host_csr t(std::vector<std::int32_t>(s.batch, s.len), 16, 300000, rng);
    const auto q = indptr_of(std::vector<std::int32_t>(s.batch, 1));
    const auto plan = kc::plan_paged_attention<rotary<causal_mask>>(q.data(), t.table(), pr, {}, hopper);
    const auto plain = kc::plan_paged_attention<causal_mask>(q.data(), t.table(), pr, {}, hopper);
    INFO("batch " << s.batch << " len " << s.len << ": " << plan.ctas() << " CTAs, " << plan.work.size() << " items");
    REQUIRE(plan.shape.kind == kc::paged_kernel_kind::decode_sm90);
    check_partition<rotary<causal_mask>>(plan, {});
    if (s.ctas) CHECK(plan.ctas() == s.ctas);
    if (!s.split) {
      CHECK(plan.work.size() == plain.work.size());
      CHECK(plan.cta_items == plain.cta_items);
      continue;
    }
    CHECK(plan.cta_items.empty());  // one item per CTA
    CHECK(plan.ctas_per_sm == 2);
    CHECK(plan.num_partials > 0);
    CHECK(plan.ctas() <= 2 * std::size_t(hopper.num_sms));
    for (const auto& w : plan.work) CHECK(w.kv_begin % 64 == 0);
  }
}

TEST_CASE("plan: bad input is rejected with the offending value, before any work") {
  std::mt19937_64 rng(kvtile_test::fresh_seed());
  const kc::device_limits dev{132, 228 * 1024, 227 * 1024, 32};
  const kc::paged_problem pr{8, 2, 128, 16, 100, 2};
  host_csr t({40, 17}, 16, 100, rng);
  const auto q = indptr_of({1, 1});
  CHECK_NOTHROW(kc::plan_paged_attention<causal_mask>(q.data(), t.table(), pr, {}, dev));

  auto bad = t;
  bad.indices[1] = 100;  // block 100 of a 100-block pool
  CHECK_THROWS_WITH_AS(kc::plan_paged_attention<causal_mask>(q.data(), bad.table(), pr, {}, dev),
                       doctest::Contains("is block 100, outside the pool [0, 100)"), kvtile::error);
  try {
    kc::plan_paged_attention<causal_mask>(q.data(), bad.table(), pr, {}, dev);
  } catch (const kvtile::error& e) {
    CHECK(e.code() == errc::out_of_range);
  }
  bad = t;
  bad.indices[0] = -1;
  CHECK_THROWS_AS(kc::plan_paged_attention<causal_mask>(q.data(), bad.table(), pr, {}, dev), kvtile::error);
  bad = t;
  bad.last[1] = 17;  // more than page_size tokens in the last page
  CHECK_THROWS_WITH_AS(kc::plan_paged_attention<causal_mask>(q.data(), bad.table(), pr, {}, dev),
                       doctest::Contains("last_page_len of request 1 is 17"), kvtile::error);
  const auto q_long = indptr_of({41, 1});  // 41 queries, 40 keys
  CHECK_THROWS_WITH_AS(kc::plan_paged_attention<causal_mask>(q_long.data(), t.table(), pr, {}, dev),
                       doctest::Contains("41 new queries"), kvtile::error);
  const auto q_empty = indptr_of({0, 1});
  CHECK_THROWS_WITH_AS(kc::plan_paged_attention<causal_mask>(q_empty.data(), t.table(), pr, {}, dev),
                       doctest::Contains("query length 0"), kvtile::error);
  auto pr_bad = pr;
  pr_bad.head_dim = 72;
  CHECK_THROWS_WITH_AS(kc::plan_paged_attention<causal_mask>(q.data(), t.table(), pr_bad, {}, dev),
                       doctest::Contains("head_dim 72"), kvtile::error);
  pr_bad = pr;
  pr_bad.num_qo_heads = 7;
  CHECK_THROWS_WITH_AS(kc::plan_paged_attention<causal_mask>(q.data(), t.table(), pr_bad, {}, dev),
                       doctest::Contains("query heads (7)"), kvtile::error);
  // Padded tables: a row too short for its length.
  const std::vector<std::int32_t> bt = {0, 1, 2, 3, 4, 5}, lens = {40, 49};
  const paging::padded_page_table pt{bt.data(), lens.data(), 2, 3};
  CHECK_THROWS_WITH_AS(kc::plan_paged_attention<causal_mask>(q.data(), pt, pr, {}, dev),
                       doctest::Contains("needing 4 pages"), kvtile::error);
}

TEST_CASE("the paged planner says which kernel it chose and why") {
  kc::paged_problem pr;
  pr.num_qo_heads = 8;
  pr.num_kv_heads = 2;
  pr.head_dim = 128;
  pr.page_size = 12;  // gcd(12, 64) = 4: no TMA boxes
  pr.pool_blocks = 64;
  std::mt19937_64 rng(kvtile_test::fresh_seed());
  const host_csr csr({115}, 12, 64, rng);
  const paging::csr_page_table table = csr.table();
  const std::vector<std::int32_t> q_indptr{0, 1};
  kc::device_limits dev;
  dev.wgmma = true;
  const kc::paged_plan p = kc::plan_paged_attention<causal_mask>(q_indptr.data(), table, pr, {}, dev);
  CHECK(std::string(p.kernel()) == "decode");
  CHECK(p.reason.find("gcd(page_size, 64) >= 8") != std::string::npos);
  kc::plan_options no_wgmma;
  no_wgmma.use_wgmma = false;
  const kc::paged_plan q = kc::plan_paged_attention<causal_mask>(q_indptr.data(), table, pr, {}, dev, no_wgmma);
  CHECK(std::string(q.kernel()) == "decode");
  CHECK(q.reason.find("use_wgmma is off") != std::string::npos);
  const std::vector<std::int32_t> chunk{0, 100};
  const kc::paged_plan a = kc::plan_paged_attention<causal_mask>(chunk.data(), table, pr, {}, dev);
  CHECK(std::string(a.kernel()) == "append_sm90");
  CHECK(a.reason.find("packs 400 query rows") != std::string::npos);
}

// Found by fuzz/plan_fuzz.cpp (regressions in fuzz/regressions/plan).
TEST_CASE("plan: an empty batch is an empty plan, for every kernel shape") {
  const kc::paged_problem pr{8, 2, 128, 16, 100, 2};
  const std::vector<std::int32_t> q{0}, indptr{0};
  const paging::csr_page_table t{indptr.data(), nullptr, nullptr, 0};
  for (const kc::device_limits& dev : {kc::device_limits{132, 228 * 1024, 227 * 1024, 32}, h100_sm90()}) {
    const auto plan = kc::plan_paged_attention<causal_mask>(q.data(), t, pr, {}, dev);  // once read past an empty list
    CHECK(plan.batch == 0);
    CHECK(plan.work.empty());
    CHECK(plan.merges.empty());
    CHECK(plan.ctas() == 0);
    CHECK(plan.num_partials == 0);
  }
}

TEST_CASE("plan: indptr checked whole before any page id; lengths from int32 arrays do not wrap") {
  const kc::device_limits dev{132, 228 * 1024, 227 * 1024, 32};
  const kc::paged_problem pr{8, 2, 128, 16, 100, 2};
  // indptr[1] claims 50 pages, but indptr[2] says the array has 3: nothing past 3 may be read.
  const std::vector<std::int32_t> indptr{0, 50, 3}, indices{0, 1, 2}, last{16, 16};
  const paging::csr_page_table t{indptr.data(), indices.data(), last.data(), 2};
  const std::vector<std::int32_t> q{0, 1, 2};
  CHECK_THROWS_WITH_AS(kc::plan_paged_attention<no_mask>(q.data(), t, pr, {}, dev),
                       doctest::Contains("indptr[2] = 3 is negative or decreasing"), kvtile::error);
  // Query lengths whose int32 difference wraps.
  const std::vector<std::int32_t> ok_indptr{0, 1}, ok_indices{0}, ok_last{4};
  const paging::csr_page_table one{ok_indptr.data(), ok_indices.data(), ok_last.data(), 1};
  const std::vector<std::int32_t> q_wrap{0, -2147483647 - 1};
  CHECK_THROWS_WITH_AS(kc::plan_paged_attention<no_mask>(q_wrap.data(), one, pr, {}, dev),
                       doctest::Contains("query length -2147483648"), kvtile::error);
  // A CSR length past 2^31 - 1: 2^27 + 1 pages of 16 tokens (ids never read: the length is refused first).
  kc::paged_problem big = pr;
  big.page_size = 1 << 30;
  const std::vector<std::int32_t> two_pages{0, 2}, ids{0, 1}, full{1 << 30};
  const paging::csr_page_table long_t{two_pages.data(), ids.data(), full.data(), 1};
  CHECK_THROWS_WITH_AS(kc::plan_paged_attention<no_mask>(q.data(), long_t, big, {}, dev),
                       doctest::Contains("kv length 2147483648"), kvtile::error);
}

TEST_CASE("plan: the number of work items is checked before any is stored") {
  const kc::device_limits dev{132, 228 * 1024, 227 * 1024, 32};
  // 2^20 query rows per head in tiles of 128, times 2^20 KV heads: 2^33 tiles, refused up front
  // (it was a 200 GB vector before).
  const kc::paged_problem pr{1 << 20, 1 << 20, 128, 16, 4, 2};
  const std::vector<std::int32_t> q{0, 1 << 20}, indptr{0, 1}, indices{0}, last{16};
  const paging::csr_page_table t{indptr.data(), indices.data(), last.data(), 1};
  CHECK_THROWS_WITH_AS(kc::plan_paged_attention<no_mask>(q.data(), t, pr, {}, dev),
                       doctest::Contains("8589934592 row tiles x KV heads"), kvtile::error);
}

TEST_CASE("plan: device_limits past any GPU are refused; at the bound, a small batch's plan stays small") {
  // With 2^31 - 1 SMs a single decode of 640M keys was cut into a run per four key tiles:
  // millions of work items, and a CTA-count search quadratic in them.
  const kc::paged_problem pr{8, 1, 128, 1 << 24, 40, 2};
  const std::vector<std::int32_t> q{0, 1}, indptr{0, 40}, last{1 << 24};
  std::vector<std::int32_t> indices(40);
  std::iota(indices.begin(), indices.end(), 0);
  const paging::csr_page_table t{indptr.data(), indices.data(), last.data(), 1};
  kc::device_limits dev = h100_sm90();
  for (const int sms : {0, -1, kc::max_plan_sms + 1, 1 << 30, 2147483647}) {
    dev.num_sms = sms;
    const std::string message = "num_sms must be in [1, 1024], got " + std::to_string(sms);
    CHECK_THROWS_WITH_AS(kc::plan_paged_attention<causal_mask>(q.data(), t, pr, {}, dev),
                         doctest::Contains(message.c_str()), kvtile::error);
  }
  dev.num_sms = kc::max_plan_sms;
  const auto plan = kc::plan_paged_attention<causal_mask>(q.data(), t, pr, {}, dev);
  REQUIRE(plan.shape.kind == kc::paged_kernel_kind::decode_sm90);
  CHECK(plan.ctas() <= std::size_t(kc::max_plan_sms));
  CHECK(plan.work.size() <= 2 * std::size_t(kc::max_plan_sms));
  check_partition<causal_mask>(plan, {});
}

TEST_CASE("plan: fp8 pages (elem_bytes 1) take the decode kernels and the append kernels, with their own shared memory") {
  std::mt19937_64 rng(7);
  const std::vector<std::int32_t> lens{4096, 33, 1000};
  const host_csr t(lens, 16, 400, rng);
  const auto q1 = indptr_of({1, 1, 1});
  kc::paged_problem pr{32, 8, 128, 16, 400, 1};
  // Hopper, D = 128: the TMA kernel, 128-key tiles (a stage moves a bf16 stage's bytes) whose
  // per-token scales sit beside the byte tiles.
  const auto tma = kc::plan_paged_attention<causal_mask>(q1.data(), t.table(), pr, {}, h100_sm90());
  CHECK(tma.shape.kind == kc::paged_kernel_kind::decode_sm90);
  CHECK(tma.shape.block_n == 128);
  CHECK(tma.fp8_registers);
  CHECK(tma.reason.find("fp8") != std::string::npos);
  check_partition<causal_mask>(tma, {});
  // A small batch's persistent runs count keys, not tiles: 1 x 4k (256 fp8 tiles) runs on the
  // 128 CTAs of two tiles each that bf16's 512 tiles get as four each.
  {
    const host_csr one(std::vector<std::int32_t>{4096}, 16, 400, rng);
    const auto q = indptr_of({1});
    const auto fp8_runs = kc::plan_paged_attention<causal_mask>(q.data(), one.table(), pr, {}, h100_sm90());
    kc::paged_problem pr16 = pr;
    pr16.elem_bytes = 2;
    const auto bf16_runs = kc::plan_paged_attention<causal_mask>(q.data(), one.table(), pr16, {}, h100_sm90());
    CHECK(fp8_runs.ctas() == 128);
    CHECK(bf16_runs.ctas() == 128);
    check_partition<causal_mask>(fp8_runs, {});
  }
  // 16 x 4k: a one-item CTA per row tile, one per SM, for per-head scales; per-token scales
  // (more work per byte) split to two CTAs per SM.
  {
    const host_csr sixteen(std::vector<std::int32_t>(16, 4096), 16, 5000, rng);
    const auto q = indptr_of(std::vector<std::int32_t>(16, 1));
    kc::paged_problem big = pr;
    big.pool_blocks = 5000;
    const auto head = kc::plan_paged_attention<causal_mask>(q.data(), sixteen.table(), big, {}, h100_sm90());
    kc::paged_problem per_token = big;
    per_token.token_scales = true;
    const auto token = kc::plan_paged_attention<causal_mask>(q.data(), sixteen.table(), per_token, {}, h100_sm90());
    CHECK(head.ctas() == 128);
    CHECK(head.num_partials == 0);
    CHECK(token.ctas() == 256);
    CHECK(token.cta_items.empty());
    CHECK(token.num_partials == 256);
    check_partition<causal_mask>(token, {});
  }
  const auto bf16_stages = kc::paged_shape_for(kc::paged_kernel_kind::decode_sm90, 128).decode_sm90_smem_bytes(128, 2, false);
  CHECK(tma.shape.decode_sm90_smem_bytes(128, 1, false) == bf16_stages + 2 * 3 * 128 * 4);
  // A rotary variant, a head dim of half a panel, a page of one slot, or no wgmma: the cp.async kernel.
  const auto rope = kc::plan_paged_attention<rotary<causal_mask>>(q1.data(), t.table(), pr, {}, h100_sm90());
  CHECK(rope.shape.kind == kc::paged_kernel_kind::decode);
  CHECK(rope.reason.find("rotary") != std::string::npos);
  kc::paged_problem pr64 = pr;
  pr64.head_dim = 64;
  const auto d64 = kc::plan_paged_attention<causal_mask>(q1.data(), t.table(), pr64, {}, h100_sm90());
  CHECK(d64.shape.kind == kc::paged_kernel_kind::decode);
  CHECK(d64.reason.find("multiple of 128") != std::string::npos);
  kc::plan_options no_wgmma;
  no_wgmma.use_wgmma = false;
  const auto plan = kc::plan_paged_attention<causal_mask>(q1.data(), t.table(), pr, {}, h100_sm90(), no_wgmma);
  CHECK(plan.shape.kind == kc::paged_kernel_kind::decode);
  CHECK(plan.reason.find("use_wgmma") != std::string::npos);
  check_partition<causal_mask>(plan, {});
  // Q, converted K and V tiles, 3 byte stages of K and V with their scales: below the bf16 kernel's.
  const auto fp8_smem = plan.shape.smem_bytes(128, 1);
  CHECK(fp8_smem == std::size_t(136 * 2 * (16 + 128) + 2 * 3 * 64 * (128 + 4)));
  CHECK(fp8_smem < plan.shape.smem_bytes(128, 2));
  for (int d : {16, 64, 256}) CHECK(kc::paged_shape_for(kc::paged_kernel_kind::decode, d).smem_bytes(d, 1) <= 163 * 1024);
  // More than 16 packed rows on Hopper at head_dim 128 with TMA maps (page 16): the
  // warp-specialised append kernel, whose producer warps convert each fp8 tile in place; 2-byte
  // tiles in shared memory and two more mbarriers per stage.
  const auto q8 = indptr_of({8, 1, 1});
  const auto ws = kc::plan_paged_attention<causal_mask>(q8.data(), t.table(), pr, {}, h100_sm90());
  INFO(ws.reason);
  CHECK(ws.shape.kind == kc::paged_kernel_kind::append_sm90);
  CHECK(ws.warp_specialised_append);
  CHECK(!ws.fp8_registers);
  CHECK(ws.reason.find("producer warps convert each K and V tile") != std::string::npos);
  CHECK(ws.shape.smem_bytes(128, 1) == ws.shape.smem_bytes(128, 2) + 16 * std::size_t(ws.shape.stages));
  check_partition<causal_mask>(ws, {});
  // Not that kernel: a rotary variant, a page without tensor maps (5), head_dim 64 (64-byte fp8
  // rows) -- the reason names why.
  const auto ws_rope = kc::plan_paged_attention<rotary<causal_mask>>(q8.data(), t.table(), pr, {}, h100_sm90());
  CHECK(ws_rope.shape.kind == kc::paged_kernel_kind::append);
  CHECK(ws_rope.reason.find("append_sm90: fp8 K/V pages with a rotary variant") != std::string::npos);
  {
    const host_csr t5(std::vector<std::int32_t>{300, 17}, 5, 400, rng);
    kc::paged_problem pr5 = pr;
    pr5.page_size = 5;
    const auto q8b = indptr_of({8, 1});
    const auto p5 = kc::plan_paged_attention<causal_mask>(q8b.data(), t5.table(), pr5, {}, h100_sm90());
    CHECK(p5.shape.kind == kc::paged_kernel_kind::append);
    CHECK(p5.reason.find("gcd(page_size, 64) >= 8") != std::string::npos);
    kc::paged_problem pr64b = pr;
    pr64b.head_dim = 64;
    CHECK(kc::paged_kernels::append_sm90::can_implement({pr64b, 64, h100_sm90(), {}, false}).find("head_dim 128") !=
          std::string::npos);
  }
  // Without wgmma, or force_append: the mma.sync append kernel, which converts each fp8 tile
  // into 2-byte tiles in shared memory; above head_dim 128 the 16-row decode kernel.
  kc::plan_options mma_sync;
  mma_sync.use_wgmma = false;
  const auto app = kc::plan_paged_attention<causal_mask>(q8.data(), t.table(), pr, {}, h100_sm90(), mma_sync);
  CHECK(app.shape.kind == kc::paged_kernel_kind::append);
  CHECK(!app.fp8_registers);
  CHECK(app.reason.find("converted to 2-byte tiles") != std::string::npos);
  check_partition<causal_mask>(app, {});
  // Q, the converted K and V tiles, 2 byte stages of K and V with their scales, 4 offset rings.
  CHECK(app.shape.smem_bytes(128, 1) == std::size_t(136 * 2 * (128 + 2 * 64) + 2 * 2 * 64 * (128 + 4) + 4 * 64 * 8));
  CHECK(app.shape.smem_bytes(128, 1) <= app.shape.smem_bytes(128, 2) + 64 * 16);
  kc::plan_options opt;
  opt.force_append = true;
  CHECK(kc::plan_paged_attention<causal_mask>(q1.data(), t.table(), pr, {}, h100_sm90(), opt).shape.kind ==
        kc::paged_kernel_kind::append_sm90);
  opt.use_wgmma = false;
  CHECK(kc::plan_paged_attention<causal_mask>(q1.data(), t.table(), pr, {}, h100_sm90(), opt).shape.kind ==
        kc::paged_kernel_kind::append);
  kc::paged_problem pr256 = pr;
  pr256.head_dim = 256;
  const auto wide = kc::plan_paged_attention<causal_mask>(q8.data(), t.table(), pr256, {}, h100_sm90());
  CHECK(wide.shape.kind == kc::paged_kernel_kind::decode);
  CHECK(wide.reason.find("append: fp8 K/V pages above head_dim 128") != std::string::npos);
  check_partition<causal_mask>(wide, {});
  pr.elem_bytes = 4;
  kvtile_test::expect_error(errc::unsupported, "got 4",
                            [&] { (void)kc::plan_paged_attention<causal_mask>(q1.data(), t.table(), pr, {}, h100_sm90()); });
}


TEST_CASE("plan: a rotary chunk takes the warp-specialised sm_90a append kernel where the pool has tensor maps, else the mma.sync one and says why") {
  std::mt19937_64 rng(kvtile_test::fresh_seed());
  const kc::paged_problem pr{32, 8, 128, 16, 300000, 2};
  host_csr t({100, 64}, 16, 300000, rng);
  const auto q = indptr_of({40, 1});  // 40 tokens x group 4: 160 packed rows
  const auto rope = kc::plan_paged_attention<rotary<causal_mask>>(q.data(), t.table(), pr, {}, h100_sm90());
  CHECK(rope.shape.kind == kc::paged_kernel_kind::append_sm90);
  CHECK(rope.warp_specialised_append);  // the only sm_90a append kernel that rotates
  CHECK(rope.reason.find("rotary variant: the warp-specialised mainloop") != std::string::npos);
  check_partition<rotary<causal_mask>>(rope, {});
  const auto plain = kc::plan_paged_attention<causal_mask>(q.data(), t.table(), pr, {}, h100_sm90());
  CHECK(plain.shape.kind == kc::paged_kernel_kind::append_sm90);
  CHECK(plain.warp_specialised_append);  // without rotation too: the faster of the two sm_90a append kernels
  CHECK(plain.reason.find("warp-specialised mainloop") != std::string::npos);
  kc::plan_options cp_async;
  cp_async.warp_specialised_append = false;  // the cp.async kernel, asked for by name
  const auto plain_cp = kc::plan_paged_attention<causal_mask>(q.data(), t.table(), pr, {}, h100_sm90(), cp_async);
  CHECK(plain_cp.shape.kind == kc::paged_kernel_kind::append_sm90);
  CHECK(!plain_cp.warp_specialised_append);
  CHECK(plain_cp.reason.find("warp_specialised_append = false") != std::string::npos);
  // Pages of one slot have no TMA tensor maps: the mma.sync append kernel rotates.
  kc::paged_problem pr1 = pr;
  pr1.page_size = 1;
  host_csr t1({100, 64}, 1, 300000, rng);
  const auto rope1 = kc::plan_paged_attention<rotary<causal_mask>>(q.data(), t1.table(), pr1, {}, h100_sm90());
  CHECK(rope1.shape.kind == kc::paged_kernel_kind::append);
  CHECK(rope1.reason.find("append_sm90: a rotary variant on pages without TMA tensor maps") != std::string::npos);
  check_partition<rotary<causal_mask>>(rope1, {});
}
TEST_CASE("plan: the kernel types answer can_implement and their shared memory; the planner takes the first that can") {
  namespace pk = kc::paged_kernels;
  const kc::device_limits hopper = h100_sm90();
  const kc::plan_options opt;
  kc::paged_problem pr{32, 8, 96, 16, 400, 2};
  const kc::paged_request r{pr, 4, hopper, opt, false};
  // D 96: no 128-byte panels for the TMA decode kernel, no sm_90a append kernel.
  CHECK(pk::decode_sm90::can_implement(r).find("multiple of 64") != std::string::npos);
  CHECK(pk::decode::can_implement(r).empty());
  CHECK(pk::append_sm90::can_implement(r).find("head_dim 64 and 128") != std::string::npos);
  CHECK(pk::append::can_implement(r).empty());
  CHECK(pk::decode::smem_bytes(pr) == kc::paged_shape_for(kc::paged_kernel_kind::decode, 96).smem_bytes(96, 2));
  // The plan's reason names what the faster kernel could not take, then the one that runs.
  std::mt19937_64 rng(11);
  const host_csr t(std::vector<std::int32_t>{300, 17}, 16, 400, rng);
  const auto q1 = indptr_of({1, 1});
  const auto plan = kc::plan_paged_attention<causal_mask>(q1.data(), t.table(), pr, {}, hopper);
  INFO(plan.reason);
  CHECK(plan.shape.kind == kc::paged_kernel_kind::decode);
  CHECK(plan.reason.find("decode_sm90: the TMA decode kernel needs a head_dim multiple of 64") != std::string::npos);
  // Without the device's sm_90a code every sm_90a kernel says so.
  kc::device_limits sm80 = hopper;
  sm80.wgmma = false;
  const kc::paged_request r80{pr, 4, sm80, opt, false};
  CHECK(pk::decode_sm90::can_implement(r80).find("device_limits::wgmma") != std::string::npos);
  CHECK(pk::append_sm90::can_implement(r80).find("device_limits::wgmma") != std::string::npos);
}
