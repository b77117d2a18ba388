// kvtile demo: why a paged KV cache.
//
// 1. KV bytes per token of a model configuration, and how many tokens fit in a given memory.
// 2. A simulated serving run (varied prompt and output lengths, some requests with parallel
//    sampling n = 4) through kvtile's paged bookkeeping, against contiguous pre-allocation of
//    every sequence to the maximum length.
// 3. Real K/V through a paged_kv_cache: prompt, fork into 4 samples, decode with copy-on-write,
//    every sample read back through its page table. On the GPU when one is present (this file
//    is compiled as CUDA when CUDA is available), on the CPU otherwise.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "kvtile/kv_cache.hpp"
#include "kvtile/core/numeric.hpp"
#if KVTILE_HAS_CUDA_COMPILER
#include <cuda_runtime.h>
#include "kvtile/memory/cuda/device_memory.cuh"
#endif

using namespace kvtile;

namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

struct model_config {
  const char* name;
  std::int32_t layers, kv_heads, head_dim, elem_bytes;
  std::int64_t bytes_per_token() const { return memory::kv_shape{layers, 0, 16, kv_heads, head_dim}.bytes_per_token(std::size_t(elem_bytes)); }
};

void print_model_sizes() {
  const model_config models[] = {{"Llama-3-8B (GQA 32/8)", 32, 8, 128, 2},
                                 {"Llama-2-13B (MHA 40)", 40, 40, 128, 2},
                                 {"Llama-3-70B (GQA 64/8)", 80, 8, 128, 2}};
  std::printf("== KV cache bytes per token (K + V, every layer, bf16) ==\n");
  std::printf("%-24s %12s %18s %18s\n", "model", "KiB/token", "tokens in 16 GiB", "tokens in 40 GiB");
  for (const auto& m : models)
    std::printf("%-24s %12.0f %18lld %18lld\n", m.name, double(m.bytes_per_token()) / 1024.0,
                (long long)(16 * kGiB / double(m.bytes_per_token())), (long long)(40 * kGiB / double(m.bytes_per_token())));
  std::printf("\n");
}

// ---- 2. simulated serving ---------------------------------------------------------------------
struct request {
  std::int64_t prompt, output;
  int samples;  // parallel sampling n
};

void simulate_serving() {
  const model_config model{"Llama-3-8B", 32, 8, 128, 2};
  const std::int32_t page = 16, max_len = 4096;
  const double kv_memory = 16 * kGiB;
  const auto num_blocks = std::int32_t(kv_memory / double(model.bytes_per_token() * page));
  std::mt19937_64 rng(2024);
  std::vector<request> queue;
  for (int i = 0; i < 400; ++i) {
    const std::int64_t prompt = 16 + std::int64_t(std::exp(std::uniform_real_distribution<double>(std::log(16), std::log(3000))(rng)));
    const std::int64_t output = 8 + std::int64_t(rng() % 600);
    queue.push_back({std::min<std::int64_t>(prompt, max_len - output), output, rng() % 4 == 0 ? 4 : 1});
  }

  kv_block_manager<> kv(num_blocks, page);
  struct running {
    std::vector<sequence_id> seqs;
    std::int64_t left;
  };
  std::vector<running> active;
  std::size_t next = 0;
  std::int64_t steps = 0, copies = 0, tokens_generated = 0, stalled = 0;
  std::vector<std::int32_t> filled(static_cast<std::size_t>(num_blocks));
  std::int64_t peak_blocks = 0, peak_seqs = 0, peak_tokens = 0, peak_shared = 0, peak_filled = 0;
  double sum_waste = 0;
  std::int64_t waste_samples = 0;
  std::vector<std::int64_t> slots(max_len);
  while (next < queue.size() || !active.empty()) {
    // Admit while the pool keeps 10% headroom for decoding (a watermark, as vLLM's scheduler does).
    while (next < queue.size()) {
      const auto& r = queue[next];
      const std::int64_t need = (r.prompt + page - 1) / page + r.samples;
      if (need + num_blocks / 10 > kv.num_free_blocks()) break;
      running run{{kv.create()}, r.output};
      kv.append(run.seqs[0], r.prompt, slots);  // prefill
      for (int s = 1; s < r.samples; ++s) run.seqs.push_back(kv.fork(run.seqs[0]));
      active.push_back(std::move(run));
      ++next;
    }
    // One decode step: every sequence appends a token (copy-on-write where it shares).
    for (auto& run : active)
      for (auto s : run.seqs) {
        if (kv.num_free_blocks() == 0) {  // a real server would preempt a request here
          ++stalled;
          continue;
        }
        kv.append(s, 1, std::span<std::int64_t>(slots.data(), 1));
        ++tokens_generated;
      }
    copies += std::int64_t(kv.pending_copies().size());
    kv.finish_copies();  // here a server runs the copies, then the attention step
    ++steps;
    // Measure, then retire finished requests.
    // Logical tokens (what contiguous caches must store, once per sample) and filled slots
    // (what the paged pool stores: a shared block once).
    std::int64_t live_tokens = 0, seqs = 0, filled_slots = 0;
    std::fill(filled.begin(), filled.end(), 0);
    for (const auto& run : active)
      for (auto s : run.seqs) {
        const auto& t = kv.table(s);
        live_tokens += t.num_tokens();
        ++seqs;
        for (std::int32_t i = 0; i < t.num_blocks(); ++i)
          filled[std::size_t(t.block(i))] = i + 1 < t.num_blocks() ? page : t.last_page_len();
      }
    for (auto f : filled) filled_slots += f;
    const std::int64_t used = kv.stats().used;
    if (used > peak_blocks) {
      peak_blocks = used;
      peak_seqs = seqs;
      peak_tokens = live_tokens;
      peak_filled = filled_slots;
      std::int64_t shared = 0;
      for (memory::block_id b = 0; b < num_blocks; ++b) shared += kv.refcount(b) > 1;
      peak_shared = shared;
    }
    if (used > 0) {
      sum_waste += 1.0 - double(filled_slots) / double(used * page);
      ++waste_samples;
    }
    for (auto it = active.begin(); it != active.end();) {
      if (--it->left <= 0) {
        for (auto s : it->seqs) kv.free(s);
        it = active.erase(it);
      } else {
        ++it;
      }
    }
  }
  kv.check_invariants();

  const double bpt = double(model.bytes_per_token());
  const double paged_bytes = double(peak_blocks) * page * bpt;
  const double contiguous_bytes = double(peak_seqs) * max_len * bpt;
  std::printf("== Serving simulation: %zu requests (25%% with parallel sampling n=4), %s, %d-token blocks ==\n",
              queue.size(), model.name, page);
  std::printf("KV pool: %.0f GiB = %d blocks; %lld decode steps, %lld tokens generated, %lld copy-on-write copies\n",
              kv_memory / kGiB, num_blocks, (long long)steps, (long long)tokens_generated, (long long)copies);
  std::printf("At the peak: %lld sequences running, %lld tokens in them (%lld distinct: forks share their prompt)\n",
              (long long)peak_seqs, (long long)peak_tokens, (long long)peak_filled);
  std::printf("  %-42s %10.2f GiB  (waste %5.1f%%)\n", "paged KV in use:", paged_bytes / kGiB,
              100.0 * (1.0 - double(peak_filled) / (double(peak_blocks) * page)));
  std::printf("  %-42s %10.2f GiB  (waste %5.1f%%)\n", "contiguous, pre-allocated to 4096 tokens:",
              contiguous_bytes / kGiB, 100.0 * (1.0 - double(peak_tokens) / (double(peak_seqs) * max_len)));
  std::printf("  blocks shared by forks (refcount > 1): %lld of %lld in use\n", (long long)peak_shared,
              (long long)peak_blocks);
  std::printf("  the same %.0f GiB holds %lld sequences of 4096 pre-allocated tokens; paged ran %lld at once\n",
              kv_memory / kGiB, (long long)(kv_memory / (max_len * bpt)), (long long)peak_seqs);
  std::printf("  paged waste averaged over the run (allocated but empty slots): %.1f%%; %lld token appends stalled on a full pool\n\n",
              100.0 * sum_waste / double(std::max<std::int64_t>(1, waste_samples)), (long long)stalled);
}

// ---- 3. real K/V through the cache ----------------------------------------------------------------
constexpr memory::kv_shape kSmall{4, 128, 16, 8, 128};

bfloat16 value_of(std::uint32_t token, std::int32_t layer, std::int32_t kv, std::int32_t i) {
  return bfloat16(float((token * 131 + std::uint32_t(layer) * 17 + std::uint32_t(kv) * 7 + std::uint32_t(i)) % 251) - 125.f);
}

template <class Cache>
bool run_real(Cache& cache, const char* where) {
  const std::int32_t row = kSmall.num_kv_heads * kSmall.head_dim;
  constexpr bool on_device = Cache::storage_type::memory_type::is_device;
  std::vector<std::vector<std::uint32_t>> tokens(1);  // per sample: token ids written
  std::uint32_t next_token = 1;
  std::vector<bfloat16> k, v;
  void* dbuf = nullptr;
  auto write = [&](sequence_id s, std::size_t sample, std::int64_t n) {
    const auto slots = cache.append(s, n);
    cache.run_pending_copies();
    for (std::int64_t i = 0; i < n; ++i) tokens[sample].push_back(next_token + std::uint32_t(i));
    for (std::int32_t l = 0; l < kSmall.num_layers; ++l) {
      k.resize(std::size_t(n * row));
      v.resize(std::size_t(n * row));
      for (std::int64_t t = 0; t < n; ++t)
        for (std::int32_t i = 0; i < row; ++i) {
          k[std::size_t(t * row + i)] = value_of(next_token + std::uint32_t(t), l, 0, i);
          v[std::size_t(t * row + i)] = value_of(next_token + std::uint32_t(t), l, 1, i);
        }
      if constexpr (on_device) {
#if KVTILE_HAS_CUDA_COMPILER
        const std::size_t kb = k.size() * 2, sb = slots.size() * 8;
        auto* base = static_cast<char*>(dbuf);
        KVTILE_CUDA_CHECK(cudaMemcpy(base, k.data(), kb, cudaMemcpyHostToDevice));
        KVTILE_CUDA_CHECK(cudaMemcpy(base + kb, v.data(), kb, cudaMemcpyHostToDevice));
        KVTILE_CUDA_CHECK(cudaMemcpy(base + 2 * kb, slots.data(), sb, cudaMemcpyHostToDevice));
        cache.write(l, reinterpret_cast<bfloat16*>(base), reinterpret_cast<bfloat16*>(base + kb), row,
                    reinterpret_cast<std::int64_t*>(base + 2 * kb), std::int32_t(n));
#endif
      } else {
        cache.write(l, k.data(), v.data(), row, slots.data(), std::int32_t(n));
      }
    }
    next_token += std::uint32_t(n);
  };
#if KVTILE_HAS_CUDA_COMPILER
  if constexpr (on_device) KVTILE_CUDA_CHECK(cudaMalloc(&dbuf, 1 << 20));
#endif
  std::vector<sequence_id> samples{cache.create()};
  write(samples[0], 0, 37);  // prompt: 2 full blocks + 5 tokens
  const auto used_after_prompt = cache.stats().used;
  for (int s = 1; s < 4; ++s) {
    samples.push_back(cache.fork(samples[0]));
    tokens.push_back(tokens[0]);
  }
  const auto used_after_fork = cache.stats().used;
  std::int64_t copies = 0;
  for (int step = 0; step < 20; ++step)
    for (std::size_t s = 0; s < samples.size(); ++s) {
      const auto cow = cache.table(samples[s]).tail_room() > 0 &&
                       cache.blocks().refcount(cache.table(samples[s]).last_block()) > 1;
      copies += cow;
      write(samples[s], s, 1);
    }
#if KVTILE_HAS_CUDA_COMPILER
  if constexpr (on_device) {
    KVTILE_CUDA_CHECK(cudaDeviceSynchronize());
    cudaFree(dbuf);
  }
#endif
  cache.check_invariants();

  // Read every sample back through its page table (CSR), every layer, K and V.
  const std::size_t pool_elems = cache.storage().bytes_per_pool() / sizeof(bfloat16);
  std::vector<bfloat16> hk(pool_elems), hv(pool_elems);
#if KVTILE_HAS_CUDA_COMPILER
  if constexpr (on_device) {
    KVTILE_CUDA_CHECK(cudaMemcpy(hk.data(), cache.storage().k_data(), pool_elems * 2, cudaMemcpyDeviceToHost));
    KVTILE_CUDA_CHECK(cudaMemcpy(hv.data(), cache.storage().v_data(), pool_elems * 2, cudaMemcpyDeviceToHost));
  }
#endif
  if constexpr (!on_device) {
    std::memcpy(hk.data(), cache.storage().k_data(), pool_elems * 2);
    std::memcpy(hv.data(), cache.storage().v_data(), pool_elems * 2);
  }
  const auto csr = cache.to_csr(samples);
  std::int64_t checked = 0, bad = 0;
  for (std::int32_t l = 0; l < kSmall.num_layers; ++l) {
    auto view = cache.layer(l);
    const auto layer_off = view.k - cache.storage().k_data();
    view.k = hk.data() + layer_off;
    view.v = hv.data() + layer_off;
    const auto pk = paging::bind(view, csr);
    for (std::int32_t b = 0; b < pk.batch(); ++b)
      for (std::int32_t t = 0; t < pk.kv_len(b); ++t) {
        const auto tok = tokens[std::size_t(b)][std::size_t(t)];
        for (std::int32_t h = 0; h < kSmall.num_kv_heads; ++h) {
          const auto off = pk.token_offset(b, t, h);
          for (std::int32_t d = 0; d < kSmall.head_dim; ++d) {
            const auto i = h * kSmall.head_dim + d;
            bad += pk.k_base()[off + d].bits != value_of(tok, l, 0, i).bits;
            bad += pk.v_base()[off + d].bits != value_of(tok, l, 1, i).bits;
          }
        }
        ++checked;
      }
  }
  std::printf("== Real K/V (%s): 4 layers, 8 KV heads, D 128, bf16, 16-token blocks ==\n", where);
  std::printf("prompt of 37 tokens: %lld blocks; fork into 4 samples: %lld blocks (a fork allocates nothing)\n",
              (long long)used_after_prompt, (long long)used_after_fork);
  std::printf("20 decode steps x 4 samples: %lld copy-on-write copies of the shared partial block, %d blocks in use\n",
              (long long)copies, cache.stats().used);
  std::printf("read back %lld (sample, token, layer) rows through the page tables: %s\n\n", (long long)checked,
              bad == 0 ? "all correct" : "MISMATCH");
  for (auto s : samples) cache.free(s);
  cache.check_invariants();
  return bad == 0 && cache.stats().free == kSmall.num_blocks;
}

}  // namespace

int main() {
  try {
    print_model_sizes();
    simulate_serving();
    bool ok = true;
    bool gpu = false;
#if KVTILE_HAS_CUDA_COMPILER
    int n = 0;
    gpu = cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
    if (gpu) {
      cudaDeviceProp prop{};
      cudaGetDeviceProperties(&prop, 0);
      paged_kv_cache<bfloat16>::with_memory<memory::cuda::device_memory> cache(kSmall);
      ok = run_real(cache, prop.name);
    }
#endif
    if (!gpu) {
      paged_kv_cache<bfloat16> cache(kSmall);
      ok = run_real(cache, "CPU: no GPU found");
    }
    return ok ? 0 : 1;
  } catch (const kvtile::error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
