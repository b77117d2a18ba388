// kvtile/attention/cuda/decode.cuh: paged decode attention (1 to 8 query tokens per request).
//
// Each request brings q_len in [1, 8] new query tokens (one for plain decoding, a few when
// speculative decoding verifies drafts) whose K/V are already appended to its pages. The
// planner packs the query tokens x query heads of each KV head into 16-row tiles, so every
// K/V page is read once for the whole GQA group (any group size), and splits long sequences
// over several CTAs (split-KV) when the batch alone would not fill the GPU; the partial
// states are merged with the shared online-softmax merge.
//
//   auto plan = plan_decode<causal_mask>(q_indptr_host, host_table, problem, {}, query_device_limits());
//   upload_plan(plan, workspace, stream);              // workspace: plan.workspace_bytes()
//   run_decode<causal_mask, 128>(plan, workspace, q, kv, o, lse, {}, scale, stream);  // graph safe
//
// Masks are the mask policies (bottom-right causal, sliding window with sinks, none); LSE is
// natural log, [rows, num_qo_heads], -inf for a row that sees no key (its output is zeros).
#pragma once

#include "kvtile/attention/cuda/paged/launch.cuh"
#include "kvtile/attention/cuda/plan.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda {

inline constexpr int max_decode_q_len = 8;

template <mask_policy Mask, class Table>
paged_plan plan_decode(const std::int32_t* q_indptr, const Table& host_table, const paged_problem& problem,
                       typename Mask::params mask_params, const device_limits& dev, const plan_options& opt = {}) {
  KVTILE_REQUIRE(q_indptr != nullptr, errc::invalid_argument, "plan_decode: null q_indptr");
  for (std::int32_t b = 0; b < host_table.batch; ++b) {
    const std::int64_t ql = std::int64_t(q_indptr[b + 1]) - q_indptr[b];  // 64-bit: untrusted entries may wrap
    KVTILE_REQUIRE(ql >= 1 && ql <= max_decode_q_len, errc::invalid_argument, "decode request ", b, " has ", ql,
                   " query tokens; decode takes 1 to ", max_decode_q_len, " (use plan_append for longer chunks)");
  }
  return plan_paged_attention<Mask>(q_indptr, host_table, problem, mask_params, dev, opt);
}

template <mask_policy Mask, int HeadDim, class T, class Table>
void run_decode(const paged_plan& plan, void* workspace, const dense_tensor<T>& q, const paging::paged_kv<T, Table>& kv,
                const dense_tensor<T>& o, float* lse, typename Mask::params mask_params, float scale,
                cudaStream_t stream = nullptr) {
  KVTILE_REQUIRE(plan.max_q_len <= max_decode_q_len, errc::invalid_argument, "run_decode: plan has requests of ",
                 plan.max_q_len, " query tokens (at most ", max_decode_q_len, ")");
  run_paged_attention<Mask, HeadDim>(plan, workspace, q, kv, o, lse, mask_params, scale, stream);
}

}  // namespace attention::cuda
KVTILE_NAMESPACE_END
