// Beam search on copy-on-write: 4 beams over a 200-token prompt, 64 steps. Each step keeps the
// 4 best of 16 candidates, frees the pruned beams, forks the survivors and runs the step's block
// copies in one batch. Prints the blocks the beams hold against what they would hold unshared.
// The pools are in device memory when a GPU is present (each step's copies one GPU launch), else
// in host memory (serving_backend.hpp).
#include "serving_backend.hpp"

#include <kvtile/schedule/beam_search.hpp>

#include <random>

int main() {
  return serving_example::run([]<class Memory>(serving_example::backend& where, std::type_identity<Memory>) {
    using namespace kvtile;
    constexpr int kHeadDim = 64, kKvHeads = 2, kWidth = 4;
    using cache_t = paged_kv_cache<bfloat16>::with_memory<Memory>;
    cache_t cache(memory::kv_shape{
        .num_layers = 1, .num_blocks = 256, .page_size = 16, .num_kv_heads = kKvHeads, .head_dim = kHeadDim});
    const std::vector<bfloat16> row(kKvHeads * kHeadDim, bfloat16(0.25f));

    const sequence_id prompt = cache.create();
    for (const auto slot : cache.append(prompt, 200))
      serving_example::write_kv(cache, where, 0, row.data(), row.data(), kKvHeads * kHeadDim, &slot, 1);

    schedule::beam_search<cache_t> beams(cache, prompt, kWidth);
    std::mt19937 rng(3);
    std::exponential_distribution<double> nll(1.0);  // a stand-in for the model's -log p
    std::vector<schedule::beam_candidate> candidates;
    std::int64_t copies = 0;
    for (int step = 1; step <= 64; ++step) {
      candidates.clear();
      for (std::int32_t b = 0; b < beams.size(); ++b)
        for (std::int32_t t = 0; t < kWidth; ++t) candidates.push_back({b, t, beams.score(b) - nll(rng)});
      const auto& slots = beams.step(candidates);
      for (const auto slot : slots)  // the new tokens' K/V
        serving_example::write_kv(cache, where, 0, row.data(), row.data(), kKvHeads * kHeadDim, &slot, 1);
      copies += beams.last_step_copies();
      if (step % 16 == 0)
        std::printf("step %2d: %d beams hold %3d blocks; unshared they would hold %3lld (%.0f%% saved)\n", step,
                    beams.size(), cache.stats().used, (long long)beams.blocks_without_sharing(),
                    100.0 * (1.0 - double(cache.stats().used) / double(beams.blocks_without_sharing())));
    }
    cache.check_invariants();
    std::printf("%lld blocks copied in 64 steps (one batch per step); best score %.2f\n", (long long)copies,
                beams.score(0));
    cache.free(beams.finish());
    return 0;
  });
}
