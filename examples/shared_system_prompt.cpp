// Prefix caching: 64 chat requests share one 480-token system prompt, and every fourth is the
// next turn of an earlier conversation. Each request reuses the longest cached prefix of its
// prompt (whole blocks, shared with refcount + 1), computes only the rest, then publishes its
// blocks. Prints the prefill tokens skipped, the blocks saved and the hit rate. The pools are
// in device memory when a GPU is present (K/V writes and block copies on the GPU), else in host
// memory (serving_backend.hpp).
#include "serving_backend.hpp"

#include <kvtile/caching/prefix_cache.hpp>

#include <random>

int main() {
  return serving_example::run([]<class Memory>(serving_example::backend& where, std::type_identity<Memory>) {
    using namespace kvtile;
    using caching::token_id;
    constexpr int kHeadDim = 64, kKvHeads = 2, kPage = 16;
    using cache_t =
        paged_kv_cache<bfloat16>::with_allocator<caching::prefix_caching_allocator<>>::template with_memory<Memory>;
    cache_t cache(memory::kv_shape{
        .num_layers = 1, .num_blocks = 512, .page_size = kPage, .num_kv_heads = kKvHeads, .head_dim = kHeadDim});

    std::mt19937 rng(1);
    auto tokens = [&](int n) {
      std::vector<token_id> t(static_cast<std::size_t>(n));
      for (auto& x : t) x = token_id(rng() % 32000);
      return t;
    };
    const std::vector<token_id> system = tokens(480);
    std::vector<std::vector<token_id>> conversations;
    std::vector<bfloat16> kv_rows;  // K and V of the tokens a request computes (the model's output)

    std::int64_t prompt_tokens = 0, skipped = 0;
    for (int r = 0; r < 64; ++r) {
      std::vector<token_id> prompt = (r % 4 == 3) ? conversations[rng() % conversations.size()] : system;
      const auto question = tokens(20 + int(rng() % 60));
      prompt.insert(prompt.end(), question.begin(), question.end());

      const sequence_id id = cache.create();
      const std::int64_t reused = caching::admit_prefix(cache.blocks(), id, prompt);  // shared blocks
      const auto slots = cache.append(id, std::int64_t(prompt.size()) - reused);      // only the rest
      cache.run_pending_copies();
      kv_rows.assign(slots.size() * kKvHeads * kHeadDim, bfloat16(0.5f));
      serving_example::write_kv(cache, where, 0, kv_rows.data(), kv_rows.data(), kKvHeads * kHeadDim, slots.data(),
                                std::int32_t(slots.size()));
      caching::publish_prefix(cache.blocks(), id, prompt);  // later requests can hit these blocks

      // 8 generated tokens, then the turn ends: the conversation so far is a prompt for later.
      for (int t = 0; t < 8; ++t) prompt.push_back(token_id(rng() % 32000));
      cache.append(id, 8);
      caching::publish_prefix(cache.blocks(), id, prompt);
      conversations.push_back(prompt);
      if (r % 2 == 1) cache.free(id);  // half the requests finish; their blocks stay cached

      prompt_tokens += std::int64_t(prompt.size()) - 8;
      skipped += reused;
    }
    cache.check_invariants();
    const auto s = cache.blocks().allocator().cache_stats();
    std::printf("64 requests, %lld prompt tokens: %lld prefill tokens skipped (hit rate %.1f%%), %lld blocks saved\n",
                (long long)prompt_tokens, (long long)skipped, 100.0 * double(skipped) / double(prompt_tokens),
                (long long)(skipped / kPage));
    std::printf("pool of %d blocks: %d in use, %d cached (reusable, reclaimed when needed), %d unused\n", s.capacity,
                s.in_use, s.cached, s.unused);
    return 0;
  });
}
