// kvtile/memory/cuda/device_memory.cuh: the memory policy for K/V pools in CUDA device memory.
//
// Pools come from cudaMalloc; a batch of block copies is uploaded (one cudaMemcpyAsync of the
// descriptors) and run by one copy_blocks_kernel launch; K/V writes run write_kv_kernel.
// Everything is ordered on the policy's stream; nothing here synchronises except zero().
#pragma once

#include <cstddef>
#include <span>
#include <utility>
#include <cuda_runtime.h>

#include "kvtile/core/cuda_check.cuh"
#include "kvtile/memory/block_copy.hpp"
#include "kvtile/memory/cuda/block_copy.cuh"
#include "kvtile/memory/cuda/kv_write.cuh"
#include "kvtile/memory/memory_policy.hpp"

KVTILE_NAMESPACE_BEGIN
namespace memory::cuda {

class device_memory {
 public:
  static constexpr bool is_device = true;

  device_memory() = default;
  explicit device_memory(cudaStream_t stream) : stream_(stream) {}
  device_memory(const device_memory&) = delete;
  device_memory& operator=(const device_memory&) = delete;
  device_memory(device_memory&& o) noexcept
      : stream_(o.stream_), copies_(std::exchange(o.copies_, nullptr)), copies_cap_(std::exchange(o.copies_cap_, 0)) {}
  device_memory& operator=(device_memory&& o) noexcept {
    if (this != &o) {
      if (copies_) cudaFree(copies_);
      stream_ = o.stream_;
      copies_ = std::exchange(o.copies_, nullptr);
      copies_cap_ = std::exchange(o.copies_cap_, 0);
    }
    return *this;
  }
  ~device_memory() {
    if (copies_) cudaFree(copies_);
  }

  cudaStream_t stream() const { return stream_; }

  void* allocate(std::size_t bytes) {
    void* p = nullptr;
    KVTILE_CUDA_CHECK(cudaMalloc(&p, bytes ? bytes : 1));
    return p;
  }
  void deallocate(void* p, std::size_t) noexcept { cudaFree(p); }
  void zero(void* p, std::size_t bytes) {
    KVTILE_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, stream_));
    KVTILE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  // Checked on the host first (ids, token counts); then one upload and one launch.
  void copy_blocks(const kv_pool_set& pools, std::span<const block_copy> copies) {
    check_block_copies(pools, copies);
    if (copies.empty()) return;
    if (copies.size() > copies_cap_) {
      block_copy* grown = nullptr;
      KVTILE_CUDA_CHECK(cudaMalloc(&grown, copies.size() * sizeof(block_copy)));
      if (copies_) cudaFree(copies_);
      copies_ = grown;
      copies_cap_ = copies.size();
    }
    KVTILE_CUDA_CHECK(cudaMemcpyAsync(copies_, copies.data(), copies.size_bytes(), cudaMemcpyHostToDevice, stream_));
    copy_blocks_device(pools, copies_, std::int32_t(copies.size()), stream_);
  }

  template <class T, class S, class Codec>
  void write_kv(const memory::kv_pool_view<S, Codec>& pool, const T* k, const T* v, std::int64_t token_stride,
                const std::int64_t* slots, std::int32_t num_tokens) {
    write_kv_device(pool, k, v, token_stride, slots, num_tokens, stream_);
  }

 private:
  cudaStream_t stream_ = nullptr;
  block_copy* copies_ = nullptr;  // device copy of the last batch's descriptors
  std::size_t copies_cap_ = 0;
};

static_assert(memory_policy<device_memory>, "device_memory must satisfy memory_policy");

}  // namespace memory::cuda
KVTILE_NAMESPACE_END
