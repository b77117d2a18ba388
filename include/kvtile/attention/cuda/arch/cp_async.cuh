// kvtile/attention/cuda/arch/cp_async.cuh: asynchronous global->shared copies (cp.async, sm_80+)
// for multi-stage pipelines, with zero fill for rows past the end of a sequence.
#pragma once

#include <cstdint>

#include "kvtile/core/config.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda::arch {

// Copy 16 bytes global -> shared, bypassing L1 (.cg). When !valid, writes 16 zero bytes and
// reads nothing (src-size 0), so padded rows of a tile are zeros rather than garbage.
KVTILE_DEVICE KVTILE_FORCEINLINE void cp_async_16(void* smem, const void* gmem, bool valid = true) {
  const std::uint32_t dst = static_cast<std::uint32_t>(__cvta_generic_to_shared(smem));
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_size));
}

// Copy 4 bytes global -> shared through L1 (.ca; the only mode for sizes below 16): an fp8
// page's per-token scale. When !valid, writes 4 zero bytes and reads nothing.
KVTILE_DEVICE KVTILE_FORCEINLINE void cp_async_4(void* smem, const void* gmem, bool valid = true) {
  const std::uint32_t dst = static_cast<std::uint32_t>(__cvta_generic_to_shared(smem));
  const int src_size = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_size));
}

KVTILE_DEVICE KVTILE_FORCEINLINE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Wait until at most N committed groups are still in flight.
template <int N>
KVTILE_DEVICE KVTILE_FORCEINLINE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

}  // namespace attention::cuda::arch
KVTILE_NAMESPACE_END
