// GPU tests of kvtile/attention/cuda/decode.cuh: paged decode (1..8 query tokens per request)
// against the fp64 reference, over scattered pages, every page size and GQA group size,
// NHD and HND, fp16 and bf16, masks, split-KV == unsplit, paged == dense memory, CUDA graphs.
#include <doctest/doctest.h>

#include "attention/cuda/paged_fixture.cuh"

using namespace paged_test;

namespace {

std::vector<std::int32_t> random_lens(std::mt19937_64& rng, int n, int lo, int hi) {
  std::uniform_int_distribution<int> d(lo, hi);
  std::vector<std::int32_t> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// 32-bit words from src to dst.
struct word_copy {
  const std::uint32_t* src;
  std::uint32_t* dst;
  std::size_t n;
};

// A kernel that lets the grid after it on the stream start at once (programmatic dependent
// launch), then spins for `ns` nanoseconds before writing: its copies, then all-ones bits (NaN in
// bf16 and fp32) over `nan_o` and `nan_lse`. A grid launched early that read or wrote those
// buffers before this one completed gets stale inputs or loses its outputs.
__global__ void late_writer(word_copy a, word_copy b, word_copy nan_o, word_copy nan_lse, unsigned long long ns) {
  kc::arch::launch_dependents();
  if (threadIdx.x == 0) {
    unsigned long long t0 = 0, t = 0;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    while (t - t0 < ns);
  }
  __syncthreads();
  auto copy = [](const word_copy& c) {
    for (std::size_t i = threadIdx.x; i < c.n; i += blockDim.x) c.dst[i] = c.src ? c.src[i] : ~0u;
  };
  copy(a);
  copy(b);
  copy(nan_o);
  copy(nan_lse);
}

template <class T>
word_copy words(const device_buffer<T>* src, device_buffer<T>& dst) {
  static_assert(sizeof(T) * 2 == 4 || sizeof(T) == 4);
  const std::size_t n = dst.n * sizeof(T) / 4;
  return {src ? reinterpret_cast<const std::uint32_t*>(src->ptr) : nullptr, reinterpret_cast<std::uint32_t*>(dst.ptr), n};
}

}  // namespace

TEST_CASE("decode: every group size and page size, NHD and HND, bf16 D=128 causal") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  int n = 0;
  for (int group : {1, 4, 5, 7, 8, 16})
    for (int page : {1, 16, 24, 64, 256}) {
      spec s;
      s.hkv = 2;
      s.hq = 2 * group;
      s.page_size = page;
      s.layout = (n++ % 2) ? kv_layout::hnd : kv_layout::nhd;
      s.kv_lens = random_lens(rng, 3, 9, 700);
      s.q_lens = random_lens(rng, 3, 1, 8);
      s.kv_lens[0] = 1 + int(rng() % 8);  // a very short sequence
      for (int b = 0; b < 3; ++b) s.q_lens[b] = std::min(s.q_lens[b], s.kv_lens[b]);
      INFO("group " << group << " page " << page << " layout " << (s.layout == kv_layout::nhd ? "NHD" : "HND") << " kv "
                    << s.kv_lens[0] << "," << s.kv_lens[1] << "," << s.kv_lens[2] << " q " << s.q_lens[0] << ","
                    << s.q_lens[1] << "," << s.q_lens[2]);
      run_and_check<bfloat16, 128, causal_mask>(s, {}, rng());
    }
}

TEST_CASE("decode: the planner picks the TMA kernel where the device runs sm_90a code") {
  spec s;
  s.kv_lens = {100, 2000};
  s.q_lens = {1, 2};
  std::mt19937_64 rng(1);
  const problem<bfloat16, 128> pr(s, rng);
  const auto kind = pr.plan<causal_mask>({}, limits()).shape.kind;
  CHECK((kind == kc::paged_kernel_kind::decode_sm90) == limits().wgmma);
  spec s1 = s;
  s1.page_size = 4;  // boxes of 4 rows: below the swizzle's 8, so the cp.async kernel
  const problem<bfloat16, 128> pr1(s1, rng);
  CHECK(pr1.plan<causal_mask>({}, limits()).shape.kind == kc::paged_kernel_kind::decode);
}

TEST_CASE("decode: split-KV equals unsplit on long sequences") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (int group : {4, 7}) {
    spec s;
    s.hkv = 2;
    s.hq = 2 * group;
    s.page_size = 16;
    s.kv_lens = {4999, 3001};
    s.q_lens = {1, 3};
    INFO("group " << group);
    run_and_check<bfloat16, 128, causal_mask>(s, {}, rng(), /*compare_unsplit=*/true);
  }
}

TEST_CASE("decode: few CTAs, each running many items across requests and heads, cut mid-sequence") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (int ctas : {1, 3, 7}) {
    spec s;
    s.hkv = 3;
    s.hq = 12;
    s.page_size = ctas == 3 ? 8 : 16;
    s.opt.max_ctas = ctas;  // a small batch: persistent runs, here over 1, 3 or 7 CTAs
    s.kv_lens = random_lens(rng, 5, 1, 1500);
    s.kv_lens[2] = 64;  // exactly one tile
    s.q_lens = random_lens(rng, 5, 1, 4);
    for (int b = 0; b < 5; ++b) s.q_lens[b] = std::min(s.q_lens[b], s.kv_lens[b]);
    INFO(ctas << " CTAs");
    const std::uint64_t seed_causal = rng();
    {
      std::mt19937_64 r(seed_causal);
      const problem<bfloat16, 128> pr(s, r);
      const auto plan = pr.plan<causal_mask>({}, limits());
      if (plan.shape.kind == kc::paged_kernel_kind::decode_sm90) {
        CHECK(!plan.cta_items.empty());
        CHECK(plan.ctas() <= std::size_t(ctas));
      }
    }
    run_and_check<bfloat16, 128, causal_mask>(s, {}, seed_causal, /*compare_unsplit=*/true);
    run_and_check<bfloat16, 128, sliding_window_mask>(s, {200, 5}, rng(), /*compare_unsplit=*/true);
  }
}

TEST_CASE("decode: sliding window with sinks, bf16 D=128") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  struct wcase {
    int window, sinks, page;
  };
  for (const wcase c : {wcase{64, 0, 16}, wcase{100, 4, 24}, wcase{1, 1, 1}, wcase{300, 17, 64}, wcase{7, 0, 256}}) {
    spec s;
    s.hkv = 2;
    s.hq = 10;
    s.page_size = c.page;
    s.layout = c.page % 2 ? kv_layout::hnd : kv_layout::nhd;
    s.kv_lens = {2500, 5, 777};
    s.q_lens = {4, 5, 1};
    INFO("window " << c.window << " sinks " << c.sinks << " page " << c.page);
    run_and_check<bfloat16, 128, sliding_window_mask>(s, {c.window, c.sinks}, rng(), /*compare_unsplit=*/true);
  }
}

TEST_CASE("decode: fp16, head dim 64") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (int group : {1, 5, 8}) {
    spec s;
    s.hkv = 3;
    s.hq = 3 * group;
    s.page_size = 16;
    s.kv_lens = random_lens(rng, 4, 8, 1500);
    s.q_lens = random_lens(rng, 4, 1, 8);
    INFO("group " << group);
    run_and_check<kvtile::half, 64, causal_mask>(s, {}, rng());
  }
}

TEST_CASE("decode: head dim 256 and the padded (vLLM) block table") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  spec s;
  s.hkv = 2;
  s.hq = 8;
  s.page_size = 16;
  s.kv_lens = {1203, 17, 64};
  s.q_lens = {2, 1, 8};
  run_and_check<bfloat16, 256, causal_mask>(s, {}, rng());
  s.padded = true;
  s.page_size = 24;
  s.layout = kv_layout::hnd;
  run_and_check<bfloat16, 256, causal_mask>(s, {}, rng());
}

TEST_CASE("decode: paged K/V gives exactly the result of the same data in dense memory") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  spec s;
  s.hkv = 2;
  s.hq = 8;
  s.page_size = 16;
  s.kv_lens = {1000, 333, 4097};
  s.q_lens = {1, 2, 1};
  s.contiguous = true;  // requests' blocks back to back, in order: [batch, len, heads, dim] memory
  const std::uint64_t data_seed = rng();
  std::mt19937_64 r1(data_seed);
  problem<bfloat16, 128> dense(s, r1);
  spec s2 = s;
  s2.contiguous = false;
  std::mt19937_64 r2(data_seed);
  problem<bfloat16, 128> paged(s2, r2);
  // Same token data, scattered blocks: copy each token of `dense` into its block in `paged`.
  const auto dv = dense.pool_view(dense.k.data(), dense.v.data());
  const auto pv = paged.pool_view(paged.k.data(), paged.v.data());
  paged.q = dense.q;
  for (int b = 0; b < 3; ++b)
    for (int t = 0; t < s.kv_lens[b]; ++t)
      for (int h = 0; h < s.hkv; ++h) {
        const auto src = dv.offset(dense.indices[dense.kv_indptr[b] + t / 16], t % 16, h);
        const auto dst = pv.offset(paged.indices[paged.kv_indptr[b] + t / 16], t % 16, h);
        std::copy_n(dense.k.begin() + src, 128, paged.k.begin() + dst);
        std::copy_n(dense.v.begin() + src, 128, paged.v.begin() + dst);
      }
  // The contiguous pool is exactly a dense [batch-packed tokens, heads, dim] tensor.
  REQUIRE(dv.offset(dense.indices[dense.kv_indptr[1]], 0, 0) == std::int64_t(dense.kv_indptr[1]) * 16 * 2 * 128);
  std::vector<bfloat16> out[2];
  int i = 0;
  for (auto* pr : {&dense, &paged}) {
    device_problem<bfloat16, 128> dp(*pr);
    const auto plan = pr->plan<causal_mask>({}, limits());
    dp.prepare(plan);
    dp.poison();
    dp.run<causal_mask>(plan, {}, default_scale(128));
    KVTILE_CUDA_CHECK(cudaDeviceSynchronize());
    out[i++] = dp.o.download();
    check_against_reference<bfloat16, 128, causal_mask>(*pr, {}, default_scale(128), out[i - 1], dp.lse.download());
  }
  bool same = true;
  for (std::size_t j = 0; j < out[0].size(); ++j) same = same && out[0][j].bits == out[1][j].bits;
  CHECK(same);
}

TEST_CASE("decode: a captured CUDA graph replays with new queries") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  spec s;
  s.hkv = 2;
  s.hq = 8;
  s.page_size = 16;
  s.kv_lens = {3000, 45, 1999, 8};
  s.q_lens = {1, 1, 4, 8};
  problem<bfloat16, 128> pr(s, rng);
  device_problem<bfloat16, 128> dp(pr);
  const auto plan = pr.plan<causal_mask>({}, limits());
  REQUIRE(plan.num_partials > 0);  // the graph holds the split and the merge launches
  cudaStream_t stream;
  KVTILE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  dp.prepare(plan, stream);
  KVTILE_CUDA_CHECK(cudaStreamSynchronize(stream));
  cudaGraph_t graph;
  KVTILE_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  dp.run<causal_mask>(plan, {}, default_scale(128), stream);
  KVTILE_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  cudaGraphExec_t exec;
  KVTILE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  for (int replay = 0; replay < 3; ++replay) {
    pr.q = kvtile_test::random_vector<bfloat16>(pr.q.size(), rng);
    dp.q.upload(pr.q);
    dp.poison();
    KVTILE_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    KVTILE_CUDA_CHECK(cudaStreamSynchronize(stream));
    INFO("replay " << replay);
    check_against_reference<bfloat16, 128, causal_mask>(pr, {}, default_scale(128), dp.o.download(), dp.lse.download());
  }
  KVTILE_CUDA_CHECK(cudaGraphExecDestroy(exec));
  KVTILE_CUDA_CHECK(cudaGraphDestroy(graph));
  KVTILE_CUDA_CHECK(cudaStreamDestroy(stream));
}

TEST_CASE("decode: a run launched early waits for the kernel before it (queries, page table, outputs)") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (int batch : {2, 6}) {  // persistent runs: cut and merged; not cut (split_kv off)
    spec s;
    s.hkv = 8;
    s.hq = 32;
    s.kv_lens = batch == 2 ? std::vector<std::int32_t>{3000, 45} : random_lens(rng, batch, 150, 900);
    s.q_lens = random_lens(rng, batch, 1, 2);
    s.opt.split_kv = batch == 2;
    const problem<bfloat16, 128> pr(s, rng);
    const auto plan = pr.plan<causal_mask>({}, limits());
    INFO("batch " << batch << ", kernel " << kc::to_string(plan.shape.kind) << ", CTAs " << plan.ctas() << ", partials "
                  << plan.num_partials);
    CHECK(plan.early_launch == (plan.shape.kind == kc::paged_kernel_kind::decode_sm90 && !plan.cta_items.empty()));
    device_problem<bfloat16, 128> dp(pr);
    dp.prepare(plan);
    // What the run finds before the writer is done: other queries, the page ids in reverse.
    dp.q.upload(kvtile_test::random_vector<bfloat16>(pr.q.size(), rng));
    dp.indices.upload(std::vector<std::int32_t>(pr.indices.rbegin(), pr.indices.rend()));
    const device_buffer<bfloat16> fresh_q(pr.q);
    const device_buffer<std::int32_t> fresh_indices(pr.indices);
    cudaStream_t stream;
    KVTILE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    dp.run<causal_mask>(plan, {}, default_scale(128), stream);  // on the stale data
    late_writer<<<1, 256, 0, stream>>>(words(&fresh_q, dp.q), words(&fresh_indices, dp.indices),
                                        words<bfloat16>(nullptr, dp.o), words<float>(nullptr, dp.lse), 200'000);
    KVTILE_CUDA_CHECK(cudaGetLastError());
    dp.run<causal_mask>(plan, {}, default_scale(128), stream);
    KVTILE_CUDA_CHECK(cudaStreamSynchronize(stream));
    check_against_reference<bfloat16, 128, causal_mask>(pr, {}, default_scale(128), dp.o.download(), dp.lse.download());
    KVTILE_CUDA_CHECK(cudaStreamDestroy(stream));
  }
}

TEST_CASE("decode: argument checks name the offending value") {
  std::mt19937_64 rng(kvtile_test::fresh_seed());
  spec s;
  s.hkv = 2;
  s.hq = 8;
  s.kv_lens = {100, 20};
  s.q_lens = {1, 9};
  problem<bfloat16, 128> pr(s, rng);
  const auto table = pr.csr(pr.kv_indptr.data(), pr.indices.data(), pr.last_page_len.data());
  CHECK_THROWS_WITH_AS(kc::plan_decode<causal_mask>(pr.q_indptr.data(), table, pr.kernel_problem(), {}, limits()),
                       doctest::Contains("9 query tokens"), kvtile::error);
  // A plan for 8 query heads cannot run tensors with 4.
  s.q_lens = {1, 2};
  problem<bfloat16, 128> pr2(s, rng);
  device_problem<bfloat16, 128> dp(pr2);
  const auto plan = pr2.plan<causal_mask>({}, limits());
  dp.prepare(plan);
  auto ql = ragged_layout::varlen(dp.q_indptr.ptr, pr2.batch, 4, 128);
  const auto t = pr2.csr(dp.kv_indptr.ptr, dp.indices.ptr, dp.last_page_len.ptr);
  paging::paged_kv<bfloat16, paging::csr_page_table> kv{pr2.pool_view(dp.k.ptr, dp.v.ptr), t};
  CHECK_THROWS_WITH_AS((kc::run_decode<causal_mask, 128>(plan, dp.ws->ptr, dense_tensor<bfloat16>{dp.q.ptr, ql}, kv,
                                                          dense_tensor<bfloat16>{dp.o.ptr, ql}, nullptr, {}, 0.1f)),
                       doctest::Contains("q has 4 heads"), kvtile::error);
}
