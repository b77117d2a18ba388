// <kvtile/kvtile.cuh>: everything in kvtile, CUDA kernels included. Compile with nvcc.
#pragma once

#include "kvtile/kvtile.hpp"

#include "kvtile/core/cuda_check.cuh"

#include "kvtile/memory/cuda/block_copy.cuh"
#include "kvtile/memory/cuda/device_memory.cuh"
#include "kvtile/memory/cuda/kv_write.cuh"
#include "kvtile/memory/cuda/vector_access.cuh"

#include "kvtile/attention/cuda/arch/cp_async.cuh"
#include "kvtile/attention/cuda/arch/cp_async_shared.cuh"
#include "kvtile/attention/cuda/arch/mbarrier.cuh"
#include "kvtile/attention/cuda/arch/mma.cuh"
#include "kvtile/attention/cuda/arch/wgmma.cuh"
#include "kvtile/attention/cuda/append.cuh"
#include "kvtile/attention/cuda/decode.cuh"
#include "kvtile/attention/cuda/merge.cuh"
#include "kvtile/attention/cuda/paged_attention.cuh"
#include "kvtile/attention/cuda/prefill.cuh"
#include "kvtile/attention/cuda/prefill_sm90.cuh"
