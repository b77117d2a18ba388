// Host bookkeeping costs, ns per operation: allocate + free one block (each allocator), append
// one token, fork a sequence of 2,048 blocks, and an append that triggers copy-on-write.
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "kvtile/kv_cache.hpp"
#include "kvtile/memory/lifo_allocator.hpp"
#include "kvtile/memory/lowest_id_allocator.hpp"

using namespace kvtile;

namespace {
// A pool of 65,536 blocks, half of them held at random, then one allocate + one free per op.
template <class A>
void bm_allocate_free(benchmark::State& state) {
  A a(1 << 16);
  std::vector<memory::block_id> held(1 << 15);
  a.allocate(held);
  std::mt19937 rng(1);
  for (int i = 0; i < (1 << 14); ++i) {
    const auto j = rng() % held.size();
    a.free(held[j]);
    held[j] = a.allocate();
  }
  std::size_t j = 0;
  for (auto _ : state) {
    const auto b = a.allocate();
    benchmark::DoNotOptimize(b);
    a.free(held[j]);
    held[j] = b;
    j = (j + 7919) & (held.size() - 1);
  }
  state.SetItemsProcessed(state.iterations());
}

// Append one token at a time to 64 sequences in turn (a decode step's pattern); every 4,096
// tokens per sequence the sequences are truncated back (outside the timing).
template <class Manager>
void bm_append_token(benchmark::State& state) {
  Manager m(1 << 16, 16);
  std::vector<sequence_id> seqs;
  for (int i = 0; i < 64; ++i) seqs.push_back(m.create());
  std::int64_t slot = 0;
  std::size_t i = 0;
  std::int64_t steps = 0;
  for (auto _ : state) {
    m.append(seqs[i], 1, std::span<std::int64_t>(&slot, 1));
    benchmark::DoNotOptimize(slot);
    if (++i == seqs.size()) {
      i = 0;
      if (++steps == 4096) {
        state.PauseTiming();
        for (auto s : seqs) m.truncate(s, 0);
        steps = 0;
        state.ResumeTiming();
      }
    }
  }
  state.SetItemsProcessed(state.iterations());
}

// fork of a 2,048-block sequence; the forks are freed in batches of 256 outside the timing.
void bm_fork_2k_blocks(benchmark::State& state) {
  kv_block_manager<> m(4096, 16);
  const auto parent = m.create();
  m.append(parent, 2048 * 16 - 5);
  std::vector<sequence_id> forks;
  forks.reserve(256);
  for (auto _ : state) {
    forks.push_back(m.fork(parent));
    if (forks.size() == 256) {
      state.PauseTiming();
      for (auto f : forks) m.free(f);
      forks.clear();
      state.ResumeTiming();
    }
  }
  state.SetItemsProcessed(state.iterations());
  state.counters["blocks"] = 2048;
}

// An append of one token into a shared, partial last block: allocates the private block and
// records the copy. Forks are made and freed in batches of 256 outside the timing.
void bm_cow_append(benchmark::State& state) {
  kv_block_manager<> m(4096, 16);
  const auto parent = m.create();
  m.append(parent, 100 * 16 + 3);
  std::vector<sequence_id> forks;
  std::size_t next = 0;
  std::int64_t slot = 0;
  auto refill = [&] {
    m.finish_copies();
    for (auto f : forks) m.free(f);
    forks.clear();
    for (int i = 0; i < 256; ++i) forks.push_back(m.fork(parent));
    next = 0;
  };
  refill();
  for (auto _ : state) {
    if (next == forks.size()) {
      state.PauseTiming();
      refill();
      state.ResumeTiming();
    }
    m.append(forks[next++], 1, std::span<std::int64_t>(&slot, 1));
    benchmark::DoNotOptimize(slot);
  }
  state.SetItemsProcessed(state.iterations());
}
}  // namespace

BENCHMARK(bm_allocate_free<memory::lifo_allocator>);
BENCHMARK(bm_allocate_free<memory::lowest_id_allocator>);
BENCHMARK(bm_append_token<kv_block_manager<memory::lifo_allocator, sharing::copy_on_write>>);
BENCHMARK(bm_append_token<kv_block_manager<memory::lifo_allocator, sharing::no_sharing>>);
BENCHMARK(bm_append_token<kv_block_manager<memory::lowest_id_allocator, sharing::copy_on_write>>);
BENCHMARK(bm_fork_2k_blocks);
BENCHMARK(bm_cow_append);

BENCHMARK_MAIN();
