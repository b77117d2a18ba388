// StreamingLLM: one sequence streams 120,000 tokens through a pool of 72 blocks (1,152 tokens):
// 4 attention sinks and a 1,024-token window. Whole blocks between them go back to the pool by
// editing the page table; no K/V moves. K is stored before rotation; at checkpoints a decode
// step runs attention over the kept cache with rotary embeddings at *cache* positions
// (attention::rotary<causal_mask>: key j at j), as StreamingLLM does, and the memory used is
// printed: flat, however long the text. On the GPU when one is present (pools in device memory,
// the paged decode kernel), else on the CPU (serving_backend.hpp).
#include "serving_backend.hpp"

#include <kvtile/attention/variant.hpp>
#include <kvtile/caching/sink_window_eviction.hpp>

#include <cmath>

int main() {
  return serving_example::run([]<class Memory>(serving_example::backend& where, std::type_identity<Memory>) {
    using namespace kvtile;
    constexpr int kHeadDim = 64, kKvHeads = 1, kQoHeads = 2, kPage = 16, kBlocks = 72;
    using cache_t = paged_kv_cache<bfloat16>::with_memory<Memory>;
    using rope_at_cache_positions = attention::rotary<attention::causal_mask>;
    cache_t cache(memory::kv_shape{
        .num_layers = 1, .num_blocks = kBlocks, .page_size = kPage, .num_kv_heads = kKvHeads, .head_dim = kHeadDim});
    const caching::sink_window_eviction evict(/*sinks=*/4, /*window=*/1024, kPage, kBlocks);

    const sequence_id id = cache.create();
    std::vector<bfloat16> k(kKvHeads * kHeadDim), v(k.size()), q(kQoHeads * kHeadDim), o;
    const std::vector<std::int32_t> q_indptr{0, 1};
    std::int64_t evicted = 0;
    for (std::int64_t pos = 0; pos < 120000; ++pos) {
      const auto slot = cache.append(id, 1);  // K is stored before rotation
      for (int d = 0; d < kHeadDim; ++d) {
        k[std::size_t(d)] = bfloat16(std::sin(0.001f * float(pos) + float(d)));
        v[std::size_t(d)] = bfloat16(std::cos(0.002f * float(pos) * float(d + 1)));
      }
      serving_example::write_kv(cache, where, 0, k.data(), v.data(), kHeadDim, slot.data(), 1);
      evicted += evict.evict(cache.blocks(), id);
      const std::int64_t n = pos + 1;
      if (n % 20000 == 0 || (n < 20000 && (n & (n - 1)) == 0 && n >= 256)) {  // 256, 512, ..., 16384, then every 20,000
        const std::vector<sequence_id> batch{id};
        for (std::size_t d = 0; d < q.size(); ++d) q[d] = k[d % k.size()];
        serving_example::attention<kHeadDim, rope_at_cache_positions>(cache, where, 0, cache.to_csr(batch), q_indptr,
                                                                      kQoHeads, q, {}, 0.125f, o);
        std::printf(
            "%6lld tokens streamed: %4lld kept (%lld evicted), %2d of %d blocks used (%.0f KiB), o[0] = %+.4f\n",
            (long long)n, (long long)cache.num_tokens(id), (long long)evicted, cache.stats().used, kBlocks,
            double(cache.stats().used) * kPage * kKvHeads * kHeadDim * 2 * sizeof(bfloat16) / 1024.0,
            double(float(o[0])));
      }
    }
    cache.check_invariants();
    std::printf("attention: %s\n", where.last_kernel.c_str());
    std::printf("most blocks ever in use: %d (bound: %lld)\n", cache.stats().high_water,
                (long long)evict.max_blocks() + 1);
    return 0;
  });
}
