// <kvtile/kvtile.cuh>: everything in kvtile, CUDA kernels included. Compile with nvcc.
#pragma once

#include "kvtile/kvtile.hpp"

#include "kvtile/core/cuda_check.cuh"

#include "kvtile/attention/cuda/arch/cp_async.cuh"
#include "kvtile/attention/cuda/arch/mma.cuh"
