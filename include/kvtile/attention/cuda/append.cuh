// kvtile/attention/cuda/append.cuh: chunked-prefill ("append") attention over paged K/V.
//
// Each request brings a chunk of q_len >= 1 new queries whose K/V have been appended to the
// end of its pages (kv_len includes the chunk). Query t of request b sits at key position
// t + kv_len - q_len: it sees the cached prefix and, causally, the chunk up to itself
// (bottom-right causal), optionally limited by a sliding window with attention sinks. A batch
// may mix decodes (q_len = 1..8) and prefill chunks, as a chunked-prefill scheduler emits them;
// queries are ragged (q.layout.indptr on the device, the same indptr on the host for planning).
//
//   auto plan = plan_append<causal_mask>(q_indptr_host, host_table, problem, {}, query_device_limits());
//   upload_plan(plan, workspace, stream);
//   run_append<causal_mask, 128>(plan, workspace, q, kv, o, lse, {}, scale, stream);
#pragma once

#include "kvtile/attention/cuda/paged/launch.cuh"
#include "kvtile/attention/cuda/plan.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda {

template <mask_policy Mask, class Table>
paged_plan plan_append(const std::int32_t* q_indptr, const Table& host_table, const paged_problem& problem,
                       typename Mask::params mask_params, const device_limits& dev, const plan_options& opt = {}) {
  return plan_paged_attention<Mask>(q_indptr, host_table, problem, mask_params, dev, opt);
}

template <mask_policy Mask, int HeadDim, class T, class Table>
void run_append(const paged_plan& plan, void* workspace, const dense_tensor<T>& q, const paging::paged_kv<T, Table>& kv,
                const dense_tensor<T>& o, float* lse, typename Mask::params mask_params, float scale,
                cudaStream_t stream = nullptr) {
  run_paged_attention<Mask, HeadDim>(plan, workspace, q, kv, o, lse, mask_params, scale, stream);
}

}  // namespace attention::cuda
KVTILE_NAMESPACE_END
