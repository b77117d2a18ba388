// Attention over a sinks + window cache on the GPU: the paged cache after real evictions (the
// bookkeeping and K/V on the host, the pool then uploaded as it is), one decode query per
// sequence through the paged kernels with rotary at cache positions, against the fp64
// reference over a dense [sinks + window] cache built explicitly from the text's K/V.
#include <doctest/doctest.h>

#include <random>
#include <vector>

#include "kvtile/attention/cuda/paged_attention.cuh"
#include "kvtile/attention/reference.hpp"
#include "kvtile/attention/variant.hpp"
#include "kvtile/caching/sink_window_eviction.hpp"
#include "kvtile/kv_cache.hpp"
#include "support/device_buffer.cuh"
#include "caching/kept_cache.hpp"
#include "support/test_util.hpp"

using namespace kvtile;
using namespace kvtile::attention;

TEST_CASE("sinks + window on the GPU: paged decode with rotary at cache positions equals the fp64 reference") {
  using T = bfloat16;
  using variant = rotary<causal_mask>;
  constexpr int D = 128, hk = 2, hq = 8, page = 16, pool_blocks = 128;
  const std::uint64_t seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const variant::params vp{};
  const float scale = 1.f / std::sqrt(float(D));

  paged_kv_cache<T> cache(memory::kv_shape{1, pool_blocks, page, hk, D});
  const caching::sink_window_eviction ev(/*sinks=*/16, /*window=*/200, page, pool_blocks);
  const std::vector<std::int64_t> text_len{3000 + std::int64_t(rng() % 200), 301};
  std::vector<std::vector<T>> text_k(2), text_v(2);  // [text_len, hk, D]: K before rotation
  std::vector<sequence_id> ids;
  for (int b = 0; b < 2; ++b) {
    ids.push_back(cache.create());
    text_k[std::size_t(b)] = kvtile_test::random_vector<T>(std::size_t(text_len[std::size_t(b)]) * hk * D, rng);
    text_v[std::size_t(b)] = kvtile_test::random_vector<T>(text_k[std::size_t(b)].size(), rng);
    for (std::int64_t pos = 0; pos < text_len[std::size_t(b)];) {
      // chunks of 1..64 tokens, evicting after each but the last (the decode token's K/V are in)
      const std::int64_t n = std::min<std::int64_t>(1 + std::int64_t(rng() % 64), text_len[std::size_t(b)] - 1 - pos);
      const std::int64_t m = n > 0 ? n : 1;
      const auto slots = cache.append(ids.back(), m);
      const std::size_t off = std::size_t(pos) * hk * D;
      cache.write(0, text_k[std::size_t(b)].data() + off, text_v[std::size_t(b)].data() + off, hk * D, slots.data(),
                  std::int32_t(m));
      pos += m;
      if (pos < text_len[std::size_t(b)]) ev.evict(cache.blocks(), ids.back());
    }
  }
  cache.check_invariants();
  REQUIRE(cache.num_tokens(ids[0]) < text_len[0]);
  REQUIRE(cache.num_tokens(ids[1]) < text_len[1]);

  // The explicit [sinks + window] cache from the policy's definition.
  std::vector<std::int32_t> kv_indptr{0};
  std::vector<T> dense_k, dense_v;
  for (int b = 0; b < 2; ++b) {
    kvtile_test::append_kept_cache(ev, cache.num_tokens(ids[std::size_t(b)]), page, text_k[std::size_t(b)],
                                   text_v[std::size_t(b)], hk * D, dense_k, dense_v, kv_indptr);
  }
  const std::vector<std::int32_t> q_indptr{0, 1, 2};
  const auto q = kvtile_test::random_vector<T>(2 * hq * D, rng);
  std::vector<double> ref(q.size());
  reference_attention<variant>(dense_tensor<const T>{q.data(), ragged_layout::varlen(q_indptr.data(), 2, hq, D)},
                               dense_kv<const T>{dense_k.data(), dense_v.data(),
                                                 ragged_layout::varlen(kv_indptr.data(), 2, hk, D)},
                               hk, vp, scale, dense_tensor<double>{ref.data(), ragged_layout::varlen(q_indptr.data(), 2, hq, D)});

  // The GPU: the pool as the cache holds it, the page table the evictions left.
  const auto pool = cache.layer(0);
  const std::size_t pool_elems = std::size_t(pool_blocks) * std::size_t(pool.stride_block);
  kvtile_test::device_buffer<T> dk(std::vector<T>(pool.k, pool.k + pool_elems));
  kvtile_test::device_buffer<T> dv(std::vector<T>(pool.v, pool.v + pool_elems));
  const auto host_table = cache.to_csr(ids);
  kvtile_test::device_buffer<std::int32_t> dqi(q_indptr), dind(host_table.indptr), dblk(host_table.indices),
      dlast(host_table.last_page_len);
  kvtile_test::device_buffer<T> dq(q), dout(q.size());
  using attn = cuda::paged_attention<T, D, variant>;
  const cuda::paged_problem pr{hq, hk, D, page, pool_blocks, 2};
  for (const bool tma : {true, false}) {
    typename attn::plan_arguments pa{q_indptr.data(), host_table.view(), pr, cuda::query_device_limits()};
    pa.options.use_wgmma = tma;  // the TMA decode kernel where the device has it, and the cp.async one
    const cuda::paged_plan plan = attn::plan(pa, vp);
    INFO("kernel " << plan.kernel() << ", kept " << kv_indptr[1] << " and " << kv_indptr[2] - kv_indptr[1] << " tokens");
    kvtile_test::device_buffer<unsigned char> ws(attn::workspace_size(plan));
    attn::initialize(plan, ws.ptr);
    dout.upload(std::vector<T>(dout.n, kvtile_test::poison<T>()));
    const auto ql = ragged_layout::varlen(dqi.ptr, 2, hq, D);
    const typename attn::arguments args{
        dense_tensor<T>{dq.ptr, ql},
        paging::paged_kv<T, paging::csr_page_table>{
            paging::kv_pool_view<T>::make(dk.ptr, dv.ptr, kv_layout::nhd, pool_blocks, page, hk, D),
            paging::csr_page_table{dind.ptr, dblk.ptr, dlast.ptr, 2}},
        dense_tensor<T>{dout.ptr, ql}, nullptr, vp, scale};
    attn::check(plan, args);
    attn::run(plan, args, ws.ptr);
    KVTILE_CUDA_CHECK(cudaDeviceSynchronize());
    const auto e = kvtile_test::compare(dout.download(), ref);
    INFO("max error " << e.max_abs << ", relative L2 " << e.rel_l2);
    CHECK_FALSE(e.any_nan);
    // bf16 outputs: a few bf16 ulps; a token at the wrong cache position or a wrong block breaks it by far
    CHECK(e.max_abs < 2e-2);
    CHECK(e.rel_l2 < 1e-2);
  }
}
