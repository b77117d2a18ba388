// kvtile/memory/cuda/block_copy_cub.cuh: the batch of block copies of block_copy.cuh, run by
// cub::DeviceMemcpy::Batched instead of kvtile's own kernel (bench/block_copy_bench.cu measures
// the two side by side; copy_blocks_device stays the default until a GPU run says otherwise).
//
// Every (copy, layer, K or V, filled run) is one buffer for CUB: for NHD one run of
// num_tokens * heads * head_dim elements per block, for HND one run per head. The buffers'
// addresses and sizes are computed on the device from the copy descriptors (fancy iterators),
// so nothing goes through the host and a run can be captured in a CUDA graph.
//
//   std::size_t bytes = copy_blocks_cub_workspace(pools, max_copies);   // CUB's temporary storage
//   copy_blocks_device_cub(pools, d_copies, n, workspace, bytes, stream);
//
// A translation unit that includes this header must not have `using namespace kvtile::memory`
// (or any using-directive bringing kvtile's `cuda` namespaces) at global scope: nvcc's
// generated host stubs for CUB's kernels name `cuda::std` unqualified, which then is ambiguous.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include <cub/device/device_memcpy.cuh>
#include <cuda_runtime.h>
#include <thrust/iterator/counting_iterator.h>
#include <thrust/iterator/transform_iterator.h>

#include "kvtile/core/cuda_check.cuh"
#include "kvtile/memory/block_copy.hpp"

KVTILE_NAMESPACE_BEGIN
namespace memory::cuda {

namespace detail {

// Buffer i of a batch: copy i / (layers * 2 * segments), then layer, then K or V, then run.
struct cub_copy_buffer {
  kv_pool_set pools;
  const block_copy* copies;
  bool destination;

  KVTILE_HOST_DEVICE std::byte* operator()(std::int64_t i) const {
    const std::int32_t segs = pools.segments();
    const auto seg = std::int32_t(i % segs);
    i /= segs;
    const bool is_v = i & 1;
    i >>= 1;
    const auto layer = std::int32_t(i % pools.num_layers);
    const block_copy c = copies[i / pools.num_layers];
    return (is_v ? pools.v : pools.k) + std::int64_t(layer) * pools.stride_layer +
           std::int64_t(destination ? c.dst : c.src) * pools.stride_block + std::int64_t(seg) * pools.segment_stride();
  }
};

struct cub_copy_size {
  kv_pool_set pools;
  const block_copy* copies;

  KVTILE_HOST_DEVICE std::size_t operator()(std::int64_t i) const {
    const std::int64_t per_copy = std::int64_t(pools.segments()) * 2 * pools.num_layers;
    return std::size_t(pools.segment_bytes(copies[i / per_copy].num_tokens));
  }
};

inline std::int64_t cub_buffers(const kv_pool_set& pools, std::int32_t n) {
  return std::int64_t(n) * pools.num_layers * 2 * pools.segments();
}

// CUB's call, in its two forms (size query with a null workspace, then the run).
inline cudaError_t cub_batched(const kv_pool_set& pools, const block_copy* d_copies, std::int32_t n, void* workspace,
                               std::size_t& bytes, cudaStream_t stream) {
  const thrust::counting_iterator<std::int64_t> index(0);
  const auto src = thrust::make_transform_iterator(index, cub_copy_buffer{pools, d_copies, false});
  const auto dst = thrust::make_transform_iterator(index, cub_copy_buffer{pools, d_copies, true});
  const auto size = thrust::make_transform_iterator(index, cub_copy_size{pools, d_copies});
  return cub::DeviceMemcpy::Batched(workspace, bytes, src, dst, size, cub_buffers(pools, n), stream);
}

}  // namespace detail

// Bytes of workspace copy_blocks_device_cub needs for batches of up to `max_copies` copies.
inline std::size_t copy_blocks_cub_workspace(const kv_pool_set& pools, std::int32_t max_copies) {
  KVTILE_REQUIRE(max_copies >= 0, errc::invalid_argument, "number of block copies must be >= 0, got ", max_copies);
  std::size_t bytes = 0;
  KVTILE_CUDA_CHECK(detail::cub_batched(pools, nullptr, max_copies, nullptr, bytes, nullptr));
  if (pools.has_scales()) {  // the blocks' fp8 scales: a second batch, after the first, same workspace
    std::size_t scale_bytes = 0;
    KVTILE_CUDA_CHECK(detail::cub_batched(pools.scales(), nullptr, max_copies, nullptr, scale_bytes, nullptr));
    bytes = std::max(bytes, scale_bytes);
  }
  return bytes;
}

// Run `n` copies whose descriptors are in device memory (d_copies) with cub::DeviceMemcpy::Batched.
// The same contract as copy_blocks_device: no destination is a source or another copy's
// destination, every id and token count is valid (check_block_copies).
inline void copy_blocks_device_cub(const kv_pool_set& pools, const block_copy* d_copies, std::int32_t n, void* workspace,
                                   std::size_t workspace_bytes, cudaStream_t stream = nullptr) {
  KVTILE_REQUIRE(n >= 0, errc::invalid_argument, "number of block copies must be >= 0, got ", n);
  if (n == 0 || pools.num_layers == 0) return;
  const std::size_t need = copy_blocks_cub_workspace(pools, n);
  KVTILE_REQUIRE(workspace != nullptr && workspace_bytes >= need, errc::invalid_argument,
                 "copy_blocks_device_cub: the workspace has ", workspace_bytes, " bytes, ", n, " copies need ", need,
                 " (copy_blocks_cub_workspace)");
  std::size_t bytes = workspace_bytes;
  KVTILE_CUDA_CHECK(detail::cub_batched(pools, d_copies, n, workspace, bytes, stream));
  KVTILE_CUDA_CHECK_LAUNCH();
  if (pools.has_scales()) {
    bytes = workspace_bytes;
    KVTILE_CUDA_CHECK(detail::cub_batched(pools.scales(), d_copies, n, workspace, bytes, stream));
    KVTILE_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace memory::cuda
KVTILE_NAMESPACE_END
