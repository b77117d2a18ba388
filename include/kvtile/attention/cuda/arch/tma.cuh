// kvtile/attention/cuda/arch/tma.cuh: the Tensor Memory Accelerator (sm_90): tiled copies of a
// box of a tensor map into shared memory, completed on an mbarrier by transaction bytes; the
// host side, the encoding of a tensor map (through the driver's entry point, so nothing links
// against libcuda); and programmatic dependent launch, the sm_90 overlap of a grid's start with
// the end of the grid before it.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda.h>  // CUtensorMap and its enums (types only)
#include <cuda_runtime.h>

#include "kvtile/core/config.hpp"
#include "kvtile/core/error.hpp"
#include "kvtile/core/numeric.hpp"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define KVTILE_TMA_AVAILABLE 1
#else
#define KVTILE_TMA_AVAILABLE 0
#endif

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda::arch {

// Makes the mbarrier initialisations of this thread visible to the async proxy (the copies).
KVTILE_DEVICE KVTILE_FORCEINLINE void fence_barrier_init() {
#if KVTILE_TMA_AVAILABLE
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

// One arrival on `bar` that also expects `bytes` more transaction bytes in the current phase.
KVTILE_DEVICE KVTILE_FORCEINLINE void mbarrier_arrive_expect_tx(std::uint32_t bar, std::uint32_t bytes) {
#if KVTILE_TMA_AVAILABLE
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
#endif
}

// Copy the box at coordinates (c0, c1, c2, c3) (innermost first) of `map` to shared memory at
// `dst`; its bytes complete a transaction on `bar`.
KVTILE_DEVICE KVTILE_FORCEINLINE void tma_load_4d(std::uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2, int c3,
                                                  std::uint32_t bar) {
#if KVTILE_TMA_AVAILABLE
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(
          dst),
      "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
#endif
}

// The 3-D form of tma_load_4d: the box at (c0, c1, c2) of `map`.
KVTILE_DEVICE KVTILE_FORCEINLINE void tma_load_3d(std::uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2,
                                                  std::uint32_t bar) {
#if KVTILE_TMA_AVAILABLE
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(
          dst),
      "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
#endif
}
// Copy `bytes` contiguous bytes (a multiple of 16; both addresses 16-byte aligned) from global
// memory to shared memory at `dst`; they complete a transaction on `bar`.
KVTILE_DEVICE KVTILE_FORCEINLINE void bulk_load(std::uint32_t dst, const void* src, std::uint32_t bytes, std::uint32_t bar) {
#if KVTILE_TMA_AVAILABLE
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst), "l"(src),
               "r"(bytes), "r"(bar)
               : "memory");
#endif
}

// Add the box at `src` (shared memory, the map's box layout) into the box at (c0, c1, c2) of
// `map` in global memory, element by element (the reduction happens in L2: concurrent adds from
// other CTAs are safe). Asynchronous: it joins this thread's current bulk group (bulk_commit).
KVTILE_DEVICE KVTILE_FORCEINLINE void tma_reduce_add_3d(const CUtensorMap* map, int c0, int c1, int c2, std::uint32_t src) {
#if KVTILE_TMA_AVAILABLE
  asm volatile("cp.reduce.async.bulk.tensor.3d.global.shared::cta.add.tile.bulk_group [%0, {%1, %2, %3}], [%4];\n" ::"l"(map),
               "r"(c0), "r"(c1), "r"(c2), "r"(src)
               : "memory");
#endif
}
// Close this thread's current bulk group (the reductions issued since the last commit).
KVTILE_DEVICE KVTILE_FORCEINLINE void bulk_commit() {
#if KVTILE_TMA_AVAILABLE
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
#endif
}
// Wait until at most N of this thread's bulk groups are still reading their shared memory.
template <int N>
KVTILE_DEVICE KVTILE_FORCEINLINE void bulk_wait_read() {
#if KVTILE_TMA_AVAILABLE
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
#endif
}
// Wait until at most N of this thread's bulk groups are incomplete (their writes done).
template <int N>
KVTILE_DEVICE KVTILE_FORCEINLINE void bulk_wait() {
#if KVTILE_TMA_AVAILABLE
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Prefetch the box at (c0, c1, c2, c3) of `map` into L2: no shared memory, no barrier, no
// fault (a box outside the tensor is not fetched).
KVTILE_DEVICE KVTILE_FORCEINLINE void tma_prefetch_4d(const CUtensorMap* map, int c0, int c1, int c2, int c3) {
#if KVTILE_TMA_AVAILABLE
  asm volatile("cp.async.bulk.prefetch.tensor.4d.L2.global.tile [%0, {%1, %2, %3, %4}];\n" ::"l"(map), "r"(c0), "r"(c1),
               "r"(c2), "r"(c3)
               : "memory");
#endif
}

// Programmatic dependent launch (sm_90): let the grid launched after this one on the stream with
// programmatic serialisation start now (it waits in wait_primary_grid before reading our output).
KVTILE_DEVICE KVTILE_FORCEINLINE void launch_dependents() {
#if KVTILE_TMA_AVAILABLE
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
// Wait until the grid this one depends on has completed and its memory is visible; a no-op for
// a grid launched without programmatic serialisation.
KVTILE_DEVICE KVTILE_FORCEINLINE void wait_primary_grid() {
#if KVTILE_TMA_AVAILABLE
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

}  // namespace attention::cuda::arch

namespace attention::cuda::detail {

using tensor_map_encode_fn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                          const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                          CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// The tensor-map element type of a kvtile element: bf16, fp16, fp32 (accumulators), or a byte
// (fp8 e4m3: TMA moves it, the kernel decodes it).
template <class T>
constexpr CUtensorMapDataType tensor_map_type() {
  static_assert(std::is_same_v<T, float> || sizeof(T) == 2 || sizeof(T) == 1, "tensor_map_type: fp32, 2- or 1-byte elements");
  if constexpr (std::is_same_v<T, float>) return CU_TENSOR_MAP_DATA_TYPE_FLOAT32;
  else if constexpr (sizeof(T) == 1) return CU_TENSOR_MAP_DATA_TYPE_UINT8;
  else return std::is_same_v<T, kvtile::bfloat16> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
}

// The driver's cuTensorMapEncodeTiled, looked up once.
inline tensor_map_encode_fn tensor_map_encoder() {
  static const tensor_map_encode_fn fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
#if CUDART_VERSION >= 12050
    const cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q);
#else
    const cudaError_t e = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &p, cudaEnableDefault, &q);
#endif
    if (e != cudaSuccess || q != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      p = nullptr;
    }
    return reinterpret_cast<tensor_map_encode_fn>(p);
  }();
  KVTILE_REQUIRE(fn != nullptr, errc::unsupported, "the CUDA driver has no cuTensorMapEncodeTiled (needs CUDA 12 or newer)");
  return fn;
}

}  // namespace attention::cuda::detail
KVTILE_NAMESPACE_END
