// Prefix-cache costs on the host: ns per token hashed (chained_block_hash, the target is <= 10;
// a cryptographic hash costs 100-200), ns per block looked up (hash + index probe + token
// compare), ns per block reclaimed from the LRU, and a serving trace whose counters are the hit
// rate, the blocks saved and the prefill tokens skipped.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <optional>
#include <random>
#include <vector>

#include "kvtile/caching/prefix_cache.hpp"
#include "kvtile/kv_cache.hpp"

using namespace kvtile;
using caching::token_id;

namespace {
using manager_t = kv_block_manager<caching::prefix_caching_allocator<>>;

// Seconds per item (printed with an SI prefix: 1.2n = 1.2 ns).
benchmark::Counter per_item(const benchmark::State& state, std::int64_t items_per_iteration) {
  return benchmark::Counter(double(state.iterations()) * double(items_per_iteration),
                            benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

std::vector<token_id> random_tokens(std::size_t n, std::mt19937_64& rng) {
  std::vector<token_id> t(n);
  for (auto& x : t) x = token_id(rng() % 128000);
  return t;
}

// Hash a 1,024-token prompt block by block (range(0) = page size), chaining as admit does.
void bm_hash_tokens(benchmark::State& state) {
  const auto page = std::size_t(state.range(0));
  std::mt19937_64 rng(1);
  const auto toks = random_tokens(1024, rng);
  const caching::chained_block_hash h;
  for (auto _ : state) {
    std::uint64_t prev = 0;
    for (std::size_t i = 0; i + page <= toks.size(); i += page) prev = h(prev, std::span(toks).subspan(i, page), 0);
    benchmark::DoNotOptimize(prev);
  }
  state.SetItemsProcessed(state.iterations() * std::int64_t(toks.size()));
  state.SetBytesProcessed(state.iterations() * std::int64_t(toks.size() * sizeof(token_id)));
  state.counters["per_token"] = per_item(state, std::int64_t(toks.size()));
}

// match() of a 64-block prompt whose blocks are all indexed (among 16,384 indexed blocks).
void bm_lookup(benchmark::State& state) {
  constexpr std::int32_t page = 16, blocks = 1 << 14, prompt_blocks = 64;
  manager_t m(blocks, page);
  std::mt19937_64 rng(2);
  std::vector<std::vector<token_id>> prompts;
  for (int p = 0; p < blocks / prompt_blocks; ++p) {
    prompts.push_back(random_tokens(prompt_blocks * page, rng));
    const auto id = m.create();
    std::vector<std::int64_t> slots(prompts.back().size());
    m.append(id, std::int64_t(slots.size()), slots);
    caching::publish_prefix(m, id, prompts.back());
  }
  std::size_t p = 0;
  for (auto _ : state) {
    const auto hit = m.allocator().match(prompts[p], page, 0, prompt_blocks);
    benchmark::DoNotOptimize(hit.blocks.data());
    p = (p + 97) % prompts.size();
  }
  state.SetItemsProcessed(state.iterations() * prompt_blocks);
  state.counters["per_block"] = per_item(state, prompt_blocks);
  state.counters["tokens_per_s"] =
      benchmark::Counter(double(state.iterations()) * prompt_blocks * page, benchmark::Counter::kIsRate);
}

// Allocation that reclaims cached blocks: a pool of 16,384 blocks, all cached; each iteration
// allocates one block (the LRU front: unlink, drop the index entry). Every 8,192 reclaims the
// pool is refilled outside the timing.
void bm_reclaim(benchmark::State& state) {
  constexpr std::int32_t page = 16, blocks = 1 << 14;
  std::optional<manager_t> m;
  std::mt19937_64 rng(3);
  const auto toks = random_tokens(std::size_t(blocks) * page, rng);
  auto refill = [&] {
    m.emplace(blocks, page);
    const auto id = m->create();
    std::vector<std::int64_t> slots(toks.size());
    m->append(id, std::int64_t(toks.size()), slots);
    caching::publish_prefix(*m, id, toks);
    m->free(id);  // every block cached
  };
  refill();
  std::int32_t taken = 0;
  for (auto _ : state) {
    benchmark::DoNotOptimize(m->allocator().allocate());
    if (++taken == blocks / 2) {
      state.PauseTiming();
      refill();
      taken = 0;
      state.ResumeTiming();
    }
  }
  state.SetItemsProcessed(state.iterations());
  state.counters["per_reclaim"] = per_item(state, 1);
}

// A serving trace: 4 system prompts of 1,024 tokens (one far more popular), 3,000 requests,
// each a system prompt + a 32-256 token question, or (1 in 3) the next turn of an earlier
// conversation (its whole history + a new question); each generates 64 tokens, and is then
// published and freed. The pool holds about 30 requests' worth of blocks, so the LRU works.
void bm_trace(benchmark::State& state) {
  constexpr std::int32_t page = 16, blocks = 4096;
  std::int64_t prompt_tokens = 0, skipped = 0, requests = 0;
  for (auto _ : state) {
    manager_t m(blocks, page);
    std::mt19937_64 rng(4);
    std::vector<std::vector<token_id>> systems;
    for (int s = 0; s < 4; ++s) systems.push_back(random_tokens(1024, rng));
    std::vector<std::vector<token_id>> histories;
    std::vector<std::int64_t> slots;
    for (int r = 0; r < 3000; ++r) {
      std::vector<token_id> prompt;
      if (!histories.empty() && rng() % 3 == 0) {
        prompt = histories[rng() % histories.size()];
      } else {
        const auto s = rng() % 8;
        prompt = systems[s < 5 ? 0 : s - 4];
      }
      const auto q = random_tokens(32 + rng() % 225, rng);
      prompt.insert(prompt.end(), q.begin(), q.end());
      if (prompt.size() > 12000) prompt = systems[0];  // conversations end
      const auto id = m.create();
      const std::int64_t reused = caching::admit_prefix(m, id, prompt);
      slots.resize(prompt.size() - std::size_t(reused));
      m.append(id, std::int64_t(slots.size()), slots);
      caching::publish_prefix(m, id, prompt);
      const auto answer = random_tokens(64, rng);
      std::int64_t slot;
      for (std::size_t t = 0; t < answer.size(); ++t) m.append(id, 1, std::span(&slot, 1));
      prompt.insert(prompt.end(), answer.begin(), answer.end());
      caching::publish_prefix(m, id, prompt);
      m.free(id);
      if (histories.size() < 64) histories.push_back(std::move(prompt));
      else histories[rng() % histories.size()] = std::move(prompt);
      prompt_tokens += std::int64_t(slots.size()) + reused;
      skipped += reused;
      ++requests;
    }
  }
  state.counters["hit_rate"] = double(skipped) / double(prompt_tokens);
  state.counters["prefill_tokens_skipped"] = double(skipped) / double(state.iterations());
  state.counters["blocks_saved"] = double(skipped / page) / double(state.iterations());
  state.counters["prompt_tokens"] = double(prompt_tokens) / double(state.iterations());
  state.SetItemsProcessed(requests);
}
}  // namespace

BENCHMARK(bm_hash_tokens)->Arg(16)->Arg(32)->Arg(128);
BENCHMARK(bm_lookup);
BENCHMARK(bm_reclaim);
BENCHMARK(bm_trace)->Unit(benchmark::kMillisecond)->Iterations(1);
BENCHMARK_MAIN();
