// Quickstart: a paged KV cache, a forked sequence sharing its prompt, and attention over the
// cache with the CPU backend. (README shows this program.)
#include <kvtile/kvtile.hpp>

#include <cstdio>
#include <random>
#include <vector>

int main() {
  using namespace kvtile;
  constexpr int kHeadDim = 64, kKvHeads = 2, kQoHeads = 8;  // GQA group 4

  // Pick the policies at compile time; swap one with a with_* alias.
  using cache_t = paged_kv_cache<bfloat16>::with_allocator<memory::lowest_id_allocator>;
  cache_t cache(memory::kv_shape{.num_layers = 1, .num_blocks = 64, .page_size = 16, .num_kv_heads = kKvHeads,
                                 .head_dim = kHeadDim});

  // A 40-token prompt: allocate slots, write its K and V through the slot mapping.
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  auto random_tokens = [&](int n) {
    std::vector<bfloat16> x(std::size_t(n) * kKvHeads * kHeadDim);
    for (auto& e : x) e = bfloat16(u(rng));
    return x;
  };
  const sequence_id prompt = cache.create();
  const auto slots = cache.append(prompt, 40);
  const auto k = random_tokens(40), v = random_tokens(40);
  cache.write(0, k.data(), v.data(), kKvHeads * kHeadDim, slots.data(), 40);

  // Parallel sampling: the fork shares all 3 blocks; its first token copies the partial one.
  const sequence_id sample = cache.fork(prompt);
  const auto s1 = cache.append(sample, 1);
  cache.run_pending_copies();
  const auto k1 = random_tokens(1), v1 = random_tokens(1);
  cache.write(0, k1.data(), v1.data(), kKvHeads * kHeadDim, s1.data(), 1);
  cache.check_invariants();

  // One decode step for both sequences: attention through the page table (CSR view).
  const std::vector<sequence_id> batch{prompt, sample};
  const auto table = cache.to_csr(batch);
  const auto kv = paging::bind(cache.layer(0), table);  // checks ids and page size against the pool
  std::vector<bfloat16> q(2 * kQoHeads * kHeadDim), o(q.size());
  for (auto& e : q) e = bfloat16(u(rng));
  std::vector<float> lse(2 * kQoHeads);
  const auto layout = attention::ragged_layout::fixed(2, 1, kQoHeads, kHeadDim);
  attention::cpu::attention_forward<attention::tile_shape<16, 64>, kHeadDim, attention::causal_mask>(
      attention::dense_tensor<const bfloat16>{q.data(), layout}, kv, kKvHeads, {}, 0.125f,
      attention::dense_tensor<bfloat16>{o.data(), layout}, lse.data());

  const auto st = cache.stats();
  std::printf("blocks used %d of %d (shared prompt blocks counted once); lse[0] = %.4f, o[0] = %.4f\n",
              int(st.used), int(cache.blocks().num_blocks()), lse[0], float(o[0]));
  return 0;
}
