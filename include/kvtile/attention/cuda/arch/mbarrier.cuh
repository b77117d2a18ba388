// kvtile/attention/cuda/arch/mbarrier.cuh: shared-memory mbarriers (sm_80+) for pipelines
// whose producers are cp.async copies: init, arrive, the cp.async completion arrive, and the
// parity wait; named barriers. Addresses are 32-bit shared-window byte addresses (8-byte aligned).
#pragma once

#include <cstdint>

#include "kvtile/core/config.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda::arch {

KVTILE_DEVICE KVTILE_FORCEINLINE void mbarrier_init(std::uint32_t bar, std::uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

KVTILE_DEVICE KVTILE_FORCEINLINE void mbarrier_arrive(std::uint32_t bar) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar) : "memory");
}

// Arrive on `bar` once every cp.async this thread issued before has completed; the arrival is
// one of the barrier's expected count (.noinc).
KVTILE_DEVICE KVTILE_FORCEINLINE void cp_async_mbarrier_arrive(std::uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

// Wait until the phase of `bar` with parity `parity` has completed.
KVTILE_DEVICE KVTILE_FORCEINLINE void mbarrier_wait(std::uint32_t bar, std::uint32_t parity) {
  std::uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (done == 0);
}

// Named CTA barrier `id` (1-15; 0 is __syncthreads') among `threads` threads, a multiple of 32:
// a subset of the CTA's warps meets without the others.
KVTILE_DEVICE KVTILE_FORCEINLINE void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Arrive at named barrier `id` without waiting (the other side of a named_barrier_sync with
// the same id and count): a producer of an ordering signals its consumers.
KVTILE_DEVICE KVTILE_FORCEINLINE void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
}  // namespace attention::cuda::arch
KVTILE_NAMESPACE_END
