// kvtile/core/cuda_check.hpp: turn CUDA runtime errors into kvtile::error.
#pragma once

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
// After a launch: the launch's own error (bad configuration), without synchronising.
#define KVTILE_CUDA_CHECK_LAUNCH() KVTILE_CUDA_CHECK(cudaGetLastError())
