// tests/emulation: kvtile/attention/cuda/arch/cp_async.cuh on the host: copies happen at once, commit
// and wait do nothing.
#pragma once
#include <cstdint>
#include <cstring>
#include <cuda_runtime.h>
#include "kvtile/core/config.hpp"
KVTILE_NAMESPACE_BEGIN
namespace attention::cuda::arch {
inline void cp_async_16(void* smem, const void* gmem, bool valid = true) {
  if (valid) std::memcpy(smem, gmem, 16); else std::memset(smem, 0, 16);
}
inline void cp_async_4(void* smem, const void* gmem, bool valid = true) {
  if (valid) std::memcpy(smem, gmem, 4); else std::memset(smem, 0, 4);
}
inline void cp_async_commit() {}
template <int N>
inline void cp_async_wait() {}
}  // namespace attention::cuda::arch
KVTILE_NAMESPACE_END
