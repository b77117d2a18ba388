// kvtile/core/config.hpp: version, namespace, and portability macros: the one place for them.
#pragma once

#define KVTILE_VERSION_MAJOR 0
#define KVTILE_VERSION_MINOR 1
#define KVTILE_VERSION_PATCH 0

// Every entity lives in an inline namespace that carries the version, so two shared libraries
// built against different kvtile versions (or for different GPUs) do not violate the ODR.
#define KVTILE_NAMESPACE_BEGIN                                                                    \
  namespace kvtile {                                                                              \
  inline namespace v0_1 {
#define KVTILE_NAMESPACE_END                                                                      \
  }                                                                                               \
  }

#if defined(__CUDACC__) || defined(__CUDA_ARCH__)
#define KVTILE_HOST_DEVICE __host__ __device__
#define KVTILE_DEVICE __device__
#define KVTILE_HAS_CUDA_COMPILER 1
#else
#define KVTILE_HOST_DEVICE
#define KVTILE_DEVICE
#define KVTILE_HAS_CUDA_COMPILER 0
#endif

#if defined(__CUDA_ARCH__)
#define KVTILE_IS_DEVICE_PASS 1
#else
#define KVTILE_IS_DEVICE_PASS 0
#endif

#if defined(__CUDACC__) || defined(__GNUC__) || defined(__clang__)
#define KVTILE_FORCEINLINE inline __attribute__((always_inline))
#else
#define KVTILE_FORCEINLINE inline
#endif

// Kernels get hidden visibility: a kernel instantiated in two shared libraries (each built for
// its own GPUs) must not be merged by the dynamic linker.
#if defined(_WIN32)
#define KVTILE_KERNEL __global__
#else
#define KVTILE_KERNEL __global__ __attribute__((visibility("hidden")))
#endif

#define KVTILE_STRINGIFY_(x) #x
#define KVTILE_STRINGIFY(x) KVTILE_STRINGIFY_(x)

#if defined(__CUDACC__) || defined(__clang__) || defined(__GNUC__)
#define KVTILE_PRAGMA_UNROLL _Pragma("unroll")
#else
#define KVTILE_PRAGMA_UNROLL
#endif
