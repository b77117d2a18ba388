// Attention over a sinks + window cache: the paged cache after real evictions, run through the
// CPU backend with rotary embeddings at cache positions, equals the fp64 reference over a dense
// [sinks + window] cache built explicitly from the text's K/V (FlashAttention's rule: at most
// twice the error of the naive fp32 computation, plus a small slack).
#include <doctest/doctest.h>

#include <random>
#include <vector>

#include "kvtile/attention/cpu/forward.hpp"
#include "kvtile/attention/reference.hpp"
#include "kvtile/attention/variant.hpp"
#include "kvtile/caching/sink_window_eviction.hpp"
#include "kvtile/kv_cache.hpp"
#include "caching/kept_cache.hpp"
#include "support/test_util.hpp"

using namespace kvtile;
using namespace kvtile::attention;

TEST_CASE("sinks + window: paged attention with rotary at cache positions equals the fp64 reference") {
  const std::uint64_t seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  constexpr int D = 64, hk = 2, hq = 4, page = 16;
  using variant = rotary<causal_mask>;
  const variant::params vp{};  // theta 10000, every dim rotated
  const float scale = 0.125f;

  for (auto [sinks, window] : {std::pair<std::int64_t, std::int64_t>{4, 100}, {20, 37}, {0, 64}}) {
    CAPTURE(sinks);
    CAPTURE(window);
    paged_kv_cache<float> cache(memory::kv_shape{1, 64, page, hk, D});
    const caching::sink_window_eviction ev(sinks, window, page, 64);
    // Sequence 0 streams far past its window; sequence 1 stays short (nothing evicted).
    const std::vector<std::int64_t> text_len{1500 + std::int64_t(rng() % 100), 30};
    const std::vector<std::int32_t> q_len{7, 3};  // the last q_len tokens are this step's chunk
    std::vector<std::vector<float>> text_k(2), text_v(2);  // [text_len, hk, D] each: K before rotation
    std::vector<sequence_id> ids;
    for (int b = 0; b < 2; ++b) {
      ids.push_back(cache.create());
      text_k[std::size_t(b)] = kvtile_test::random_vector<float>(std::size_t(text_len[std::size_t(b)]) * hk * D, rng);
      text_v[std::size_t(b)] = kvtile_test::random_vector<float>(text_k[std::size_t(b)].size(), rng);
      std::int64_t pos = 0;
      const std::int64_t prefix = text_len[std::size_t(b)] - q_len[std::size_t(b)];
      while (pos < text_len[std::size_t(b)]) {
        // chunks of 1..40 tokens, the step's chunk last; eviction after each (not after the last:
        // attention runs right after its K/V are written)
        const std::int64_t n = pos < prefix ? std::min<std::int64_t>(1 + std::int64_t(rng() % 40), prefix - pos)
                                            : text_len[std::size_t(b)] - pos;
        const auto slots = cache.append(ids.back(), n);
        const std::size_t off = std::size_t(pos) * hk * D;
        cache.write(0, text_k[std::size_t(b)].data() + off, text_v[std::size_t(b)].data() + off, hk * D, slots.data(),
                    std::int32_t(n));
        pos += n;
        if (pos < text_len[std::size_t(b)]) ev.evict(cache.blocks(), ids.back());
      }
    }
    cache.check_invariants();
    REQUIRE(cache.num_tokens(ids[0]) < text_len[0]);  // something was evicted

    // The explicit [sinks + window] cache, from the policy's definition: the first whole sink
    // blocks of the text, then its last (kept - sink tokens) tokens; cache position = index here.
    std::vector<std::int32_t> kv_indptr{0};
    std::vector<float> dense_k, dense_v;
    for (int b = 0; b < 2; ++b) {
      kvtile_test::append_kept_cache(ev, cache.num_tokens(ids[std::size_t(b)]), page, text_k[std::size_t(b)],
                                     text_v[std::size_t(b)], hk * D, dense_k, dense_v, kv_indptr);
    }
    const std::vector<std::int32_t> q_indptr{0, q_len[0], q_len[0] + q_len[1]};
    const auto q_layout = ragged_layout::varlen(q_indptr.data(), 2, hq, D);
    const auto q = kvtile_test::random_vector<float>(std::size_t(q_indptr.back()) * hq * D, rng);
    const dense_kv<const float> dense{dense_k.data(), dense_v.data(), ragged_layout::varlen(kv_indptr.data(), 2, hk, D)};

    std::vector<float> o(q.size(), kvtile_test::poison<float>()), lse(std::size_t(q_indptr.back()) * hq);
    const auto table = cache.to_csr(ids);
    cpu::attention_forward<tile_shape<16, 64>, D, variant>(dense_tensor<const float>{q.data(), q_layout},
                                                           paging::bind(cache.layer(0), table), hk, vp, scale,
                                                           dense_tensor<float>{o.data(), q_layout}, lse.data());
    std::vector<double> ref(q.size()), ref_lse(lse.size());
    reference_attention<variant>(dense_tensor<const float>{q.data(), q_layout}, dense, hk, vp, scale,
                                 dense_tensor<double>{ref.data(), q_layout}, ref_lse.data());
    std::vector<float> naive(q.size());
    naive_attention_lowp<variant>(dense_tensor<const float>{q.data(), q_layout}, dense, hk, vp, scale,
                                  dense_tensor<float>{naive.data(), q_layout});
    const auto err = kvtile_test::compare(o, ref);
    const auto base = kvtile_test::compare(naive, ref);
    INFO("kernel max abs error " << err.max_abs << ", naive fp32 " << base.max_abs);
    CHECK_FALSE(err.any_nan);
    CHECK(err.max_abs <= 2 * base.max_abs + 1e-5);
    for (std::size_t i = 0; i < lse.size(); ++i) CHECK(std::abs(double(lse[i]) - ref_lse[i]) < 1e-4);

    // And it is not the attention over the whole text: eviction changed the answer.
    std::vector<std::int32_t> full_indptr{0, std::int32_t(text_len[0]), std::int32_t(text_len[0] + text_len[1])};
    std::vector<float> all_k = text_k[0], all_v = text_v[0];
    all_k.insert(all_k.end(), text_k[1].begin(), text_k[1].end());
    all_v.insert(all_v.end(), text_v[1].begin(), text_v[1].end());
    std::vector<double> whole(q.size());
    reference_attention<variant>(dense_tensor<const float>{q.data(), q_layout},
                                 dense_kv<const float>{all_k.data(), all_v.data(),
                                                       ragged_layout::varlen(full_indptr.data(), 2, hk, D)},
                                 hk, vp, scale, dense_tensor<double>{whole.data(), q_layout});
    CHECK(kvtile_test::compare(o, whole).max_abs > 1e-3);
  }
}
