// kvtile/attention/cuda/prefill/rotate_launch.cuh: the host side of the rotate pass
// (prefill/rotate.cuh): one launch for Q and K, forwards or back. Used by cuda::prefill's
// rotate-once path and by cuda::backward for rotary variants.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "kvtile/attention/cuda/prefill/rotate.cuh"
#include "kvtile/core/config.hpp"
#include "kvtile/core/cuda_check.cuh"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda::detail {

// One launch of rotate_rows_kernel: q's rows at query positions and k's at key positions (or
// back, Inverse), sequences of at most q_len_bound / k_len_bound tokens (the layouts' lengths
// are read on the device). Nothing is launched when neither side has a row.
template <class T, int D, class Variant, bool Inverse = false>
void launch_rotate_rows(const rotate_side<T>& q, const rotate_side<T>& k, const ragged_layout& q_layout,
                        const ragged_layout& kv_layout, std::int64_t q_len_bound, std::int64_t k_len_bound,
                        const typename Variant::params& vp, cudaStream_t stream) {
  const int tasks = rotate_row_tasks<D, Variant::rotary_layout_v>(Variant(vp, 1, 1).rotary_dims(D));
  const dim3 grid = rotate_rows_grid(q_len_bound * q_layout.heads, k_len_bound * kv_layout.heads, tasks, q_layout.batch);
  if (grid.x == 0 || grid.y == 0) return;
  rotate_rows_kernel<T, D, Variant, Inverse><<<grid, rotate_threads, 0, stream>>>(q, k, q_layout, kv_layout, vp);
  KVTILE_CUDA_CHECK_LAUNCH();
}

}  // namespace attention::cuda::detail
KVTILE_NAMESPACE_END
