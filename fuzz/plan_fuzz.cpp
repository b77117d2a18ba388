// fuzz/plan_fuzz.cpp: the paged-attention planner (attention/cuda/plan.hpp, host code) over
// batch shapes, page tables, masks, device limits and options decoded from bytes. Either it
// refuses the input with a kvtile::error, or the plan is consistent: every work item inside its
// request (rows, KV head, keys within [0, kv_len)), the key ranges of one row tile disjoint,
// partial states and merge items matching, CTA runs covering the work list in order.
#include <algorithm>
#include <cstdint>
#include <map>
#include <tuple>
#include <vector>

#include "byte_reader.hpp"
#include "kvtile/attention/cuda/plan.hpp"

namespace {
using namespace kvtile;
using namespace kvtile::attention;
using namespace kvtile::attention::cuda;
using kvtile_fuzz::byte_reader;

void check_plan(const paged_plan& plan, const std::vector<std::int32_t>& q_indptr, std::int32_t batch) {
  const std::int32_t group = plan.group();
  KVTILE_FUZZ_CHECK(plan.batch == batch);
  KVTILE_FUZZ_CHECK(std::int64_t(plan.q_len.size()) == batch && std::int64_t(plan.kv_len.size()) == batch);
  std::map<std::tuple<int, int, int>, std::vector<std::pair<int, int>>> ranges;
  std::vector<int> partial_seen(std::size_t(plan.num_partials), 0);
  for (const auto& w : plan.work) {
    KVTILE_FUZZ_CHECK(w.batch >= 0 && w.batch < batch);
    const std::int32_t ql = plan.q_len[std::size_t(w.batch)], kl = plan.kv_len[std::size_t(w.batch)];
    KVTILE_FUZZ_CHECK(ql == q_indptr[std::size_t(w.batch) + 1] - q_indptr[std::size_t(w.batch)]);
    KVTILE_FUZZ_CHECK(w.q_len == ql && w.kv_len == kl);
    KVTILE_FUZZ_CHECK(w.kv_head >= 0 && w.kv_head < plan.problem.num_kv_heads);
    KVTILE_FUZZ_CHECK(w.row0 >= 0 && w.row0 < std::int64_t(ql) * group && w.row0 % plan.shape.block_m == 0);
    KVTILE_FUZZ_CHECK(w.kv_begin >= 0 && w.kv_begin <= w.kv_end && w.kv_end <= std::max(kl, 0));
    KVTILE_FUZZ_CHECK(w.partial < plan.num_partials);
    if (w.partial >= 0) ++partial_seen[std::size_t(w.partial)];
    ranges[{w.batch, w.kv_head, w.row0}].push_back({w.kv_begin, w.kv_end});
  }
  for (int n : partial_seen) KVTILE_FUZZ_CHECK(n == 1);  // each partial state written once
  for (auto& [key, r] : ranges) {
    std::sort(r.begin(), r.end());
    for (std::size_t i = 1; i < r.size(); ++i) KVTILE_FUZZ_CHECK(r[i - 1].second <= r[i].first);  // disjoint
  }
  // Every row tile of every request and head is planned.
  for (std::int32_t b = 0; b < batch; ++b)
    for (std::int32_t h = 0; h < plan.problem.num_kv_heads; ++h)
      for (std::int64_t r = 0; r < std::int64_t(plan.q_len[std::size_t(b)]) * group; r += plan.shape.block_m)
        KVTILE_FUZZ_CHECK(ranges.count({b, h, int(r)}) == 1);
  std::int64_t merged = 0;
  for (const auto& m : plan.merges) {
    KVTILE_FUZZ_CHECK(m.count >= 2 && m.first >= 0 && std::int64_t(m.first) + m.count <= plan.num_partials);
    KVTILE_FUZZ_CHECK(ranges.count({m.batch, m.kv_head, m.row0}) == 1);
    KVTILE_FUZZ_CHECK(std::int64_t(ranges[{m.batch, m.kv_head, m.row0}].size()) == m.count);
    merged += m.count;
  }
  KVTILE_FUZZ_CHECK(merged == plan.num_partials);
  if (!plan.cta_items.empty()) {
    KVTILE_FUZZ_CHECK(plan.cta_items.front() == 0 && std::size_t(plan.cta_items.back()) == plan.work.size());
    for (std::size_t c = 1; c < plan.cta_items.size(); ++c) KVTILE_FUZZ_CHECK(plan.cta_items[c - 1] < plan.cta_items[c]);
  }
  KVTILE_FUZZ_CHECK(plan.workspace_bytes() >= plan.partial_lse_offset());
}

template <class Mask, class Table>
void plan_and_check(const std::vector<std::int32_t>& q_indptr, const Table& table, const paged_problem& pr,
                    typename Mask::params mp, const device_limits& dev, const plan_options& opt) {
  paged_plan plan;
  try {
    plan = plan_paged_attention<Mask>(q_indptr.data(), table, pr, mp, dev, opt);
  } catch (const kvtile::error&) {
    return;
  }
  check_plan(plan, q_indptr, table.batch);
}

template <class Table>
void with_mask(byte_reader& in, const std::vector<std::int32_t>& q_indptr, const Table& table, const paged_problem& pr,
               const device_limits& dev, const plan_options& opt) {
  switch (in.u8() % 3) {
    case 0: plan_and_check<no_mask>(q_indptr, table, pr, {}, dev, opt); break;
    case 1: plan_and_check<causal_mask>(q_indptr, table, pr, {}, dev, opt); break;
    default:
      plan_and_check<sliding_window_mask>(q_indptr, table, pr, {int(in.edgy(64)), int(in.range(0, 8))}, dev, opt);
  }
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  byte_reader in(data, size);
  paged_problem pr;
  pr.num_kv_heads = std::int32_t(in.u8() < 250 ? in.range(1, 4) : in.edgy(4));
  pr.num_qo_heads = std::int32_t(std::uint32_t(pr.num_kv_heads) *  // wraps like any untrusted int32
                                 std::uint32_t(in.u8() < 250 ? in.range(1, 8) : in.edgy(8)));
  static constexpr std::int32_t dims[] = {64, 128, 256, 16, 96, 192, 80, 0, 320, 72};
  pr.head_dim = dims[in.u8() % 10];
  pr.page_size = std::int32_t(in.u8() < 245 ? in.range(1, 64) : in.edgy(64));
  pr.pool_blocks = std::int32_t(in.u8() < 250 ? in.range(0, 64) : in.edgy(64));
  pr.elem_bytes = in.u8() < 250 ? 2 : 4;
  device_limits dev;
  dev.num_sms = int(in.u8() < 250 ? in.range(1, 140) : in.edgy(4));
  dev.wgmma = in.u8() % 2;
  plan_options opt;
  opt.split_kv = in.u8() % 4 != 0;
  opt.max_splits = int(in.u8() < 240 ? in.range(0, 16) : in.edgy(128));
  opt.force_append = in.u8() % 4 == 0;
  opt.use_wgmma = in.u8() % 2;
  opt.max_ctas = int(in.range(0, 8));
  const std::int32_t batch = std::int32_t(in.range(0, 6));
  std::vector<std::int32_t> q_indptr(std::size_t(batch) + 1, 0);
  for (std::int32_t b = 0; b < batch; ++b)
    q_indptr[std::size_t(b) + 1] = std::int32_t(std::uint32_t(q_indptr[std::size_t(b)]) +
                                                std::uint32_t(in.u8() < 240 ? in.range(0, 20) : in.edgy(20)));
  // A valid batch of a billion row tiles plans a billion work items (the planner refuses only
  // 2^31): more than the fuzzer's memory, and a million take seconds. Batches past 2^16 row
  // tiles x heads are skipped; one the planner refuses for its rows (2^30 per request) is still
  // given to it.
  if (pr.num_kv_heads > 0 && pr.num_qo_heads > 0 && pr.num_qo_heads % pr.num_kv_heads == 0) {
    const std::int64_t group = pr.num_qo_heads / pr.num_kv_heads;
    std::int64_t tiles = 0;
    bool refused_rows = false;
    for (std::int32_t b = 0; b < batch; ++b) {
      const std::int64_t rows = (std::int64_t(q_indptr[std::size_t(b) + 1]) - q_indptr[std::size_t(b)]) * group;
      refused_rows = refused_rows || rows >= (std::int64_t(1) << 30);
      tiles += std::max<std::int64_t>(rows, 0) / 16 + 1;
    }
    if (!refused_rows && tiles * pr.num_kv_heads > (std::int64_t(1) << 16)) return 0;
  }
  auto block = [&] { return std::int32_t(in.u8() < 245 ? in.range(0, std::max(pr.pool_blocks, 1) - 1) : in.edgy(64)); };
  if (in.u8() % 2) {
    std::vector<std::int32_t> indptr(static_cast<std::size_t>(batch) + 1, 0), last(static_cast<std::size_t>(batch));
    for (std::int32_t b = 0; b < batch; ++b) {
      indptr[std::size_t(b) + 1] = indptr[std::size_t(b)] + std::int32_t(in.range(0, 40));
      last[std::size_t(b)] = std::int32_t(in.u8() < 240 ? in.range(1, std::max(pr.page_size, 1)) : in.edgy(64));
    }
    if (in.u8() >= 224) indptr[std::size_t(in.range(0, batch))] = std::int32_t(in.edgy(100));
    bool monotone = indptr[0] >= 0;
    for (std::int32_t b = 0; b < batch; ++b) monotone = monotone && indptr[std::size_t(b) + 1] >= indptr[std::size_t(b)];
    if (monotone && indptr.back() > 4096) return 0;  // indices has indptr[batch] entries: the caller's contract
    std::vector<std::int32_t> indices(std::size_t(std::max(indptr.back(), 0)));
    for (auto& x : indices) x = block();
    with_mask(in, q_indptr, paging::csr_page_table{indptr.data(), indices.data(), last.data(), batch}, pr, dev, opt);
  } else {
    const std::int32_t max_blocks = std::int32_t(in.range(0, 40));
    std::vector<std::int32_t> table(static_cast<std::size_t>(batch) * std::size_t(max_blocks)), lens(static_cast<std::size_t>(batch));
    for (auto& x : table) x = block();
    for (auto& x : lens)
      x = std::int32_t(in.u8() < 240 ? in.range(0, std::int64_t(max_blocks) * std::max(pr.page_size, 1)) : in.edgy(2000));
    with_mask(in, q_indptr, paging::padded_page_table{table.data(), lens.data(), batch, max_blocks}, pr, dev, opt);
  }
  return 0;
}
