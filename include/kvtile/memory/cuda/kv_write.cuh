// kvtile/memory/cuda/kv_write.cuh: write new tokens' K and V into their slots on the GPU.
//
// One CTA per new token; its threads copy the token's num_kv_heads * head_dim elements of K and
// of V with the widest vector the shapes allow (16 bytes when head_dim * sizeof(T) % 16 == 0).
// slot_mapping (device memory) is as for memory::write_kv_host: a negative slot is skipped; a
// slot beyond the pool is skipped too (a kernel cannot throw; write_kv_host reports it).
// An fp8 pool (kv_codec.hpp) is written by write_fp8_kernel instead: one warp per token-head
// row, which quantises as write_kv_host does (the same encode, so host and device pools agree
// bit for bit); per_token_head rows first take their amax across the warp.
#pragma once

#include <cstdint>
#include <type_traits>
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

namespace detail {
// Four consecutive elements, loaded as one vector.
template <class T>
struct alignas(4 * sizeof(T)) quad {
  T x[4];
};
}  // namespace detail

// One warp per (token, head) row: quantise K and V into an fp8 pool. Quad: each lane takes 4
// consecutive elements at a time (one vector load, one 4-byte store) where the shapes and
// addresses allow it.
template <class T, class Codec, bool Quad>
KVTILE_KERNEL void __launch_bounds__(kWriteThreads)
    write_fp8_kernel(const memory::kv_pool_view<e4m3, Codec> pool, const T* k, const T* v, std::int64_t token_stride,
                     const std::int64_t* slots) {
  const std::int64_t slot = slots[blockIdx.x];
  if (slot < 0 || slot >= std::int64_t(pool.num_blocks) * pool.page_size) return;
  const auto block = std::int32_t(slot / pool.page_size), in_block = std::int32_t(slot % pool.page_size);
  const int lane = threadIdx.x % 32, d = pool.head_dim;
  constexpr int step = Quad ? 4 : 1;
  for (int h = threadIdx.x / 32; h < pool.num_kv_heads; h += kWriteThreads / 32) {
    const std::int64_t src = std::int64_t(blockIdx.x) * token_stride + std::int64_t(h) * d;
    auto* kd = reinterpret_cast<std::uint8_t*>(pool.k_at(block, in_block, h));
    auto* vd = reinterpret_cast<std::uint8_t*>(pool.v_at(block, in_block, h));
    float ks, vs;
    if constexpr (per_token_scales<Codec>) {
      float ka = 0.f, va = 0.f;
      for (int x = lane * step; x < d; x += 32 * step) {
        if constexpr (Quad) {
          const auto kq = *reinterpret_cast<const detail::quad<T>*>(k + src + x);
          const auto vq = *reinterpret_cast<const detail::quad<T>*>(v + src + x);
          KVTILE_PRAGMA_UNROLL
          for (int j = 0; j < 4; ++j) {
            ka = fmaxf(ka, fabsf(to_float(kq.x[j])));
            va = fmaxf(va, fabsf(to_float(vq.x[j])));
          }
        } else {
          ka = fmaxf(ka, fabsf(to_float(k[src + x])));
          va = fmaxf(va, fabsf(to_float(v[src + x])));
        }
      }
      for (int o = 16; o > 0; o /= 2) {
        ka = fmaxf(ka, __shfl_xor_sync(0xffffffffu, ka, o));
        va = fmaxf(va, __shfl_xor_sync(0xffffffffu, va, o));
      }
      ks = fp8::scale_for_amax(ka);
      vs = fp8::scale_for_amax(va);
      if (lane == 0) {
        *pool.scale_ptr(pool.k, block, in_block, h) = ks;
        *pool.scale_ptr(pool.v, block, in_block, h) = vs;
      }
    } else {
      ks = pool.k_scale[h];
      vs = pool.v_scale[h];
    }
    for (int x = lane * step; x < d; x += 32 * step) {
      if constexpr (Quad) {
        const auto kq = *reinterpret_cast<const detail::quad<T>*>(k + src + x);
        const auto vq = *reinterpret_cast<const detail::quad<T>*>(v + src + x);
        std::uint32_t kw = 0, vw = 0;
        KVTILE_PRAGMA_UNROLL
        for (int j = 0; j < 4; ++j) {
          kw |= std::uint32_t(fp8::encode_e4m3(to_float(kq.x[j]) / ks)) << (8 * j);
          vw |= std::uint32_t(fp8::encode_e4m3(to_float(vq.x[j]) / vs)) << (8 * j);
        }
        *reinterpret_cast<std::uint32_t*>(kd + x) = kw;
        *reinterpret_cast<std::uint32_t*>(vd + x) = vw;
      } else {
        kd[x] = fp8::encode_e4m3(to_float(k[src + x]) / ks);
        vd[x] = fp8::encode_e4m3(to_float(v[src + x]) / vs);
      }
    }
  }
}

// k, v: [num_tokens, num_kv_heads, head_dim] in device memory, token_stride elements apart;
// slots: [num_tokens] in device memory. An fp8 pool quantises (per_head: its scales are in
// device memory, positive and finite: the kernel cannot check them).
template <class T, class S, class Codec>
void write_kv_device(const memory::kv_pool_view<S, Codec>& pool, const T* k, const T* v, std::int64_t token_stride,
                     const std::int64_t* slots, std::int32_t num_tokens, cudaStream_t stream = nullptr) {
  static_assert(Codec::quantized || std::is_same_v<S, T>, "write_kv: an identity pool stores the new K/V's own type");
  check_kv_write(pool, token_stride, slots, num_tokens);
  if (num_tokens == 0) return;
  if constexpr (Codec::quantized) {
    const auto e = std::uint64_t(sizeof(T));
    const bool quad = pool.head_dim % 4 == 0 && (reinterpret_cast<std::uintptr_t>(k) | reinterpret_cast<std::uintptr_t>(v) |
                                                 std::uint64_t(token_stride) * e) % (4 * e) == 0 &&
                      (reinterpret_cast<std::uintptr_t>(pool.k) | reinterpret_cast<std::uintptr_t>(pool.v) |
                       std::uint64_t(pool.stride_block) | std::uint64_t(pool.stride_token) | std::uint64_t(pool.stride_head)) %
                              4 == 0;
    if (quad)
      write_fp8_kernel<T, Codec, true><<<unsigned(num_tokens), kWriteThreads, 0, stream>>>(pool, k, v, token_stride, slots);
    else
      write_fp8_kernel<T, Codec, false><<<unsigned(num_tokens), kWriteThreads, 0, stream>>>(pool, k, v, token_stride, slots);
    KVTILE_CUDA_CHECK_LAUNCH();
    return;
  } else {
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
}

}  // namespace memory::cuda
KVTILE_NAMESPACE_END
