// Paged decode and append (chunked prefill) attention on the GPU.
//
// suite "decode": q_len = 1, GQA 32 query / 8 KV heads, D = 128, bf16, page 16, scattered
// pages; effective bandwidth in decimal TB/s counting every K/V byte read plus queries,
// outputs and page indices. Also page sizes 1, 64, 256 at one shape.
// suite "append": a 512-token chunk over a 4k / 16k cached prefix (bottom-right causal),
// TFLOP/s counting 4 * D * visible (query, key) pairs per query head.
// Small problems rotate over several copies of their K/V so repeated runs do not hit in L2.
// fp8 rows ("_fp8", "_fp8_head"): the same decode shapes over e4m3 pages with per-token-head or
// per-head scales (on Hopper the TMA decode kernel; "_portable_fp8": the cp.async one); bytes
// counted as read (one byte per element, plus the per-token scales).
// Every decode row also reports tokens/s (query tokens decoded per second).
// Peers: bench/peers/decode.py and bench/peers/append.py (PyTorch SDPA on dense K/V).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kvtile/attention/cuda/append.cuh"
#include "kvtile/attention/cuda/decode.cuh"
#include "kvtile/attention/variant.hpp"
#include "kvtile/memory/kv_codec.hpp"

// KVTILE_BENCH_APPEND_SPLIT=0 plans the append rows without split-KV (the merge's share).
#ifndef KVTILE_BENCH_APPEND_SPLIT
#define KVTILE_BENCH_APPEND_SPLIT 1
#endif

namespace {

using namespace kvtile;
using namespace kvtile::attention;
namespace kc = kvtile::attention::cuda;
using T = kvtile::bfloat16;
// The head dim: 128 (the results grid); another build can measure the append and decode rows at
// 64 (-DKVTILE_BENCH_HEAD_DIM=64; the fp8 append rows need 128).
#ifndef KVTILE_BENCH_HEAD_DIM
#define KVTILE_BENCH_HEAD_DIM 128
#endif
constexpr int D = KVTILE_BENCH_HEAD_DIM, HQ = 32, HKV = 8;

__global__ void fill_random(T* p, std::int64_t n, std::uint64_t seed) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n; i += std::int64_t(gridDim.x) * blockDim.x) {
    std::uint64_t x = (std::uint64_t(i) + seed) * 0x9E3779B97F4A7C15ull;
    x ^= x >> 31;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 29;
    p[i] = T(float(x >> 40) * (2.f / 16777216.f) - 1.f);
  }
}

// Bytes of an fp8 pool: e4m3 codes of magnitude 0.5 .. 1.875 (no NaN); as floats (the scales
// of a per-token pool) the same bytes read as small positive numbers.
__global__ void fill_fp8(unsigned char* p, std::int64_t n, std::uint64_t seed) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n; i += std::int64_t(gridDim.x) * blockDim.x) {
    std::uint64_t x = (std::uint64_t(i) + seed) * 0x9E3779B97F4A7C15ull;
    x ^= x >> 31;
    p[i] = static_cast<unsigned char>(0x30u + ((x >> 20) & 0x0fu));
  }
}

template <class U>
U* dalloc(std::size_t n) {
  U* p = nullptr;
  KVTILE_CUDA_CHECK(cudaMalloc(&p, std::max<std::size_t>(n, 1) * sizeof(U)));
  return p;
}
template <class U>
U* dcopy(const std::vector<U>& h) {
  U* p = dalloc<U>(h.size());
  KVTILE_CUDA_CHECK(cudaMemcpy(p, h.data(), h.size() * sizeof(U), cudaMemcpyHostToDevice));
  return p;
}

// The variant a row runs: the causal mask alone, or with rotary embeddings applied to Q and K
// in the kernel (half-split, all 128 dims), or with logit soft-capping (cap 30).
enum class variant_kind { none, rotary, softcap };
const char* impl_suffix(variant_kind v) {
  return v == variant_kind::rotary ? "_rotary" : v == variant_kind::softcap ? "_softcap" : "";
}
template <class V>
typename V::params variant_params() {
  typename V::params p{};
  if constexpr (requires { p.cap; }) p.cap = 30.f;
  return p;
}

// K/V storage of a row: bf16 pages, or fp8 pages with per-token-head or per-head scales.
enum class kv_format { bf16, fp8_token, fp8_head };
using fp8_token_codec = kvtile::memory::fp8_e4m3<kvtile::memory::per_token_head>;
using fp8_head_codec = kvtile::memory::fp8_e4m3<kvtile::memory::per_head>;

// One paged problem: `copies` independent sets of scattered pages over one pool.
struct paged_setup {
  int batch, q_len, kv_len, page, copies;
  std::int32_t num_blocks = 0;
  T *k = nullptr, *v = nullptr, *q = nullptr, *o = nullptr;
  float* lse = nullptr;
  std::int32_t *q_indptr = nullptr, *kv_indptr = nullptr, *last = nullptr;
  std::vector<std::int32_t*> indices;
  void* ws = nullptr;
  kc::paged_plan plan;
  double kv_bytes = 0, other_bytes = 0, flops = 0;

  kv_layout layout = kv_layout::nhd;
  variant_kind variant = variant_kind::none;
  kv_format format = kv_format::bf16;
  unsigned char *k8 = nullptr, *v8 = nullptr;  // fp8 pools (bytes)
  float* head_scales = nullptr;                // fp8_head: [HKV] for K, then [HKV] for V

  template <class Codec>
  kvtile::memory::kv_pool_view<e4m3, Codec> fp8_view() const {
    auto p = kvtile::memory::kv_pool_view<e4m3, Codec>::make(reinterpret_cast<e4m3*>(k8), reinterpret_cast<e4m3*>(v8), layout,
                                                             num_blocks, page, HKV, D);
    if constexpr (kvtile::memory::per_head_scales<Codec>) {
      p.k_scale = head_scales;
      p.v_scale = head_scales + HKV;
    }
    return p;
  }

  paged_setup(int b, int ql, int kl, int ps, bool wgmma = true, kv_layout lay = kv_layout::nhd,
              variant_kind var = variant_kind::none, kv_format fmt = kv_format::bf16)
      : batch(b), q_len(ql), kv_len(kl), page(ps), layout(lay), variant(var), format(fmt) {
    const int nb = (kv_len + page - 1) / page;
    // Bytes of K and V read per token and head: 2 per element (bf16), or 1 (fp8) plus the
    // per-token scale.
    const double per_row = format == kv_format::bf16 ? double(D) * sizeof(T)
                                                     : double(D) + (format == kv_format::fp8_token ? sizeof(float) : 0);
    const double one = double(batch) * kv_len * HKV * per_row * 2;
    copies = int(std::clamp(512e6 / one, 1.0, 32.0));
    num_blocks = batch * nb * copies;
    const std::int64_t pool = std::int64_t(num_blocks) * page * HKV * D;
    if (format == kv_format::bf16) {
      k = dalloc<T>(pool);
      v = dalloc<T>(pool);
      fill_random<<<1024, 256>>>(k, pool, 1);
      fill_random<<<1024, 256>>>(v, pool, 2);
    } else {
      const std::int64_t bytes = std::int64_t(num_blocks) * (format == kv_format::fp8_token ? fp8_view<fp8_token_codec>().stride_block
                                                                                           : fp8_view<fp8_head_codec>().stride_block);
      k8 = dalloc<unsigned char>(std::size_t(bytes));
      v8 = dalloc<unsigned char>(std::size_t(bytes));
      fill_fp8<<<1024, 256>>>(k8, bytes, 1);
      fill_fp8<<<1024, 256>>>(v8, bytes, 2);
      head_scales = dcopy(std::vector<float>(2 * HKV, 1.f / 64.f));
    }
    q = dalloc<T>(std::size_t(batch) * q_len * HQ * D);
    o = dalloc<T>(std::size_t(batch) * q_len * HQ * D);
    lse = dalloc<float>(std::size_t(batch) * q_len * HQ);
    fill_random<<<64, 256>>>(q, std::int64_t(batch) * q_len * HQ * D, 3);
    KVTILE_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<std::int32_t> qi(batch + 1), ki(batch + 1), lp(batch, kv_len - (nb - 1) * page);
    for (int i = 0; i <= batch; ++i) qi[i] = i * q_len, ki[i] = i * nb;
    std::vector<std::int32_t> ids(num_blocks);
    std::iota(ids.begin(), ids.end(), 0);
    // KVTILE_BENCH_CONTIGUOUS_PAGES=1: each sequence's pages in order, one run of the pool (what
    // an allocator that hands out runs gives), to price the scattered placement against it.
    const char* contiguous = std::getenv("KVTILE_BENCH_CONTIGUOUS_PAGES");
    if (!contiguous || std::atoi(contiguous) == 0) std::shuffle(ids.begin(), ids.end(), std::mt19937_64(42));
    for (int c = 0; c < copies; ++c)
      indices.push_back(dcopy(std::vector<std::int32_t>(ids.begin() + std::int64_t(c) * batch * nb,
                                                        ids.begin() + std::int64_t(c + 1) * batch * nb)));
    q_indptr = dcopy(qi);
    kv_indptr = dcopy(ki);
    last = dcopy(lp);
    const paging::csr_page_table host{ki.data(), ids.data(), lp.data(), batch};
    const kc::paged_problem pr{HQ, HKV, D, page, num_blocks, format == kv_format::bf16 ? 2 : 1, format == kv_format::fp8_token};
    kc::plan_options opt;
    opt.split_kv = q_len == 1 || KVTILE_BENCH_APPEND_SPLIT;
    opt.use_wgmma = wgmma;
    // KVTILE_BENCH_MAX_SPLITS: cap the planner's split count (to compare split choices).
    if (const char* e = std::getenv("KVTILE_BENCH_MAX_SPLITS")) opt.max_splits = std::atoi(e);
    // KVTILE_BENCH_WS_APPEND=0: the sm_90a append on the cp.async mainloop (the planner's default
    // is the warp-specialised one wherever the pool has TMA tensor maps).
    if (const char* e = std::getenv("KVTILE_BENCH_WS_APPEND")) opt.warp_specialised_append = std::atoi(e) != 0;
    // KVTILE_BENCH_MAX_CTAS: cap the TMA decode kernel's persistent CTAs (small batches).
    if (const char* e = std::getenv("KVTILE_BENCH_MAX_CTAS")) opt.max_ctas = std::atoi(e);
    // KVTILE_BENCH_EARLY_LAUNCH=0: launch the TMA decode grid without programmatic serialisation.
    if (const char* e = std::getenv("KVTILE_BENCH_EARLY_LAUNCH")) opt.early_launch = std::atoi(e) != 0;
    // KVTILE_BENCH_FP8_REGISTERS=0: fp8 rows through shared tiles instead of registers (plan_options::fp8_registers).
    if (const char* e = std::getenv("KVTILE_BENCH_FP8_REGISTERS")) opt.fp8_registers = std::atoi(e) != 0;
    dispatch([&]<class V>() {
      plan = kc::plan_paged_attention<V>(qi.data(), host, pr, variant_params<V>(), kc::query_device_limits(), opt);
    });
    ws = dalloc<unsigned char>(plan.workspace_bytes());
    kc::upload_plan(plan, ws);
    KVTILE_CUDA_CHECK(cudaDeviceSynchronize());
    kv_bytes = one;
    other_bytes = 2.0 * batch * q_len * HQ * D * sizeof(T) + 4.0 * (batch * nb + 2 * batch + 1);
    const double prefix = kv_len - q_len;
    flops = 4.0 * D * HQ * batch * (double(q_len) * prefix + double(q_len) * (q_len + 1) / 2);
  }
  ~paged_setup() {
    cudaFree(k), cudaFree(v), cudaFree(k8), cudaFree(v8), cudaFree(head_scales), cudaFree(q), cudaFree(o), cudaFree(lse), cudaFree(q_indptr), cudaFree(kv_indptr),
        cudaFree(last), cudaFree(ws);
    for (auto* p : indices) cudaFree(p);
  }
  // f.template operator()<V>() with the row's variant type V.
  template <class F>
  void dispatch(F&& f) const {
    switch (variant) {
      case variant_kind::rotary: f.template operator()<rotary<causal_mask>>(); break;
      case variant_kind::softcap: f.template operator()<softcap<causal_mask>>(); break;
      default: f.template operator()<causal_mask>();
    }
  }
  void run(int copy, cudaStream_t s) {
    const auto ql = ragged_layout::varlen(q_indptr, batch, HQ, D);
    const paging::csr_page_table t{kv_indptr, indices[copy], last, batch};
    auto go = [&]<class Codec>(const paging::paged_kv<T, paging::csr_page_table, Codec>& kv) {
      dispatch([&]<class V>() {
        kc::run_paged_attention<V, D>(plan, ws, dense_tensor<T>{q, ql}, kv, dense_tensor<T>{o, ql}, lse, variant_params<V>(),
                                      1.f / std::sqrt(float(D)), s);
      });
    };
    if (format == kv_format::fp8_token)
      go(paging::paged_kv<T, paging::csr_page_table, fp8_token_codec>{fp8_view<fp8_token_codec>(), t});
    else if (format == kv_format::fp8_head)
      go(paging::paged_kv<T, paging::csr_page_table, fp8_head_codec>{fp8_view<fp8_head_codec>(), t});
    else
      go(paging::paged_kv<T, paging::csr_page_table>{paging::kv_pool_view<T>::make(k, v, layout, num_blocks, page, HKV, D), t});
  }
};

// Median-free Google Benchmark loop: each iteration times `reps` runs between CUDA events.
// Counter host_us: the host's time to issue one run (checks and launches).
void time_runs(benchmark::State& st, paged_setup& p, double& seconds) {
  constexpr int reps = 20;
  cudaEvent_t a, b;
  KVTILE_CUDA_CHECK(cudaEventCreate(&a));
  KVTILE_CUDA_CHECK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) p.run(i % p.copies, nullptr);
  int copy = 0;
  seconds = 0;
  double host = 0;
  for (auto _ : st) {
    KVTILE_CUDA_CHECK(cudaEventRecord(a));
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r) p.run(copy++ % p.copies, nullptr);
    host += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
    KVTILE_CUDA_CHECK(cudaEventRecord(b));
    KVTILE_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    KVTILE_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    const double s = ms * 1e-3 / reps;
    st.SetIterationTime(s);
    seconds += s;
  }
  st.counters["host_us"] = st.iterations() ? host / double(st.iterations()) * 1e6 : 0.0;
  KVTILE_CUDA_CHECK(cudaEventDestroy(a));
  KVTILE_CUDA_CHECK(cudaEventDestroy(b));
}

// The same `reps` runs captured once in a CUDA graph and replayed: the GPU's time without the
// host's per-run launch cost (how a serving loop that replays a captured step sees it).
void time_graph(benchmark::State& st, paged_setup& p, double& seconds) {
  constexpr int reps = 20;
  cudaStream_t s;
  KVTILE_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  for (int i = 0; i < 3; ++i) p.run(i % p.copies, s);  // first calls outside the capture
  cudaGraph_t g;
  cudaGraphExec_t ge;
  KVTILE_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  for (int r = 0; r < reps; ++r) p.run(r % p.copies, s);
  KVTILE_CUDA_CHECK(cudaStreamEndCapture(s, &g));
  KVTILE_CUDA_CHECK(cudaGraphInstantiate(&ge, g, 0));
  KVTILE_CUDA_CHECK(cudaGraphLaunch(ge, s));
  cudaEvent_t a, b;
  KVTILE_CUDA_CHECK(cudaEventCreate(&a));
  KVTILE_CUDA_CHECK(cudaEventCreate(&b));
  seconds = 0;
  for (auto _ : st) {
    KVTILE_CUDA_CHECK(cudaEventRecord(a, s));
    KVTILE_CUDA_CHECK(cudaGraphLaunch(ge, s));
    KVTILE_CUDA_CHECK(cudaEventRecord(b, s));
    KVTILE_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    KVTILE_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    st.SetIterationTime(ms * 1e-3 / reps);
    seconds += ms * 1e-3 / reps;
  }
  KVTILE_CUDA_CHECK(cudaEventDestroy(a));
  KVTILE_CUDA_CHECK(cudaEventDestroy(b));
  KVTILE_CUDA_CHECK(cudaGraphExecDestroy(ge));
  KVTILE_CUDA_CHECK(cudaGraphDestroy(g));
  KVTILE_CUDA_CHECK(cudaStreamDestroy(s));
}

// graph: replayed from a CUDA graph (impl "kvtile_graph"); hnd: K/V pool in HND layout;
// portable: the cp.async (sm_80) decode kernel also where the sm_90a TMA one runs (impl
// "kvtile_portable").
const char* format_suffix(kv_format f) {
  return f == kv_format::fp8_token ? "_fp8" : f == kv_format::fp8_head ? "_fp8_head" : "";
}

void bm_decode_format(benchmark::State& st, int batch, int len, int page, bool graph, bool hnd, bool portable,
                      variant_kind var, kv_format fmt) {
  paged_setup p(batch, 1, len, page, !portable, hnd ? kv_layout::hnd : kv_layout::nhd, var, fmt);
  double seconds = 0;
  if (graph)
    time_graph(st, p, seconds);
  else
    time_runs(st, p, seconds);
  const double tbps = (p.kv_bytes + p.other_bytes) * double(st.iterations()) / seconds / 1e12;
  char shape[128];
  std::snprintf(shape, sizeof shape, "b=%d l=%d hq=32 hkv=8 d=%d page=%d%s", batch, len, D, page, hnd ? " hnd" : "");
  st.SetLabel(std::string("suite=decode;shape=") + shape + ";impl=" +
              (graph ? "kvtile_graph" : portable ? "kvtile_portable" : "kvtile") + impl_suffix(var) + format_suffix(fmt) +
              ";unit=TB/s");
  st.counters["value"] = tbps;
  st.counters["tokens_per_s"] = double(batch) * double(st.iterations()) / seconds;
  st.counters["splits"] = p.plan.num_partials ? double(p.plan.num_partials) / p.plan.merges.size() : 1.0;
  st.counters["ctas"] = double(p.plan.ctas());
}
void bm_decode(benchmark::State& st, int batch, int len, int page, bool graph, bool hnd, bool portable, variant_kind var) {
  bm_decode_format(st, batch, len, page, graph, hnd, portable, var, kv_format::bf16);
}

// wgmma = false: the portable (mma.sync) append kernel, also on a device with the sm_90a one.
// var: the variant (rotary rows: on the sm_90a path the warp-specialised append kernel, whose
// producer warps rotate K tiles in shared memory, compare with the plain row; on the portable
// path the mma.sync kernel, which rotates Q and K tiles in shared memory, compare with the
// _portable row of the same shape). fmt: fp8 pages (on the sm_90a path the warp-specialised
// append kernel, whose producer warps convert each K and V tile in shared memory; on the
// portable path the mma.sync kernel, which converts them with every thread); compare with the
// bf16 rows of the same path.
// KVTILE_BENCH_APPEND_PAGE: another page size for the append rows (16 by default; the shape
// string names it).
void bm_append(benchmark::State& st, int prefix, int chunk, bool wgmma, variant_kind var, kv_format fmt) {
  const char* e = std::getenv("KVTILE_BENCH_APPEND_PAGE");
  const int page = e ? std::atoi(e) : 16;
  paged_setup p(1, chunk, prefix + chunk, page, wgmma, kv_layout::nhd, var, fmt);
  double seconds = 0;
  time_runs(st, p, seconds);
  char shape[128];
  std::snprintf(shape, sizeof shape, "prefix=%d chunk=%d b=1 hq=32 hkv=8 d=%d page=%d", prefix, chunk, D, page);
  st.SetLabel(std::string("suite=append;shape=") + shape + ";impl=" + (wgmma ? "kvtile" : "kvtile_portable") +
              impl_suffix(var) + format_suffix(fmt) + ";unit=TFLOP/s");
  st.counters["value"] = p.flops * double(st.iterations()) / seconds / 1e12;
  st.counters["ctas"] = double(p.plan.ctas());
  st.counters["splits"] = p.plan.num_partials ? double(p.plan.num_partials) / p.plan.merges.size() : 1.0;
}

const int registered = [] {
  const int grid[][2] = {{1, 4096}, {1, 32768}, {16, 4096}, {64, 2048}, {64, 8192}, {128, 4096}, {32, 32768}};
  for (const auto& g : grid)
    benchmark::RegisterBenchmark(("decode/b" + std::to_string(g[0]) + "_l" + std::to_string(g[1]) + "_page16").c_str(),
                                 bm_decode, g[0], g[1], 16, false, false, false, variant_kind::none)
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
  for (int page : {1, 64, 256})
    benchmark::RegisterBenchmark(("decode/b16_l4096_page" + std::to_string(page)).c_str(), bm_decode, 16, 4096, page,
                                 false, false, false, variant_kind::none)
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
  // The GPU's own time (graph replay) at the small shapes, where the host's launch cost shows.
  for (const auto& g : {std::array<int, 2>{1, 4096}, std::array<int, 2>{1, 32768}, std::array<int, 2>{16, 4096}})
    benchmark::RegisterBenchmark(("decode/b" + std::to_string(g[0]) + "_l" + std::to_string(g[1]) + "_page16_graph").c_str(),
                                 bm_decode, g[0], g[1], 16, true, false, false, variant_kind::none)
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
  // HND pools (each page of a head contiguous) at the large shapes.
  for (const auto& g : {std::array<int, 2>{16, 4096}, std::array<int, 2>{128, 4096}, std::array<int, 2>{32, 32768}})
    benchmark::RegisterBenchmark(("decode/b" + std::to_string(g[0]) + "_l" + std::to_string(g[1]) + "_page16_hnd").c_str(),
                                 bm_decode, g[0], g[1], 16, false, true, false, variant_kind::none)
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
  // The cp.async kernel on the same grid (what sm_80 runs, and page sizes without a TMA box).
  for (const auto& g : grid)
    benchmark::RegisterBenchmark(("decode/b" + std::to_string(g[0]) + "_l" + std::to_string(g[1]) + "_page16_portable").c_str(),
                                 bm_decode, g[0], g[1], 16, false, false, true, variant_kind::none)
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
  // Variants at a few shapes, on both decode kernels: rotary embeddings applied to Q and K in
  // the kernel, and logit soft-capping, beside the plain causal rows above.
  for (variant_kind var : {variant_kind::rotary, variant_kind::softcap})
    for (bool portable : {false, true})
      for (const auto& g : {std::array<int, 2>{1, 32768}, std::array<int, 2>{16, 4096}, std::array<int, 2>{64, 8192},
                            std::array<int, 2>{128, 4096}})
        benchmark::RegisterBenchmark(("decode/b" + std::to_string(g[0]) + "_l" + std::to_string(g[1]) + "_page16" +
                                      (portable ? "_portable" : "") + impl_suffix(var))
                                         .c_str(),
                                     bm_decode, g[0], g[1], 16, false, false, portable, var)
            ->UseManualTime()
            ->Unit(benchmark::kMicrosecond);
  // fp8 pages on the main grid, per-token-head and per-head scales (the cp.async kernel too, with
  // per-token scales), and HND at one shape; compare with the bf16 rows of the same shape (same
  // counters, bytes as read).
  for (kv_format fmt : {kv_format::fp8_token, kv_format::fp8_head})
    for (bool portable : {false, true})
      for (const auto& g : grid) {
        if (portable && fmt != kv_format::fp8_token) continue;
        benchmark::RegisterBenchmark(("decode/b" + std::to_string(g[0]) + "_l" + std::to_string(g[1]) + "_page16" +
                                      (portable ? "_portable" : "") + format_suffix(fmt))
                                         .c_str(),
                                     bm_decode_format, g[0], g[1], 16, false, false, portable, variant_kind::none, fmt)
            ->UseManualTime()
            ->Unit(benchmark::kMicrosecond);
      }
  benchmark::RegisterBenchmark("decode/b16_l4096_page16_hnd_fp8", bm_decode_format, 16, 4096, 16, false, true, false,
                               variant_kind::none, kv_format::fp8_token)
      ->UseManualTime()
      ->Unit(benchmark::kMicrosecond);
  for (bool wgmma : {true, false})
    for (int prefix : {4096, 16384})
      benchmark::RegisterBenchmark(
          ("append/prefix" + std::to_string(prefix) + "_chunk512" + (wgmma ? "" : "_portable")).c_str(), bm_append, prefix,
          512, wgmma, variant_kind::none, kv_format::bf16)
          ->UseManualTime()
          ->Unit(benchmark::kMicrosecond);
  for (bool wgmma : {true, false})
    for (int prefix : {4096, 16384})
      benchmark::RegisterBenchmark(
          ("append/prefix" + std::to_string(prefix) + "_chunk512" + (wgmma ? "" : "_portable") + "_rotary").c_str(),
          bm_append, prefix, 512, wgmma, variant_kind::rotary, kv_format::bf16)
          ->UseManualTime()
          ->Unit(benchmark::kMicrosecond);
  // fp8 pages beside the bf16 rows above (both paths; per-head scales on the sm_90a one); and a
  // short chunk (64 tokens over 16k), where the pages' bytes weigh more than the tensor work.
  for (kv_format fmt : {kv_format::fp8_token, kv_format::fp8_head})
    for (bool wgmma : {true, false})
      for (int prefix : {4096, 16384}) {
        if (fmt != kv_format::fp8_token && !wgmma) continue;
        benchmark::RegisterBenchmark(
            ("append/prefix" + std::to_string(prefix) + "_chunk512" + (wgmma ? "" : "_portable") + format_suffix(fmt)).c_str(),
            bm_append, prefix, 512, wgmma, variant_kind::none, fmt)
            ->UseManualTime()
            ->Unit(benchmark::kMicrosecond);
      }
  for (kv_format fmt : {kv_format::bf16, kv_format::fp8_token})
    for (bool wgmma : {true, false}) {
      benchmark::RegisterBenchmark(
          (std::string("append/prefix16384_chunk64") + (wgmma ? "" : "_portable") + format_suffix(fmt)).c_str(), bm_append,
          16384, 64, wgmma, variant_kind::none, fmt)
          ->UseManualTime()
          ->Unit(benchmark::kMicrosecond);
    }
  return 0;
}();

}  // namespace

BENCHMARK_MAIN();
