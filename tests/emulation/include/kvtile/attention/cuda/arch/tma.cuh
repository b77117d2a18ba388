// tests/emulation: kvtile/attention/cuda/arch/tma.cuh on the host, as far as the mma.sync paged
// kernels use it: programmatic dependent launch, nothing here (emulated grids run one after the
// other).
#pragma once
#include <cuda_runtime.h>
#include "kvtile/core/config.hpp"
KVTILE_NAMESPACE_BEGIN
namespace attention::cuda::arch {
inline void launch_dependents() {}
inline void wait_primary_grid() {}
}  // namespace attention::cuda::arch
KVTILE_NAMESPACE_END
