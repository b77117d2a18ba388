// Host cost of planning one paged-attention step (a server plans every step): plan_paged_attention
// over a CSR page table of scattered blocks, for decode batches of the ANCHORS grid and beyond,
// with the device limits of an H100 running sm_90a code (the TMA decode kernel: one CTA per row
// tile, or persistent runs for small batches) and without (the portable kernels), a sliding
// window with sinks (the persistent plan counts visible tiles), and a mixed chunked-prefill batch.
// Counters: items (work items), ctas, pages (page-table entries checked).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kvtile/attention/cuda/plan.hpp"

using namespace kvtile;
using namespace kvtile::attention;
namespace kc = kvtile::attention::cuda;

namespace {

constexpr int kPage = 16;

struct batch_table {
  std::vector<std::int32_t> q_indptr{0}, indptr{0}, indices, last;
  std::int32_t pool = 0;
  batch_table(const std::vector<std::int32_t>& q_lens, const std::vector<std::int32_t>& kv_lens) {
    std::int64_t pages = 0;
    for (auto l : kv_lens) pages += (l + kPage - 1) / kPage;
    pool = std::int32_t(pages);
    std::vector<std::int32_t> ids(static_cast<std::size_t>(pages));
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), std::mt19937(7));
    std::size_t next = 0;
    for (std::size_t b = 0; b < kv_lens.size(); ++b) {
      const int nb = (kv_lens[b] + kPage - 1) / kPage;
      for (int i = 0; i < nb; ++i) indices.push_back(ids[next++]);
      indptr.push_back(std::int32_t(indices.size()));
      last.push_back(nb ? kv_lens[b] - (nb - 1) * kPage : 0);
      q_indptr.push_back(q_indptr.back() + q_lens[b]);
    }
  }
  paging::csr_page_table table() const { return {indptr.data(), indices.data(), last.data(), std::int32_t(last.size())}; }
};

kc::device_limits h100(bool sm90) {
  kc::device_limits d{132, 228 * 1024, 227 * 1024, 32};
  d.wgmma = sm90;
  return d;
}

template <class Mask>
void run(benchmark::State& state, const batch_table& t, typename Mask::params mp, bool sm90) {
  const kc::paged_problem pr{32, 8, 128, kPage, t.pool, 2};
  const auto table = t.table();
  kc::paged_plan plan;
  for (auto _ : state) {
    plan = kc::plan_paged_attention<Mask>(t.q_indptr.data(), table, pr, mp, h100(sm90));
    benchmark::DoNotOptimize(plan.work.data());
  }
  state.counters["items"] = double(plan.work.size());
  state.counters["ctas"] = double(plan.ctas());
  state.counters["pages"] = double(t.indices.size());
  state.SetLabel(kc::to_string(plan.shape.kind));
}

void bm_decode(benchmark::State& state, int batch, int len, bool sm90) {
  const batch_table t(std::vector<std::int32_t>(batch, 1), std::vector<std::int32_t>(batch, len));
  run<causal_mask>(state, t, {}, sm90);
}

void bm_decode_window(benchmark::State& state, int batch, int len) {
  const batch_table t(std::vector<std::int32_t>(batch, 1), std::vector<std::int32_t>(batch, len));
  run<sliding_window_mask>(state, t, {4096, 4}, true);
}

// A chunked-prefill step: 4 chunks of 512 new tokens over 4k-16k prefixes and 60 decodes.
void bm_mixed(benchmark::State& state, bool sm90) {
  std::vector<std::int32_t> q(64, 1), kv(64, 3000);
  for (int i = 0; i < 4; ++i) {
    q[i] = 512;
    kv[i] = 4096 * (i + 1) + 512;
  }
  const batch_table t(q, kv);
  run<causal_mask>(state, t, {}, sm90);
}

const int reg = [] {
  for (const auto [b, l] : {std::pair{1, 4096}, std::pair{1, 32768}, std::pair{16, 4096}, std::pair{64, 2048},
                            std::pair{128, 4096}, std::pair{32, 32768}, std::pair{256, 32768}})
    for (const bool sm90 : {true, false})
      benchmark::RegisterBenchmark(("plan/decode_b" + std::to_string(b) + "_l" + std::to_string(l) + (sm90 ? "_sm90" : "_portable")).c_str(),
                                   bm_decode, b, l, sm90)
          ->Unit(benchmark::kMicrosecond);
  for (const auto [b, l] : {std::pair{1, 32768}, std::pair{32, 32768}})
    benchmark::RegisterBenchmark(("plan/decode_b" + std::to_string(b) + "_l" + std::to_string(l) + "_window4096_sinks4_sm90").c_str(),
                                 bm_decode_window, b, l)
        ->Unit(benchmark::kMicrosecond);
  for (const bool sm90 : {true, false})
    benchmark::RegisterBenchmark((std::string("plan/mixed_4chunks_60decodes") + (sm90 ? "_sm90" : "_portable")).c_str(), bm_mixed, sm90)
        ->Unit(benchmark::kMicrosecond);
  return 0;
}();

}  // namespace

BENCHMARK_MAIN();
