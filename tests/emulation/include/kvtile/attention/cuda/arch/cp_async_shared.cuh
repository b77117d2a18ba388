// tests/emulation: kvtile/attention/cuda/arch/cp_async_shared.cuh on the host: copies happen at once, commit
// and wait do nothing.
#pragma once
#include <cstdint>
#include <cstring>
#include <cuda_runtime.h>
#include "kvtile/core/config.hpp"
KVTILE_NAMESPACE_BEGIN
namespace attention::cuda::arch {
inline void cp_async_16_to(std::uint32_t smem, const void* gmem, bool valid = true) {
  if (valid) std::memcpy(emu::cta->smem + smem, gmem, 16); else std::memset(emu::cta->smem + smem, 0, 16);
}
}  // namespace attention::cuda::arch
KVTILE_NAMESPACE_END
