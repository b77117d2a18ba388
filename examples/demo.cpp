// kvtile demo: why a paged KV cache.
//
// 1. KV bytes per token of a model configuration, and how many tokens fit in a given memory.
// 2. A simulated serving run (varied prompt and output lengths, some requests with parallel
//    sampling n = 4) through kvtile's paged bookkeeping, against contiguous pre-allocation of
//    every sequence to the maximum length.
// 3. Real K/V through a paged_kv_cache: prompt, fork into 4 samples, decode with copy-on-write,
//    every sample read back through its page table. On the GPU when one is present (this file
//    is compiled as CUDA when CUDA is available), on the CPU otherwise.
// 4. Real attention over that cache: one decode step (a query per sample, GQA 32 query heads over
//    the 8 KV heads, every layer) through the page tables, repeated to measure tokens per second.
//    On the GPU the paged decode kernel (the planner's choice, named), checked against the CPU
//    backend; on the CPU the CPU backend.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "kvtile/attention/cpu/forward.hpp"
#include "kvtile/kv_cache.hpp"
#include "kvtile/core/numeric.hpp"
#if KVTILE_HAS_CUDA_COMPILER
#include <cuda_runtime.h>
#include "kvtile/attention/cuda/decode.cuh"
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

// ---- 4. real attention over the cache -------------------------------------------------------------
constexpr std::int32_t kQoHeads = 32;  // GQA: 4 query heads per KV head

// A decode step this small (4 sequences of 57 keys) is over before a pool's threads wake up:
// one thread runs it.
attention::cpu::thread_pool& pool1() {
  static attention::cpu::thread_pool pool(1);
  return pool;
}

// One decode step of attention for every sample and layer, on the CPU backend, over K/V at
// `k` / `v` (the host pool or a host copy of the device pool). out: [layers][samples * 32 * 128].
template <class Cache>
double cpu_decode_step(const Cache& cache, const paging::csr_page_table_host& csr, const bfloat16* k, const bfloat16* v,
                       const std::vector<bfloat16>& q, std::vector<std::vector<bfloat16>>& out) {
  using namespace attention;
  const std::int32_t batch = csr.batch();
  const auto ql = ragged_layout::fixed(batch, 1, kQoHeads, kSmall.head_dim);
  const auto t0 = std::chrono::steady_clock::now();
  out.resize(std::size_t(kSmall.num_layers));
  for (std::int32_t l = 0; l < kSmall.num_layers; ++l) {
    auto view = cache.layer(l);
    const auto off = view.k - cache.storage().k_data();
    paging::kv_pool_view<const bfloat16> pool;  // the layer's geometry over the given copy
    pool.k = k + off;
    pool.v = v + off;
    pool.stride_block = view.stride_block;
    pool.stride_token = view.stride_token;
    pool.stride_head = view.stride_head;
    pool.num_blocks = view.num_blocks;
    pool.page_size = view.page_size;
    pool.num_kv_heads = view.num_kv_heads;
    pool.head_dim = view.head_dim;
    out[std::size_t(l)].resize(q.size());
    cpu::attention_forward<tile_shape<16, 64>, kSmall.head_dim, causal_mask>(
        dense_tensor<const bfloat16>{q.data(), ql}, paging::bind(pool, csr), kSmall.num_kv_heads, {},
        1.f / std::sqrt(float(kSmall.head_dim)), dense_tensor<bfloat16>{out[std::size_t(l)].data(), ql}, nullptr, pool1());
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Runs decode attention over the samples' pages; returns false when the GPU and CPU disagree.
template <class Cache>
bool run_attention(const Cache& cache, const std::vector<sequence_id>& samples, const bfloat16* host_k,
                   const bfloat16* host_v) {
  constexpr bool on_device = Cache::storage_type::memory_type::is_device;
  const auto csr = cache.to_csr(samples);
  const std::int32_t batch = csr.batch();
  std::vector<bfloat16> q(std::size_t(batch) * kQoHeads * kSmall.head_dim);
  std::mt19937 rng(7);
  for (auto& x : q) x = bfloat16(std::uniform_real_distribution<float>(-0.02f, 0.02f)(rng));
  std::vector<std::vector<bfloat16>> cpu_out;
  std::printf("== Attention over the cache: one decode step = %d samples x %d layers, GQA %d/%d, D %d ==\n", batch,
              kSmall.num_layers, kQoHeads, kSmall.num_kv_heads, kSmall.head_dim);
  double cpu_s = cpu_decode_step(cache, csr, host_k, host_v, q, cpu_out);  // warm-up (thread pool)
  int steps = 0;
  cpu_s = 0;
  while (cpu_s < 0.2 && steps < 2000) cpu_s += cpu_decode_step(cache, csr, host_k, host_v, q, cpu_out), ++steps;
  if constexpr (!on_device) {
    std::printf("CPU backend (attention/cpu, tiled, one thread): %.0f tokens/s (%.1f us per step)\n\n",
                steps * batch / cpu_s, cpu_s / steps * 1e6);
    return true;
  } else {
#if KVTILE_HAS_CUDA_COMPILER
    namespace kc = attention::cuda;
    std::vector<std::int32_t> qi(std::size_t(batch) + 1);
    for (std::int32_t b = 0; b <= batch; ++b) qi[std::size_t(b)] = b;
    const kc::paged_problem pr{kQoHeads, kSmall.num_kv_heads, kSmall.head_dim, kSmall.page_size, kSmall.num_blocks, 2};
    const auto plan = kc::plan_decode<attention::causal_mask>(qi.data(), csr.view(), pr, {}, kc::query_device_limits());
    // Device copies of what the kernels read: the page table, the query indptr, q, o, the plan.
    const std::size_t n_idx = csr.indices.size(), n_q = q.size();
    std::int32_t *d_indptr, *d_indices, *d_last, *d_qi;
    bfloat16 *d_q, *d_o;
    void* ws = nullptr;
    KVTILE_CUDA_CHECK(cudaMalloc(&d_indptr, csr.indptr.size() * 4));
    KVTILE_CUDA_CHECK(cudaMalloc(&d_indices, std::max<std::size_t>(n_idx, 1) * 4));
    KVTILE_CUDA_CHECK(cudaMalloc(&d_last, csr.last_page_len.size() * 4));
    KVTILE_CUDA_CHECK(cudaMalloc(&d_qi, qi.size() * 4));
    KVTILE_CUDA_CHECK(cudaMalloc(&d_q, n_q * 2));
    KVTILE_CUDA_CHECK(cudaMalloc(&d_o, std::size_t(kSmall.num_layers) * n_q * 2));
    KVTILE_CUDA_CHECK(cudaMalloc(&ws, std::max<std::size_t>(plan.workspace_bytes(), 256)));
    KVTILE_CUDA_CHECK(cudaMemcpy(d_indptr, csr.indptr.data(), csr.indptr.size() * 4, cudaMemcpyHostToDevice));
    KVTILE_CUDA_CHECK(cudaMemcpy(d_indices, csr.indices.data(), n_idx * 4, cudaMemcpyHostToDevice));
    KVTILE_CUDA_CHECK(cudaMemcpy(d_last, csr.last_page_len.data(), csr.last_page_len.size() * 4, cudaMemcpyHostToDevice));
    KVTILE_CUDA_CHECK(cudaMemcpy(d_qi, qi.data(), qi.size() * 4, cudaMemcpyHostToDevice));
    KVTILE_CUDA_CHECK(cudaMemcpy(d_q, q.data(), n_q * 2, cudaMemcpyHostToDevice));
    kc::upload_plan(plan, ws);
    const auto ql = attention::ragged_layout::varlen(d_qi, batch, kQoHeads, kSmall.head_dim);
    auto step = [&] {
      for (std::int32_t l = 0; l < kSmall.num_layers; ++l) {
        const paging::paged_kv<bfloat16, paging::csr_page_table> kv{cache.layer(l), {d_indptr, d_indices, d_last, batch}};
        kc::run_decode<attention::causal_mask, kSmall.head_dim>(
            plan, ws, attention::dense_tensor<bfloat16>{d_q, ql}, kv,
            attention::dense_tensor<bfloat16>{d_o + std::size_t(l) * n_q, ql}, nullptr, {},
            1.f / std::sqrt(float(kSmall.head_dim)));
      }
    };
    step();
    KVTILE_CUDA_CHECK(cudaDeviceSynchronize());
    const int gpu_steps = 500;
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < gpu_steps; ++i) step();
    KVTILE_CUDA_CHECK(cudaDeviceSynchronize());
    const double gpu_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::vector<bfloat16> gpu_out(std::size_t(kSmall.num_layers) * n_q);
    KVTILE_CUDA_CHECK(cudaMemcpy(gpu_out.data(), d_o, gpu_out.size() * 2, cudaMemcpyDeviceToHost));
    double max_diff = 0;
    for (std::int32_t l = 0; l < kSmall.num_layers; ++l)
      for (std::size_t i = 0; i < n_q; ++i)
        max_diff = std::max(max_diff, double(std::fabs(float(gpu_out[std::size_t(l) * n_q + i]) -
                                                       float(cpu_out[std::size_t(l)][i]))));
    for (void* p : {(void*)d_indptr, (void*)d_indices, (void*)d_last, (void*)d_qi, (void*)d_q, (void*)d_o, ws}) cudaFree(p);
    // Outputs are averages of K/V values of magnitude <= 125 stored in bf16 (8 bits of mantissa).
    const bool ok = max_diff <= 1.0;
    std::printf("GPU paged decode (kernel: %s, %zu CTAs): %.0f tokens/s (%.1f us per step, host launches included)\n",
                plan.kernel(), plan.ctas(), gpu_steps * batch / gpu_s, gpu_s / gpu_steps * 1e6);
    std::printf("  why this kernel: %s\n", plan.reason.c_str());
    std::printf("CPU backend on the same pages:   %.0f tokens/s; GPU and CPU outputs differ by at most %.3g: %s\n\n",
                steps * batch / cpu_s, max_diff, ok ? "agree" : "MISMATCH");
    return ok;
#else
    return false;
#endif
  }
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
  const bool attention_ok = run_attention(cache, samples, hk.data(), hv.data());
  for (auto s : samples) cache.free(s);
  cache.check_invariants();
  return bad == 0 && attention_ok && cache.stats().free == kSmall.num_blocks;
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
