// StreamingLLM: one sequence streams 120,000 tokens through a pool of 72 blocks (1,152 tokens):
// 4 attention sinks and a 1,024-token window. Whole blocks between them go back to the pool by
// editing the page table; no K/V moves. K is stored before rotation; at checkpoints a decode
// step runs attention over the kept cache on the CPU with rotary embeddings at *cache*
// positions (attention::rotary<causal_mask>: key j at j), as StreamingLLM does, and the memory
// used is printed: flat, however long the text.
#include <kvtile/attention/variant.hpp>
#include <kvtile/caching/sink_window_eviction.hpp>
#include <kvtile/kvtile.hpp>

#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  using namespace kvtile;
  constexpr int kHeadDim = 64, kKvHeads = 1, kQoHeads = 2, kPage = 16, kBlocks = 72;
  using cache_t = paged_kv_cache<float>;
  cache_t cache(memory::kv_shape{.num_layers = 1, .num_blocks = kBlocks, .page_size = kPage, .num_kv_heads = kKvHeads,
                                 .head_dim = kHeadDim});
  const caching::sink_window_eviction evict(/*sinks=*/4, /*window=*/1024, kPage, kBlocks);

  const sequence_id id = cache.create();
  std::vector<float> k(kKvHeads * kHeadDim), v(k.size()), q(kQoHeads * kHeadDim), o(q.size());
  std::int64_t evicted = 0;
  for (std::int64_t pos = 0; pos < 120000; ++pos) {
    const auto slot = cache.append(id, 1);  // K is stored before rotation
    for (int d = 0; d < kHeadDim; ++d) {
      k[std::size_t(d)] = std::sin(0.001f * float(pos) + float(d));
      v[std::size_t(d)] = std::cos(0.002f * float(pos) * float(d + 1));
    }
    cache.write(0, k.data(), v.data(), kHeadDim, slot.data(), 1);
    evicted += evict.evict(cache.blocks(), id);
    const std::int64_t n = pos + 1;
    if (n % 20000 == 0 || (n < 20000 && (n & (n - 1)) == 0 && n >= 256)) {  // 256, 512, ..., 16384, then every 20,000
      const std::vector<sequence_id> batch{id};
      const auto table = cache.to_csr(batch);
      for (std::size_t d = 0; d < q.size(); ++d) q[d] = k[d % k.size()];
      const auto layout = attention::ragged_layout::fixed(1, 1, kQoHeads, kHeadDim);
      using rope_at_cache_positions = attention::rotary<attention::causal_mask>;
      attention::cpu::attention_forward<attention::tile_shape<16, 64>, kHeadDim, rope_at_cache_positions>(
          attention::dense_tensor<const float>{q.data(), layout}, paging::bind(cache.layer(0), table), kKvHeads,
          rope_at_cache_positions::params{}, 0.125f, attention::dense_tensor<float>{o.data(), layout});
      std::printf("%6lld tokens streamed: %4lld kept (%lld evicted), %2d of %d blocks used (%.0f KiB), o[0] = %+.4f\n",
                  (long long)(pos + 1), (long long)cache.num_tokens(id), (long long)evicted, cache.stats().used,
                  kBlocks, double(cache.stats().used) * kPage * kKvHeads * kHeadDim * 2 * sizeof(float) / 1024.0,
                  o[0]);
    }
  }
  cache.check_invariants();
  std::printf("most blocks ever in use: %d (bound: %lld)\n", cache.stats().high_water, (long long)evict.max_blocks() + 1);
  return 0;
}
