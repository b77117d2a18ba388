// Chunked prefill under a token budget: 6 requests decode while a 2,000-token prompt arrives.
// Every step runs one mixed batch (decodes first, then a chunk of the prompt) through paged
// attention, exactly as the scheduler hands it over (q_indptr, CSR page table, slots): on the
// GPU when one is present (pools in device memory, the planner's paged kernel), else on the CPU
// (serving_backend.hpp). Prints each step's batch: no decode waits for the long prompt.
#include "serving_backend.hpp"

#include <kvtile/schedule/chunked_prefill.hpp>

#include <random>

int main() {
  return serving_example::run([]<class Memory>(serving_example::backend& where, std::type_identity<Memory>) {
    using namespace kvtile;
    constexpr int kHeadDim = 64, kKvHeads = 2, kQoHeads = 4;
    using cache_t = paged_kv_cache<bfloat16>::with_memory<Memory>;
    cache_t cache(memory::kv_shape{
        .num_layers = 1, .num_blocks = 512, .page_size = 16, .num_kv_heads = kKvHeads, .head_dim = kHeadDim});
    schedule::chunked_prefill_scheduler<typename cache_t::manager_type> sched(cache.blocks(),
                                                                              {.token_budget = 256, .max_running = 16});
    for (int i = 0; i < 6; ++i) sched.submit({.prompt_len = 40, .max_new_tokens = 24});

    std::mt19937 rng(2);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    std::vector<bfloat16> k, v, q, o;
    double checksum = 0;
    for (int step = 0; sched.has_work(); ++step) {
      if (step == 3) sched.submit({.prompt_len = 2000, .max_new_tokens = 4});  // the long prompt arrives
      const auto& b = sched.step();
      const auto n = std::int32_t(b.num_tokens());
      // The model's new K/V (random here) go through the batch's slot mapping.
      k.resize(std::size_t(n) * kKvHeads * kHeadDim);
      v.resize(k.size());
      for (auto& x : k) x = bfloat16(u(rng));
      for (auto& x : v) x = bfloat16(u(rng));
      cache.run_pending_copies();
      serving_example::write_kv(cache, where, 0, k.data(), v.data(), kKvHeads * kHeadDim, b.slots.data(), n);
      // Attention for every new token of the mixed batch, over its sequence's cache.
      q.resize(std::size_t(n) * kQoHeads * kHeadDim);
      for (auto& x : q) x = bfloat16(u(rng));
      serving_example::attention<kHeadDim, attention::causal_mask>(cache, where, 0, b.table, b.q_indptr, kQoHeads, q,
                                                                   {}, 0.125f, o);
      for (const auto x : o) checksum += double(float(x));
      if (step < 14 || !b.finished.empty())
        std::printf("step %2d: %2d decodes + %4lld prefill tokens = %4d tokens (budget 256), %3d blocks used%s\n", step,
                    b.num_decodes, (long long)b.prefill_tokens, n, cache.stats().used,
                    b.finished.empty() ? "" : ", requests finished");
    }
    sched.retire_finished();  // the last step's requests give their blocks back
    cache.check_invariants();
    std::printf("all requests served; %d blocks in use; attention: %s; sum of outputs %.3f\n", cache.stats().used,
                where.last_kernel.c_str(), checksum);
    return 0;
  });
}
