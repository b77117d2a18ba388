// Chunked prefill against prefill-first, simulated on synthetic traces. A step's time comes
// from a linear cost model of one forward pass, t = 8 ms + 0.06 ms per token in the batch
// (about an 8B model on one H100: a decode step is bound by reading the weights, a prefill by
// compute), so the simulation needs no GPU; the counters are what a user sees:
//   max_stall_ms   the longest time any running request waited between two of its tokens
//   tbt_p50_ms / tbt_p99_ms   time between tokens over all requests
//   tokens_per_step           new tokens (decode + prefill) per forward pass
//   total_s                   time until the trace is served
// Traces: "long_prompt": 32 requests decoding steadily, then one 32k-token prompt arrives;
// "bursty": bursts of 24 requests (prompts 256-4,096 tokens, 128 new tokens each) every 2 s.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <map>
#include <random>
#include <vector>

#include "kvtile/kv_cache.hpp"
#include "kvtile/schedule/chunked_prefill.hpp"

using namespace kvtile;

namespace {
struct arrival {
  double at_ms;
  schedule::request_spec spec;
};

std::vector<arrival> long_prompt_trace() {
  std::vector<arrival> t;
  for (int i = 0; i < 32; ++i) t.push_back({0, {512, 600}});
  t.push_back({1000, {32768, 16}});
  return t;
}

std::vector<arrival> bursty_trace() {
  std::mt19937_64 rng(7);
  std::vector<arrival> t;
  for (int burst = 0; burst < 8; ++burst)
    for (int i = 0; i < 24; ++i) t.push_back({2000.0 * burst, {std::int64_t(256 + rng() % 3841), 128}});
  return t;
}

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, std::size_t(p * double(v.size() - 1) + 0.5))];
}

void bm_schedule(benchmark::State& state) {
  const bool chunked = state.range(1) != 0;
  const auto trace = state.range(0) == 0 ? long_prompt_trace() : bursty_trace();
  double max_stall = 0, total = 0, tokens = 0, steps = 0;
  std::vector<double> tbt;
  for (auto _ : state) {
    kv_block_manager<> m(16384, 16);  // 262k tokens
    schedule::chunked_prefill_scheduler<kv_block_manager<>> s(m, {.token_budget = 512, .max_running = 256,
                                                                  .watermark_blocks = 64, .chunked = chunked});
    std::map<schedule::request_id, double> last_token;
    std::size_t next = 0;
    double now = 0;
    tbt.clear();
    max_stall = tokens = steps = 0;
    while (next < trace.size() || s.has_work()) {
      while (next < trace.size() && trace[next].at_ms <= now) s.submit(trace[next++].spec);
      if (!s.has_work()) {
        now = trace[next].at_ms;
        continue;
      }
      const auto& b = s.step();
      now += 8.0 + 0.06 * double(b.num_tokens());
      tokens += double(b.num_tokens());
      ++steps;
      for (const auto& it : b.items) {
        if (!it.decode && !it.last_chunk) continue;
        const auto [pos, first] = last_token.try_emplace(it.request, now);
        if (!first) {
          tbt.push_back(now - pos->second);
          max_stall = std::max(max_stall, now - pos->second);
          pos->second = now;
        }
      }
      for (auto r : b.preempted) last_token.erase(r);  // its wait restarts: counted as queueing
    }
    total = now;
  }
  state.counters["max_stall_ms"] = max_stall;
  state.counters["tbt_p50_ms"] = percentile(tbt, 0.5);
  state.counters["tbt_p99_ms"] = percentile(tbt, 0.99);
  state.counters["tokens_per_step"] = tokens / steps;
  state.counters["total_s"] = total / 1000;
  state.SetLabel(std::string(state.range(0) == 0 ? "long_prompt" : "bursty") + (chunked ? "/chunked" : "/prefill_first"));
}
}  // namespace

BENCHMARK(bm_schedule)->ArgsProduct({{0, 1}, {1, 0}})->ArgNames({"trace", "chunked"})->Iterations(1)->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();
