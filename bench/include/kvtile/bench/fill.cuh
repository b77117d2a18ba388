// kvtile/bench/fill.cuh: benchmark inputs filled on the device.
//
//   fill_uniform<<<grid, block>>>(p, n, seed)  p[i] uniform in [-1, 1) from a hash of (i, seed):
//       fresh, non-zero inputs without a host round trip; the same seed gives the same values.
#pragma once

#include <cstdint>

#include "kvtile/core/config.hpp"

KVTILE_NAMESPACE_BEGIN
namespace bench {

template <class T>
__global__ void fill_uniform(T* p, std::int64_t n, std::uint64_t seed) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n; i += std::int64_t(gridDim.x) * blockDim.x) {
    std::uint64_t x = (std::uint64_t(i) + seed) * 0x9E3779B97F4A7C15ull;
    x ^= x >> 31;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 29;
    p[i] = T(float(x >> 40) * (2.f / 16777216.f) - 1.f);
  }
}

}  // namespace bench
KVTILE_NAMESPACE_END
