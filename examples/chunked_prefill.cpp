// Chunked prefill under a token budget: 6 requests decode while a 2,000-token prompt arrives.
// Every step runs one mixed batch (decodes first, then a chunk of the prompt) through the CPU
// attention backend, exactly as the paged kernels take it (q_indptr, CSR page table, slots).
// Prints each step's batch: no decode waits for the long prompt.
#include <kvtile/kvtile.hpp>
#include <kvtile/schedule/chunked_prefill.hpp>

#include <cstdio>
#include <random>
#include <vector>

int main() {
  using namespace kvtile;
  constexpr int kHeadDim = 64, kKvHeads = 2, kQoHeads = 4;
  using cache_t = paged_kv_cache<float>;
  cache_t cache(memory::kv_shape{.num_layers = 1, .num_blocks = 512, .page_size = 16, .num_kv_heads = kKvHeads,
                                 .head_dim = kHeadDim});
  schedule::chunked_prefill_scheduler<cache_t::manager_type> sched(cache.blocks(),
                                                                    {.token_budget = 256, .max_running = 16});
  for (int i = 0; i < 6; ++i) sched.submit({.prompt_len = 40, .max_new_tokens = 24});

  std::mt19937 rng(2);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<float> k, v, q, o;
  for (int step = 0; sched.has_work(); ++step) {
    if (step == 3) sched.submit({.prompt_len = 2000, .max_new_tokens = 4});  // the long prompt arrives
    const auto& b = sched.step();
    const auto n = std::int32_t(b.num_tokens());
    // The model's new K/V (random here) go through the batch's slot mapping.
    k.resize(std::size_t(n) * kKvHeads * kHeadDim);
    v.resize(k.size());
    for (auto& x : k) x = u(rng);
    for (auto& x : v) x = u(rng);
    cache.run_pending_copies();
    cache.write(0, k.data(), v.data(), kKvHeads * kHeadDim, b.slots.data(), n);
    // Attention for every new token of the mixed batch, over its sequence's cache.
    q.resize(std::size_t(n) * kQoHeads * kHeadDim);
    o.resize(q.size());
    for (auto& x : q) x = u(rng);
    const auto layout = attention::ragged_layout::varlen(b.q_indptr.data(), b.batch(), kQoHeads, kHeadDim);
    attention::cpu::attention_forward<attention::tile_shape<16, 64>, kHeadDim, attention::causal_mask>(
        attention::dense_tensor<const float>{q.data(), layout}, paging::bind(cache.layer(0), b.table), kKvHeads, {},
        0.125f, attention::dense_tensor<float>{o.data(), layout});
    if (step < 14 || !b.finished.empty())
      std::printf("step %2d: %2d decodes + %4lld prefill tokens = %4d tokens (budget 256), %3d blocks used%s\n", step,
                  b.num_decodes, (long long)b.prefill_tokens, n, cache.stats().used,
                  b.finished.empty() ? "" : ", requests finished");
  }
  cache.check_invariants();
  std::printf("all requests served; %d blocks in use\n", cache.stats().used);
  return 0;
}
