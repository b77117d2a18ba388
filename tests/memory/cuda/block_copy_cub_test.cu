// GPU tests of memory/cuda/block_copy_cub.cuh: cub::DeviceMemcpy::Batched copies equal the host
// copies byte for byte (only filled slots, every layer, K and V, NHD and HND), and bad
// workspaces are refused before anything runs.
#include <doctest/doctest.h>

#include <cstring>
#include <random>
#include <vector>

#include "kvtile/core/cuda_check.cuh"
#include "kvtile/memory/block_allocator.hpp"
#include "kvtile/memory/block_storage.hpp"
#include "kvtile/memory/cuda/block_copy_cub.cuh"
#include "kvtile/memory/cuda/device_memory.cuh"
#include "support/test_util.hpp"

// No using-directive for kvtile::memory at global scope: nvcc's generated stubs for CUB's kernels
// name ::cuda::std unqualified, which kvtile::memory::cuda would make ambiguous.
using kvtile::bfloat16;
using kvtile::kv_layout;
using kvtile::memory::block_copy;
using kvtile::memory::block_id;
using kvtile::memory::block_storage;
using kvtile::memory::kv_shape;
namespace memory = kvtile::memory;

namespace {

template <class T>
std::vector<T> download(const T* d, std::size_t n) {
  std::vector<T> h(n);
  KVTILE_CUDA_CHECK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

template <class T>
void check_cub_copies(kv_shape shape, kv_layout layout, std::mt19937_64& rng) {
  INFO("layers " << shape.num_layers << " blocks " << shape.num_blocks << " page " << shape.page_size << " heads "
                 << shape.num_kv_heads << " D " << shape.head_dim << " layout " << int(layout));
  block_storage<T> host(shape, layout);
  block_storage<T, memory::cuda::device_memory> dev(shape, layout);
  const std::size_t n = host.bytes_per_pool() / sizeof(T);
  const auto k0 = kvtile_test::random_vector<T>(n, rng), v0 = kvtile_test::random_vector<T>(n, rng);
  std::memcpy(host.k_data(), k0.data(), n * sizeof(T));
  std::memcpy(host.v_data(), v0.data(), n * sizeof(T));
  KVTILE_CUDA_CHECK(cudaMemcpy(dev.k_data(), k0.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  KVTILE_CUDA_CHECK(cudaMemcpy(dev.v_data(), v0.data(), n * sizeof(T), cudaMemcpyHostToDevice));

  std::vector<block_id> ids(std::size_t(shape.num_blocks));
  for (std::size_t i = 0; i < ids.size(); ++i) ids[i] = block_id(i);
  std::shuffle(ids.begin(), ids.end(), rng);
  std::vector<block_copy> copies;
  for (std::size_t i = 0; i + 1 < ids.size(); i += 2) {
    const auto tokens = (i / 2) % 3 == 0 ? shape.page_size : 1 + std::int32_t(rng() % std::uint64_t(shape.page_size));
    copies.push_back({ids[i], ids[i + 1], tokens});
  }
  memory::copy_blocks_host(host.pools(), copies);

  block_copy* d_copies = nullptr;
  KVTILE_CUDA_CHECK(cudaMalloc(&d_copies, copies.size() * sizeof(block_copy)));
  KVTILE_CUDA_CHECK(cudaMemcpy(d_copies, copies.data(), copies.size() * sizeof(block_copy), cudaMemcpyHostToDevice));
  const auto n_copies = std::int32_t(copies.size());
  const std::size_t bytes = memory::cuda::copy_blocks_cub_workspace(dev.pools(), n_copies);
  void* ws = nullptr;
  KVTILE_CUDA_CHECK(cudaMalloc(&ws, bytes));
  memory::cuda::copy_blocks_device_cub(dev.pools(), d_copies, n_copies, ws, bytes);
  KVTILE_CUDA_CHECK(cudaDeviceSynchronize());
  const auto k1 = download(dev.k_data(), n), v1 = download(dev.v_data(), n);
  CHECK(std::memcmp(k1.data(), host.k_data(), n * sizeof(T)) == 0);
  CHECK(std::memcmp(v1.data(), host.v_data(), n * sizeof(T)) == 0);

  // A workspace too small is an error naming the sizes, and copies nothing.
  if (bytes > 0) {
    CHECK_THROWS_WITH_AS(memory::cuda::copy_blocks_device_cub(dev.pools(), d_copies, n_copies, ws, bytes - 1),
                         doctest::Contains("copy_blocks_cub_workspace"), kvtile::error);
  }
  cudaFree(ws);
  cudaFree(d_copies);
}

}  // namespace

TEST_CASE("cub::DeviceMemcpy::Batched block copies equal host block copies") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (kv_layout layout : {kv_layout::nhd, kv_layout::hnd}) {
    check_cub_copies<bfloat16>({32, 40, 16, 8, 128}, layout, rng);  // Llama-3-8B block shape
    check_cub_copies<kvtile::half>({3, 17, 5, 3, 64}, layout, rng);
    check_cub_copies<kvtile::half>({2, 9, 7, 3, 3}, layout, rng);  // odd head_dim: unaligned runs
    check_cub_copies<float>({1, 6, 1, 1, 5}, layout, rng);
  }
}

TEST_CASE("zero copies launch nothing and need no workspace") {
  block_storage<bfloat16, memory::cuda::device_memory> dev(kv_shape{2, 4, 16, 2, 64}, kv_layout::nhd);
  CHECK_NOTHROW(memory::cuda::copy_blocks_device_cub(dev.pools(), nullptr, 0, nullptr, 0));
  CHECK_THROWS_AS(memory::cuda::copy_blocks_device_cub(dev.pools(), nullptr, -1, nullptr, 0), kvtile::error);
}
