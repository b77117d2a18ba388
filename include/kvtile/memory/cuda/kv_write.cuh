// kvtile/memory/cuda/kv_write.cuh: write new tokens' K and V into their slots on the GPU.
//
// One CTA per new token; its threads copy the token's num_kv_heads * head_dim elements of K and
// of V with the widest vector the shapes allow (16 bytes when head_dim * sizeof(T) % 16 == 0).
// slot_mapping (device memory) is as for memory::write_kv_host: a negative slot is skipped; a
// slot beyond the pool is skipped too (a kernel cannot throw; write_kv_host reports it).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "kvtile/core/cuda_check.cuh"
#include "kvtile/memory/kv_write.hpp"
#include "kvtile/memory/cuda/vector_access.cuh"
#include "kvtile/memory/pool_view.hpp"

KVTILE_NAMESPACE_BEGIN
namespace memory::cuda {

inline constexpr int kWriteThreads = 128;

namespace detail {
struct kv_write_args {
  std::byte* k_pool;
  std::byte* v_pool;
  const std::byte* k;
  const std::byte* v;
  const std::int64_t* slots;
  std::int64_t stride_block, stride_token, stride_head;  // pool, bytes
  std::int64_t src_token_stride;                        // new K/V, bytes
  std::int64_t num_slots;
  std::int32_t page_size, num_kv_heads, head_bytes;
};
}  // namespace detail

template <class Vec>
KVTILE_KERNEL void __launch_bounds__(kWriteThreads) write_kv_kernel(detail::kv_write_args a) {
  const std::int64_t slot = a.slots[blockIdx.x];
  if (slot < 0 || slot >= a.num_slots) return;
  const std::int64_t block = slot / a.page_size, in_block = slot % a.page_size;
  const std::int64_t dst_base = block * a.stride_block + in_block * a.stride_token;
  const std::int64_t src_base = std::int64_t(blockIdx.x) * a.src_token_stride;
  const int head_vecs = a.head_bytes / int(sizeof(Vec));
  const int vecs = head_vecs * a.num_kv_heads;
  for (int i = threadIdx.x; i < vecs; i += kWriteThreads) {
    const int h = i / head_vecs, j = i - h * head_vecs;
    const std::int64_t d = dst_base + h * a.stride_head + std::int64_t(j) * sizeof(Vec);
    const std::int64_t s = src_base + std::int64_t(i) * sizeof(Vec);
    const Vec kv = *reinterpret_cast<const Vec*>(a.k + s);
    const Vec vv = *reinterpret_cast<const Vec*>(a.v + s);
    *reinterpret_cast<Vec*>(a.k_pool + d) = kv;
    *reinterpret_cast<Vec*>(a.v_pool + d) = vv;
  }
}

// k, v: [num_tokens, num_kv_heads, head_dim] in device memory, token_stride elements apart;
// slots: [num_tokens] in device memory.
template <class T>
void write_kv_device(const memory::kv_pool_view<T>& pool, const T* k, const T* v, std::int64_t token_stride,
                     const std::int64_t* slots, std::int32_t num_tokens, cudaStream_t stream = nullptr) {
  check_kv_write(pool, token_stride, slots, num_tokens);
  if (num_tokens == 0) return;
  const auto e = std::int64_t(sizeof(T));
  detail::kv_write_args a{reinterpret_cast<std::byte*>(pool.k), reinterpret_cast<std::byte*>(pool.v),
                          reinterpret_cast<const std::byte*>(k), reinterpret_cast<const std::byte*>(v), slots,
                          pool.stride_block * e, pool.stride_token * e, pool.stride_head * e, token_stride * e,
                          std::int64_t(pool.num_blocks) * pool.page_size, pool.page_size, pool.num_kv_heads,
                          std::int32_t(pool.head_dim * e)};
  const int vec = ::kvtile::memory::cuda::detail::common_vector_bytes(
      reinterpret_cast<std::uintptr_t>(pool.k), reinterpret_cast<std::uintptr_t>(pool.v),
      reinterpret_cast<std::uintptr_t>(k), reinterpret_cast<std::uintptr_t>(v), a.stride_block, a.stride_token,
      a.stride_head, a.src_token_stride, a.head_bytes);
  ::kvtile::memory::cuda::detail::with_vector(
      vec, [&]<class Vec>() { write_kv_kernel<Vec><<<unsigned(num_tokens), kWriteThreads, 0, stream>>>(a); });
  KVTILE_CUDA_CHECK_LAUNCH();
}

}  // namespace memory::cuda
KVTILE_NAMESPACE_END
