// GPU block-copy bandwidth: a batch of copy-on-write block copies at the Llama-3-8B shape
// (32 layers, 8 KV heads, head_dim 128, 16-token blocks, bf16; one block = 32 KiB per layer
// and pool), 1, 8 and 256 (src, dst) pairs of full blocks, NHD.
// Bytes counted: every copied byte read once and written once (decimal TB/s).
// impl=kvtile is memory::cuda::copy_blocks_device; impl=scalar_baseline is a per-element kernel
// in the style of vLLM's copy_blocks (one CTA per (layer, pair), one element per thread step);
// impl=kvtile_cub is memory::cuda::copy_blocks_device_cub (cub::DeviceMemcpy::Batched over the
// same descriptors), the candidate to replace the hand-written kernel if it is faster.
// Each timed launch uses pairs not touched by the previous few launches, so small batches are
// not served from the 50 MB L2.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>
#include <cuda_runtime.h>

#include "kvtile/core/cuda_check.cuh"
#include "kvtile/core/numeric.hpp"
#include "kvtile/memory/block_allocator.hpp"
#include "kvtile/memory/block_storage.hpp"
#include "kvtile/memory/cuda/block_copy.cuh"
#include "kvtile/memory/cuda/block_copy_cub.cuh"
#include "kvtile/memory/cuda/device_memory.cuh"

// No using-directive for kvtile::memory at global scope: nvcc's generated stubs for CUB's kernels
// name ::cuda::std unqualified, which kvtile::memory::cuda would make ambiguous.
using kvtile::bfloat16;
using kvtile::kv_layout;
using kvtile::memory::block_copy;
using kvtile::memory::block_id;
using kvtile::memory::block_storage;
using kvtile::memory::kv_shape;
namespace memory = kvtile::memory;

// Baseline: per-element copy, each CTA one (layer, pair), K then V, like vLLM's copy_blocks.
template <class T>
KVTILE_KERNEL void scalar_copy_kernel(T* k, T* v, std::int64_t layer_elems, std::int64_t block_elems,
                                      const block_copy* copies) {
  const int layer = blockIdx.x;
  const block_copy c = copies[blockIdx.y];
  T* kl = k + layer * layer_elems;
  T* vl = v + layer * layer_elems;
  for (std::int64_t i = threadIdx.x; i < block_elems; i += blockDim.x) {
    kl[c.dst * block_elems + i] = kl[c.src * block_elems + i];
    vl[c.dst * block_elems + i] = vl[c.src * block_elems + i];
  }
}

namespace {
constexpr kv_shape kShape{32, 2048, 16, 8, 128};  // 2048 blocks: 4 GiB of K + V

struct fixture {
  block_storage<bfloat16, memory::cuda::device_memory> pools{kShape, kv_layout::nhd};
  block_copy* d_copies = nullptr;
  std::int32_t rotations = 0;
  fixture() {}
  ~fixture() { cudaFree(d_copies); }
  // `rotations` disjoint batches of `pairs` copies each, all distinct blocks.
  void make(std::int32_t pairs) {
    rotations = std::max<std::int32_t>(1, std::min<std::int32_t>(kShape.num_blocks / (2 * pairs), 16));
    std::vector<block_id> ids(std::size_t(kShape.num_blocks));
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), std::mt19937_64(7));
    std::vector<block_copy> copies;
    for (std::int32_t i = 0; i < pairs * rotations; ++i) copies.push_back({ids[2 * i], ids[2 * i + 1], kShape.page_size});
    if (d_copies) cudaFree(d_copies);
    KVTILE_CUDA_CHECK(cudaMalloc(&d_copies, copies.size() * sizeof(block_copy)));
    KVTILE_CUDA_CHECK(cudaMemcpy(d_copies, copies.data(), copies.size() * sizeof(block_copy), cudaMemcpyHostToDevice));
  }
};

fixture& the_fixture() {
  static fixture f;
  return f;
}

enum class copier { kvtile, scalar, cub };

void bm_block_copy(benchmark::State& state, copier how) {
  const auto pairs = std::int32_t(state.range(0));
  auto& f = the_fixture();
  f.make(pairs);
  const auto pools = f.pools.pools();
  const std::int64_t block_elems = kShape.block_elems();
  const std::int64_t layer_elems = block_elems * kShape.num_blocks;
  void* cub_ws = nullptr;
  const std::size_t cub_bytes = how == copier::cub ? memory::cuda::copy_blocks_cub_workspace(pools, pairs) : 0;
  if (cub_bytes) KVTILE_CUDA_CHECK(cudaMalloc(&cub_ws, cub_bytes));
  auto launch = [&](std::int32_t r) {
    const block_copy* batch = f.d_copies + std::int64_t(r) * pairs;
    if (how == copier::cub) {
      memory::cuda::copy_blocks_device_cub(pools, batch, pairs, cub_ws, cub_bytes);
    } else if (how == copier::scalar) {
      scalar_copy_kernel<bfloat16><<<dim3(kShape.num_layers, pairs), 1024>>>(f.pools.k_data(), f.pools.v_data(),
                                                                                layer_elems, block_elems, batch);
      KVTILE_CUDA_CHECK_LAUNCH();
    } else {
      memory::cuda::copy_blocks_device(pools, batch, pairs);
    }
  };
  for (int i = 0; i < 3 * f.rotations; ++i) launch(i % f.rotations);  // warm-up
  KVTILE_CUDA_CHECK(cudaDeviceSynchronize());
  cudaEvent_t start, stop;
  KVTILE_CUDA_CHECK(cudaEventCreate(&start));
  KVTILE_CUDA_CHECK(cudaEventCreate(&stop));
  const int reps = pairs >= 64 ? 5 : 50;  // launches per measured iteration
  std::int32_t r = 0;
  double total_s = 0;
  std::int64_t iters = 0;
  for (auto _ : state) {
    KVTILE_CUDA_CHECK(cudaEventRecord(start));
    for (int i = 0; i < reps; ++i) launch(r = (r + 1) % f.rotations);
    KVTILE_CUDA_CHECK(cudaEventRecord(stop));
    KVTILE_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    KVTILE_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    state.SetIterationTime(double(ms) / 1e3 / reps);
    total_s += double(ms) / 1e3 / reps;
    ++iters;
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaFree(cub_ws);
  const double bytes = 2.0 * 2.0 * double(pairs) * kShape.num_layers * double(block_elems) * sizeof(bfloat16);  // (K+V) x (read+write)
  state.counters["bytes"] = bytes;
  state.counters["value"] = iters ? bytes / (total_s / double(iters)) / 1e12 : 0.0;  // TB/s (mean time)
  state.SetLabel("suite=block_copy;shape=pairs=" + std::to_string(pairs) +
                 " layers=32 kv_heads=8 head_dim=128 page=16 dtype=bf16;impl=" +
                 (how == copier::scalar ? "scalar_baseline" : how == copier::cub ? "kvtile_cub" : "kvtile") +
                 ";unit=TB/s");
}
}  // namespace

BENCHMARK_CAPTURE(bm_block_copy, kvtile, copier::kvtile)->Arg(1)->Arg(8)->Arg(256)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(bm_block_copy, kvtile_cub, copier::cub)->Arg(1)->Arg(8)->Arg(256)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(bm_block_copy, scalar_baseline, copier::scalar)->Arg(1)->Arg(8)->Arg(256)->UseManualTime()->Unit(benchmark::kMicrosecond);

BENCHMARK_MAIN();
