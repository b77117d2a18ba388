// kvtile/attention/cuda/arch/cp_async_shared.cuh: cp.async addressed by a 32-bit shared-memory
// address (what arch::smem_addr returns), for main loops that keep their shared-memory offsets
// in 32-bit registers instead of 64-bit generic pointers.
#pragma once

#include <cstdint>

#include "kvtile/core/config.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda::arch {

// Copy 16 bytes global -> shared (.cg, bypassing L1); when !valid, write 16 zero bytes and read
// nothing (src-size 0).
KVTILE_DEVICE KVTILE_FORCEINLINE void cp_async_16_to(std::uint32_t smem, const void* gmem, bool valid = true) {
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(src_size));
}

}  // namespace attention::cuda::arch
KVTILE_NAMESPACE_END
