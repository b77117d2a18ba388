// kvtile/memory/cuda/block_copy.cuh: one kernel that runs a whole batch of block copies.
//
// Every (copy, layer, K or V) block is cut into chunks; one CTA copies one chunk, in batches of
// kCopyThreads * kCopyUnroll vectors, loading a whole batch before storing any (kCopyUnroll
// 16-byte loads in flight per thread), with streaming cache hints (the data is touched once).
// Only a block's filled slots are copied: for NHD one run of num_tokens * heads * head_dim
// elements, for HND one such run per head. Chunks beyond a partial block's filled part exit.
//
// The chunk size is picked per launch so that the grid fits the GPU in one wave when it can
// (a second, partial wave costs as much as the first for a batch of 8 blocks): at the
// Llama-3-8B shape (32 layers, 8 KV heads, D 128, 16-token blocks, bf16: 32 KiB per block,
// layer and pool) 8 pairs give 1,024 CTAs of 16 KiB on 132 SMs x 8 resident CTAs; 1 pair gives
// 2 KiB chunks; large batches use 16 KiB chunks in several waves. Offsets inside a block are
// 32-bit (a block is far below 2 GiB), offsets to a block 64-bit.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <span>
#include <cuda_runtime.h>

#include "kvtile/core/cuda_check.cuh"
#include "kvtile/memory/block_copy.hpp"
#include "kvtile/memory/cuda/vector_access.cuh"

KVTILE_NAMESPACE_BEGIN
namespace memory::cuda {

inline constexpr int kCopyThreads = 128;
inline constexpr int kCopyUnroll = 8;

template <class Vec>
KVTILE_KERNEL void __launch_bounds__(kCopyThreads, 8)
    copy_blocks_kernel(kv_pool_set pools, const block_copy* __restrict__ copies, std::int32_t chunks_per_block,
                       std::int32_t chunk_vecs) {
  constexpr std::int32_t kBatch = kCopyThreads * kCopyUnroll;
  std::uint32_t item = blockIdx.x;
  const auto chunk = std::int32_t(item % std::uint32_t(chunks_per_block));
  item /= std::uint32_t(chunks_per_block);
  const bool is_v = item & 1u;
  item >>= 1;
  const auto layer = std::int32_t(item % std::uint32_t(pools.num_layers));
  const auto c = copies[item / std::uint32_t(pools.num_layers)];

  const auto seg_vecs = std::int32_t(pools.segment_bytes(c.num_tokens) / std::int64_t(sizeof(Vec)));
  const std::int32_t segs = pools.segments();
  const std::int32_t total = seg_vecs * segs;
  const std::int32_t first = chunk * chunk_vecs;
  if (first >= total) return;
  const std::int32_t end = min(total, first + chunk_vecs);

  std::byte* base = (is_v ? pools.v : pools.k) + std::int64_t(layer) * pools.stride_layer;
  const std::byte* src = base + std::int64_t(c.src) * pools.stride_block;
  std::byte* dst = base + std::int64_t(c.dst) * pools.stride_block;
  const auto seg_stride = std::int32_t(pools.segment_stride());

  auto byte_offset = [&](std::int32_t i) -> std::uint32_t {
    if (segs == 1) return std::uint32_t(i) * std::uint32_t(sizeof(Vec));
    const std::int32_t s = i / seg_vecs;
    return std::uint32_t(s * seg_stride) + std::uint32_t(i - s * seg_vecs) * std::uint32_t(sizeof(Vec));
  };

  for (std::int32_t b = first; b < end; b += kBatch) {
    Vec r[kCopyUnroll];
    KVTILE_PRAGMA_UNROLL
    for (int u = 0; u < kCopyUnroll; ++u) {
      const std::int32_t i = b + u * kCopyThreads + std::int32_t(threadIdx.x);
      if (i < end) r[u] = __ldcs(reinterpret_cast<const Vec*>(src + byte_offset(i)));
    }
    KVTILE_PRAGMA_UNROLL
    for (int u = 0; u < kCopyUnroll; ++u) {
      const std::int32_t i = b + u * kCopyThreads + std::int32_t(threadIdx.x);
      if (i < end) __stcs(reinterpret_cast<Vec*>(dst + byte_offset(i)), r[u]);
    }
  }
}

namespace detail {
// CTAs of copy_blocks_kernel<Vec> resident on the current device at once (cached per device).
template <class Vec>
int resident_copy_ctas() {
  static std::atomic<int> cached[64] = {};
  int dev = 0;
  KVTILE_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 64 && cached[dev].load(std::memory_order_relaxed) > 0) return cached[dev].load(std::memory_order_relaxed);
  int sms = 0, per_sm = 0;
  KVTILE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  KVTILE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, copy_blocks_kernel<Vec>, kCopyThreads, 0));
  const int n = sms * (per_sm > 0 ? per_sm : 1);
  if (dev < 64) cached[dev].store(n, std::memory_order_relaxed);
  return n;
}
}  // namespace detail

// Vector width every address and size of this pool set allows (16 bytes for D*sizeof(T) % 16 == 0).
inline int copy_vector_bytes(const kv_pool_set& p) {
  return detail::common_vector_bytes(reinterpret_cast<std::uintptr_t>(p.k), reinterpret_cast<std::uintptr_t>(p.v),
                                     p.stride_layer, p.stride_block, p.stride_token, p.stride_head, p.head_bytes);
}

// Run `n` copies whose descriptors are already in device memory (d_copies), in one launch.
// The caller guarantees no destination is also a source or another copy's destination (the
// copy-on-write policy does) and that every id and token count is valid (check_block_copies).
inline void copy_blocks_device(const kv_pool_set& pools, const block_copy* d_copies, std::int32_t n,
                               cudaStream_t stream = nullptr) {
  KVTILE_REQUIRE(n >= 0, errc::invalid_argument, "number of block copies must be >= 0, got ", n);
  if (n == 0 || pools.num_layers == 0) return;
  const int vec = copy_vector_bytes(pools);
  const std::int64_t full_vecs = pools.segment_bytes(pools.page_size) * pools.segments() / vec;
  KVTILE_REQUIRE(full_vecs < (std::int64_t(1) << 31), errc::invalid_argument, "a block of ", full_vecs,
                 " vectors is too large for 32-bit in-block offsets");
  const std::int64_t items = std::int64_t(n) * pools.num_layers * 2;
  detail::with_vector(vec, [&]<class Vec>() {
    // Chunk size: fill the resident CTA slots once if possible, between one thread-row of
    // vectors and one full batch per CTA.
    constexpr std::int64_t kBatch = std::int64_t(kCopyThreads) * kCopyUnroll;
    const std::int64_t resident = detail::resident_copy_ctas<Vec>();
    std::int64_t chunk = (items * full_vecs + resident - 1) / resident;
    chunk = (chunk + kCopyThreads - 1) / kCopyThreads * kCopyThreads;
    chunk = std::max<std::int64_t>(kCopyThreads, std::min(chunk, kBatch));
    const std::int64_t chunks = (full_vecs + chunk - 1) / chunk;
    const std::int64_t grid = items * chunks;
    KVTILE_REQUIRE(grid < (std::int64_t(1) << 31), errc::invalid_argument, "block copy grid of ", grid,
                   " CTAs is too large; split the batch");
    copy_blocks_kernel<Vec><<<unsigned(grid), kCopyThreads, 0, stream>>>(pools, d_copies, std::int32_t(chunks),
                                                                         std::int32_t(chunk));
  });
  KVTILE_CUDA_CHECK_LAUNCH();
  if (pools.has_scales()) copy_blocks_device(pools.scales(), d_copies, n, stream);  // the blocks' fp8 scales
}

}  // namespace memory::cuda
KVTILE_NAMESPACE_END
