// kvtile/memory/cuda/block_copy.cuh: one kernel that runs a whole batch of block copies.
//
// Every (copy, layer, K or V) block is cut into chunks of kChunkVecs 16-byte vectors; one CTA
// copies one chunk, loading all of its vectors before storing any (kUnroll loads in flight per
// thread), with streaming cache hints (the data is touched once). Only a block's filled slots
// are copied: for NHD one run of num_tokens * heads * head_dim elements, for HND one such run
// per head. Chunks beyond a partial block's filled part exit at once.
// At the Llama-3-8B shape (32 layers, 8 KV heads, D 128, 16-token blocks, bf16) a full block is
// 32 KiB per layer and pool: 4 chunks of 8 KiB; 8 pairs give 2,048 CTAs, enough to fill every SM.
#pragma once

#include <cstdint>
#include <span>
#include <cuda_runtime.h>

#include "kvtile/core/cuda_check.cuh"
#include "kvtile/memory/block_copy.hpp"
#include "kvtile/memory/cuda/vector_access.cuh"

KVTILE_NAMESPACE_BEGIN
namespace memory::cuda {

inline constexpr int kCopyThreads = 128;
inline constexpr int kCopyUnroll = 4;

template <class Vec>
KVTILE_KERNEL void __launch_bounds__(kCopyThreads)
    copy_blocks_kernel(kv_pool_set pools, const block_copy* __restrict__ copies, std::int32_t chunks_per_block) {
  constexpr std::int64_t kChunk = std::int64_t(kCopyThreads) * kCopyUnroll;  // vectors per CTA
  std::int64_t item = blockIdx.x;
  const auto chunk = std::int32_t(item % chunks_per_block);
  item /= chunks_per_block;
  const bool is_v = item & 1;
  item >>= 1;
  const auto layer = std::int32_t(item % pools.num_layers);
  const auto c = copies[item / pools.num_layers];

  const std::int64_t seg_vecs = pools.segment_bytes(c.num_tokens) / std::int64_t(sizeof(Vec));
  const std::int32_t segs = pools.segments();
  const std::int64_t total = seg_vecs * segs;
  const std::int64_t first = std::int64_t(chunk) * kChunk;
  if (first >= total) return;

  std::byte* base = (is_v ? pools.v : pools.k) + std::int64_t(layer) * pools.stride_layer;
  const std::byte* src = base + std::int64_t(c.src) * pools.stride_block;
  std::byte* dst = base + std::int64_t(c.dst) * pools.stride_block;
  const std::int64_t seg_stride = pools.segment_stride();

  auto byte_offset = [&](std::int64_t i) {
    if (segs == 1) return i * std::int64_t(sizeof(Vec));
    const std::int64_t s = i / seg_vecs;
    return s * seg_stride + (i - s * seg_vecs) * std::int64_t(sizeof(Vec));
  };

  Vec r[kCopyUnroll];
  KVTILE_PRAGMA_UNROLL
  for (int u = 0; u < kCopyUnroll; ++u) {
    const std::int64_t i = first + u * kCopyThreads + threadIdx.x;
    if (i < total) r[u] = __ldcs(reinterpret_cast<const Vec*>(src + byte_offset(i)));
  }
  KVTILE_PRAGMA_UNROLL
  for (int u = 0; u < kCopyUnroll; ++u) {
    const std::int64_t i = first + u * kCopyThreads + threadIdx.x;
    if (i < total) __stcs(reinterpret_cast<Vec*>(dst + byte_offset(i)), r[u]);
  }
}

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
  const std::int64_t chunk_vecs = std::int64_t(kCopyThreads) * kCopyUnroll;
  const auto chunks = std::int32_t((full_vecs + chunk_vecs - 1) / chunk_vecs);
  const std::int64_t grid = std::int64_t(n) * pools.num_layers * 2 * chunks;
  KVTILE_REQUIRE(grid < (std::int64_t(1) << 31), errc::invalid_argument, "block copy grid of ", grid,
                 " CTAs is too large; split the batch");
  detail::with_vector(vec, [&]<class Vec>() {
    copy_blocks_kernel<Vec><<<unsigned(grid), kCopyThreads, 0, stream>>>(pools, d_copies, chunks);
  });
  KVTILE_CUDA_CHECK_LAUNCH();
}

}  // namespace memory::cuda
KVTILE_NAMESPACE_END
