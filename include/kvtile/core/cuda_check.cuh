// kvtile/core/cuda_check.hpp: turn CUDA runtime errors into kvtile::error.
#pragma once

#include <atomic>
#include <cstdint>

#include <cuda_runtime.h>

#include "kvtile/core/error.hpp"

KVTILE_NAMESPACE_BEGIN
namespace detail {
inline void cuda_check(cudaError_t e, const char* expr, const char* file, int line) {
  if (e != cudaSuccess)
    fail(errc::cuda, cudaGetErrorName(e), " (", cudaGetErrorString(e), ") from ", expr, " at ",
         file, ":", line);
}
}  // namespace detail
KVTILE_NAMESPACE_END

#define KVTILE_CUDA_CHECK(expr) ::kvtile::detail::cuda_check((expr), #expr, __FILE__, __LINE__)

KVTILE_NAMESPACE_BEGIN
namespace detail {
// Runs `f` the first time it is asked for `device` (devices 0..63; others every time): per-run
// host work that only needs doing once, such as raising a kernel's shared-memory limit. `done`
// is the caller's static flag word, one bit per device.
template <class F>
void once_per_device(std::atomic<std::uint64_t>& done, int device, F&& f) {
  const bool tracked = device >= 0 && device < 64;
  const std::uint64_t bit = tracked ? std::uint64_t(1) << device : 0;
  if (tracked && (done.load(std::memory_order_acquire) & bit)) return;
  f();
  if (tracked) done.fetch_or(bit, std::memory_order_release);
}

// The compute capability major of `device`, asked once per device.
inline int compute_capability_major(int device) {
  static std::atomic<int> cache[64] = {};
  if (device >= 0 && device < 64) {
    const int c = cache[device].load(std::memory_order_relaxed);
    if (c != 0) return c;
  }
  int major = 0;
  cuda_check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute", __FILE__,
             __LINE__);
  if (device >= 0 && device < 64) cache[device].store(major, std::memory_order_relaxed);
  return major;
}
}  // namespace detail
KVTILE_NAMESPACE_END

// After a launch: the launch's own error (bad configuration), without synchronising.
#define KVTILE_CUDA_CHECK_LAUNCH() KVTILE_CUDA_CHECK(cudaGetLastError())
