// kvtile/bench/cuda_runners.cuh: kvtile_bench runners for the CUDA kernels.
//
//   add_cuda_prefill<T, HeadDim, Mask, Tile>()  cuda::prefill<T, HeadDim, Mask, Tile>::run (on
//       Hopper its sm_90a dispatch decides which kernel runs; the row names it)
//   add_cuda_paged<T, HeadDim, Mask>()          plan_decode / run_decode and plan_append /
//       run_append over scattered pages (the planner picks the kernel; the row names it)
// Time: CUDA events around `reps` runs per Google Benchmark iteration (manual time). Problems
// whose K/V fit in L2 rotate over several copies of their pages, so repeated runs read HBM.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "kvtile/attention/cuda/append.cuh"
#include "kvtile/attention/cuda/decode.cuh"
#include "kvtile/attention/cuda/prefill.cuh"
#include "kvtile/bench/cpu_runners.hpp"
#include "kvtile/core/cuda_check.cuh"

KVTILE_NAMESPACE_BEGIN
namespace bench {

namespace detail {

template <class T>
__global__ void fill_uniform(T* p, std::int64_t n, std::uint64_t seed) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n; i += std::int64_t(gridDim.x) * blockDim.x) {
    std::uint64_t x = (std::uint64_t(i) + seed) * 0x9E3779B97F4A7C15ull;
    x ^= x >> 31;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 29;
    p[i] = T(float(x >> 40) * (2.f / 16777216.f) - 1.f);
  }
}

// Device buffers freed on scope exit.
struct device_buffers {
  std::vector<void*> ptrs;
  template <class U>
  U* alloc(std::size_t n) {
    void* p = nullptr;
    KVTILE_CUDA_CHECK(cudaMalloc(&p, std::max<std::size_t>(n, 1) * sizeof(U)));
    ptrs.push_back(p);
    return static_cast<U*>(p);
  }
  template <class U>
  U* upload(const std::vector<U>& h) {
    U* p = alloc<U>(h.size());
    KVTILE_CUDA_CHECK(cudaMemcpy(p, h.data(), h.size() * sizeof(U), cudaMemcpyHostToDevice));
    return p;
  }
  template <class T>
  T* random(std::int64_t n, std::uint64_t seed) {
    T* p = alloc<T>(std::size_t(n));
    fill_uniform<<<1024, 256>>>(p, n, seed);
    KVTILE_CUDA_CHECK_LAUNCH();
    return p;
  }
  ~device_buffers() {
    for (void* p : ptrs) cudaFree(p);
  }
};

// Copies of a problem's K/V so that their total exceeds the L2 (512 MB on every card we use).
inline int l2_copies(double kv_bytes) { return int(std::clamp(512e6 / std::max(kv_bytes, 1.0), 1.0, 32.0)); }

}  // namespace detail

// Times `run(i)` (i counts runs, for rotating copies) with CUDA events: `reps` runs per
// iteration so that one iteration lasts long enough for the events' resolution.
template <class Run>
void time_cuda(benchmark::State& st, const problem& p, Run&& run) {
  const double per_run = (p.by_bytes() ? p.bytes() / 3e12 : p.flops() / 400e12);  // rough seconds
  const int reps = int(std::clamp(1e-3 / std::max(per_run, 1e-9), 1.0, 50.0));
  for (int i = 0; i < 3; ++i) run(i);  // module load, shared-memory attributes
  KVTILE_CUDA_CHECK(cudaDeviceSynchronize());
  cudaEvent_t a, b;
  KVTILE_CUDA_CHECK(cudaEventCreate(&a));
  KVTILE_CUDA_CHECK(cudaEventCreate(&b));
  double total = 0;
  int k = 0;
  for (auto _ : st) {
    KVTILE_CUDA_CHECK(cudaEventRecord(a));
    for (int r = 0; r < reps; ++r) run(k++);
    KVTILE_CUDA_CHECK(cudaEventRecord(b));
    KVTILE_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    KVTILE_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    st.SetIterationTime(ms * 1e-3 / reps);
    total += ms * 1e-3 / reps;
  }
  KVTILE_CUDA_CHECK(cudaEventDestroy(a));
  KVTILE_CUDA_CHECK(cudaEventDestroy(b));
  set_counters(st, p, st.iterations() ? total / double(st.iterations()) : 0.0, true);
}

namespace detail {

template <class T, int HeadDim, class Mask, class Tile>
void run_cuda_prefill(benchmark::State& st, const problem& p) {
  using kernel = attention::cuda::prefill<T, HeadDim, Mask, Tile>;
  const std::int64_t elems = std::int64_t(p.batch) * p.kv_len * p.qo_heads * HeadDim;
  const std::int64_t kv_elems = std::int64_t(p.batch) * p.kv_len * p.kv_heads * HeadDim;
  device_buffers buf;
  typename kernel::arguments args;
  args.q = {buf.random<T>(elems, 1), attention::ragged_layout::fixed(p.batch, p.kv_len, p.qo_heads, HeadDim)};
  args.kv = {buf.random<T>(kv_elems, 2), buf.random<T>(kv_elems, 3),
             attention::ragged_layout::fixed(p.batch, p.kv_len, p.kv_heads, HeadDim)};
  args.o = {buf.alloc<T>(std::size_t(elems)), args.q.layout};
  args.lse = buf.alloc<float>(std::size_t(p.batch) * p.kv_len * p.qo_heads);
  kernel::check(args);
  // The kernel run() takes on this device, as the dispatch itself reports it.
  kernel_note() = kernel::dispatch(args).kernel;
  time_cuda(st, p, [&](int) { kernel::run(args); });
}

template <class T, int HeadDim, class Mask>
void run_cuda_paged(benchmark::State& st, const problem& p) {
  namespace kc = attention::cuda;
  const int keys = p.keys(), per_seq = (keys + p.page_size - 1) / p.page_size;
  const double kv_bytes = 2.0 * p.batch * keys * p.kv_heads * HeadDim * sizeof(T);
  const int copies = l2_copies(kv_bytes);
  const std::int32_t num_blocks = std::int32_t(std::int64_t(p.batch) * per_seq * copies);
  const std::int64_t pool = std::int64_t(num_blocks) * p.page_size * p.kv_heads * HeadDim;
  device_buffers buf;
  T* k = buf.random<T>(pool, 1);
  T* v = buf.random<T>(pool, 2);
  const std::int64_t qn = std::int64_t(p.batch) * p.q_len * p.qo_heads * HeadDim;
  T* q = buf.random<T>(qn, 3);
  T* o = buf.alloc<T>(std::size_t(qn));
  float* lse = buf.alloc<float>(std::size_t(p.batch) * p.q_len * p.qo_heads);
  std::vector<std::int32_t> qi(p.batch + 1), ki(p.batch + 1), last(p.batch, keys - (per_seq - 1) * p.page_size);
  for (int b = 0; b <= p.batch; ++b) qi[b] = b * p.q_len, ki[b] = b * per_seq;
  std::vector<std::int32_t> ids(num_blocks);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), std::mt19937_64(42));
  std::vector<std::int32_t*> indices;
  for (int c = 0; c < copies; ++c)
    indices.push_back(buf.upload(std::vector<std::int32_t>(ids.begin() + std::int64_t(c) * p.batch * per_seq,
                                                           ids.begin() + std::int64_t(c + 1) * p.batch * per_seq)));
  const std::int32_t *q_indptr = buf.upload(qi), *kv_indptr = buf.upload(ki), *last_d = buf.upload(last);
  const paging::csr_page_table host{ki.data(), ids.data(), last.data(), p.batch};
  const kc::paged_problem pr{p.qo_heads, p.kv_heads, HeadDim, p.page_size, num_blocks, int(sizeof(T))};
  const bool decode = p.kernel == kernel_kind::decode;
  const kc::paged_plan plan = decode ? kc::plan_decode<Mask>(qi.data(), host, pr, {}, kc::query_device_limits())
                                     : kc::plan_append<Mask>(qi.data(), host, pr, {}, kc::query_device_limits());
  void* ws = buf.alloc<unsigned char>(plan.workspace_bytes());
  kc::upload_plan(plan, ws);
  KVTILE_CUDA_CHECK(cudaDeviceSynchronize());
  kernel_note() = plan.kernel();
  const auto ql = attention::ragged_layout::varlen(q_indptr, p.batch, p.qo_heads, HeadDim);
  const float scale = 1.f / std::sqrt(float(HeadDim));
  time_cuda(st, p, [&](int i) {
    const paging::paged_kv<T, paging::csr_page_table> kv{
        paging::kv_pool_view<T>::make(k, v, p.layout, num_blocks, p.page_size, p.kv_heads, HeadDim),
        paging::csr_page_table{kv_indptr, indices[i % copies], last_d, p.batch}};
    if (decode)
      kc::run_decode<Mask, HeadDim>(plan, ws, attention::dense_tensor<T>{q, ql}, kv, attention::dense_tensor<T>{o, ql}, lse,
                                    {}, scale);
    else
      kc::run_append<Mask, HeadDim>(plan, ws, attention::dense_tensor<T>{q, ql}, kv, attention::dense_tensor<T>{o, ql}, lse,
                                    {}, scale);
  });
}

}  // namespace detail

template <class T, int HeadDim, class Mask, class Tile = attention::cuda::default_prefill_tile_t<HeadDim>>
bool add_cuda_prefill() {
  config c;
  c.kernel = kernel_kind::prefill;
  c.device = device_kind::cuda;
  c.dtype = dtype_name<T>();
  c.head_dim = HeadDim;
  c.mask = mask_name<Mask>();
  c.block_q = Tile::block_q;
  c.block_kv = Tile::block_kv;
  c.warps = Tile::warps;
  c.stages = Tile::stages;
  c.default_tile = std::is_same_v<Tile, attention::cuda::default_prefill_tile_t<HeadDim>>;
  return registry::global().add({c, &detail::run_cuda_prefill<T, HeadDim, Mask, Tile>});
}

// Decode and append: one instantiation of the paged kernels serves both (the planner picks the
// kernel shape per problem).
template <class T, int HeadDim, class Mask>
bool add_cuda_paged() {
  for (kernel_kind k : {kernel_kind::decode, kernel_kind::append}) {
    config c;
    c.kernel = k;
    c.device = device_kind::cuda;
    c.dtype = dtype_name<T>();
    c.head_dim = HeadDim;
    c.mask = mask_name<Mask>();
    registry::global().add({c, &detail::run_cuda_paged<T, HeadDim, Mask>});
  }
  return true;
}

}  // namespace bench
KVTILE_NAMESPACE_END
