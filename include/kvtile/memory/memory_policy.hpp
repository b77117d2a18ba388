// kvtile/memory/memory_policy.hpp: where K/V blocks live, and how blocks are copied there.
//
// A memory policy allocates the pools and runs the two data movements the bookkeeping asks
// for: a batch of block copies (copy-on-write) and writing new tokens' K/V through a slot
// mapping. Policies in kvtile:
//   host_memory                  (this file) ordinary memory, memcpy
//   cuda::device_memory          (memory/cuda/device_memory.cuh) cudaMalloc, one vectorised
//                                block-copy kernel for the whole batch, a K/V write kernel
// Pointers given to write_kv (new K, V, slot mapping) live where the policy's memory lives.
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
#include <span>

#include "kvtile/memory/block_copy.hpp"
#include "kvtile/memory/kv_write.hpp"

KVTILE_NAMESPACE_BEGIN
namespace memory {

template <class M>
concept memory_policy = std::movable<M> &&
    requires(M m, std::size_t n, void* p, const kv_pool_set& pools, std::span<const block_copy> copies) {
      { M::is_device } -> std::convertible_to<bool>;
      { m.allocate(n) } -> std::same_as<void*>;
      m.deallocate(p, n);
      m.zero(p, n);
      m.copy_blocks(pools, copies);
      m.template write_kv<float>(memory::kv_pool_view<float>{}, (const float*)nullptr, (const float*)nullptr,
                                 std::int64_t{}, (const std::int64_t*)nullptr, std::int32_t{});
    };

struct host_memory {
  static constexpr bool is_device = false;
  static constexpr std::size_t alignment = 256;

  void* allocate(std::size_t bytes) { return ::operator new(bytes ? bytes : 1, std::align_val_t(alignment)); }
  void deallocate(void* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t(alignment)); }
  void zero(void* p, std::size_t bytes) { std::memset(p, 0, bytes); }
  void copy_blocks(const kv_pool_set& pools, std::span<const block_copy> copies) { copy_blocks_host(pools, copies); }
  template <class T, class S, class Codec>
  void write_kv(const memory::kv_pool_view<S, Codec>& pool, const T* k, const T* v, std::int64_t token_stride,
                const std::int64_t* slots, std::int32_t num_tokens) {
    write_kv_host(pool, k, v, token_stride, slots, num_tokens);
  }
};

static_assert(memory_policy<host_memory>, "host_memory must satisfy memory_policy");

}  // namespace memory
KVTILE_NAMESPACE_END
