// kvtile/memory/cuda/vector_access.cuh: picking the widest vector a byte-level copy can use.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "kvtile/core/config.hpp"

KVTILE_NAMESPACE_BEGIN
namespace memory::cuda::detail {

// The widest of 16, 2 or 1 bytes that divides every value (strides, sizes, addresses).
template <class... V>
constexpr int common_vector_bytes(V... values) {
  const std::uint64_t all = (std::uint64_t(values) | ... | 0);
  return all % 16 == 0 ? 16 : all % 2 == 0 ? 2 : 1;
}

// Call f.template operator()<Vec>() with Vec of `bytes` bytes: uint4, unsigned short or unsigned char.
template <class F>
void with_vector(int bytes, F&& f) {
  if (bytes == 16) f.template operator()<uint4>();
  else if (bytes == 2) f.template operator()<unsigned short>();
  else f.template operator()<unsigned char>();
}

}  // namespace memory::cuda::detail
KVTILE_NAMESPACE_END
