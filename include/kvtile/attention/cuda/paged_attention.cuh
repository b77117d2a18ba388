// kvtile/attention/cuda/paged_attention.cuh: paged decode and chunked-prefill ("append")
// attention over paged K/V, in the protocol every kvtile kernel speaks:
//
//   using attn = kvtile::attention::cuda::paged_attention<kvtile::bfloat16, 128, causal_mask>;
//   attn::plan_arguments pa{q_indptr_host, host_table, problem, query_device_limits()};
//   paged_plan plan = attn::plan(pa, mask_params);      // host, before any capture: checks the
//                                                        // page table, picks kernel and split
//   void* ws = alloc(attn::workspace_size(plan));         // caller-owned, 256-byte aligned
//   attn::initialize(plan, ws, stream);                   // work lists to the device, once per plan
//   attn::arguments args{q, kv, o, lse, mask_params, scale};
//   attn::check(plan, args);                              // kvtile::error naming the bad value
//   attn::run(plan, args, ws, stream);                    // graph safe: no allocation, no sync
//
// arguments -> check -> workspace size -> plan / initialize (host) -> run (graph safe), as
// cuda::prefill: the free functions of decode.cuh / append.cuh (plan_decode, upload_plan,
// run_decode, ...) are the same steps with positional arguments and stay for existing callers.
// Which kernel a plan runs and why: plan.kernel(), plan.reason, and the dispatch log.
//
// Template parameters: element type (half, bfloat16), head dim (a multiple of 16 up to 256),
// variant (a mask policy, or one with transforms: attention/variant.hpp; rotary runs on every
// paged kernel but the sm_90a append ones), page-table format (paging::csr_page_table or padded_page_table).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "kvtile/attention/cuda/paged/launch.cuh"
#include "kvtile/attention/cuda/plan.hpp"
#include "kvtile/attention/dense_view.hpp"
#include "kvtile/attention/mask.hpp"
#include "kvtile/paging/paged_view.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda {

// Codec: how the K/V pages are stored (memory/kv_codec.hpp): identity (T pages) or
// memory::fp8_e4m3<per_head / per_token_head> (e4m3 pages; the decode kernel; plan with
// problem.elem_bytes = 1).
template <class T, int HeadDim, mask_policy Variant = causal_mask, class Table = paging::csr_page_table,
          memory::kv_codec Codec = memory::identity>
class paged_attention {
 public:
  using element = T;
  using variant = Variant;
  using table = Table;
  using codec = Codec;
  static constexpr int head_dim = HeadDim;

  // What the planner reads, all on the host: the query lengths (q_indptr[batch + 1]), the host
  // copy of the page table, the problem's shape, the device and the planning options.
  struct plan_arguments {
    const std::int32_t* q_indptr = nullptr;
    Table host_table{};
    paged_problem problem{};
    device_limits device{};
    plan_options options{};
  };

  // What a run reads and writes on the device.
  struct arguments {
    dense_tensor<T> q;                // [batch, q_len(b), num_qo_heads, HeadDim], fixed or varlen
    paging::paged_kv<T, Table, Codec> kv;  // the device page table and pools the plan's table mirrors
    dense_tensor<T> o;                // same shape as q
    float* lse = nullptr;             // [rows, num_qo_heads], natural log; null: not written
    typename Variant::params mask_params{};
    float scale = 0.f;                // softmax scale; 0 means 1 / sqrt(HeadDim)
  };

  // Plans the batch (throws kvtile::error naming a bad length, page id or shape).
  static paged_plan plan(const plan_arguments& a, const typename Variant::params& mask_params) {
    KVTILE_REQUIRE(a.problem.head_dim == HeadDim, errc::invalid_argument, "paged_attention<D=", HeadDim,
                   ">: problem head_dim is ", a.problem.head_dim);
    constexpr int kv_bytes = int(sizeof(typename Codec::template storage<T>));
    KVTILE_REQUIRE(a.problem.elem_bytes == kv_bytes, errc::invalid_argument, "paged_attention: problem elem_bytes is ",
                   a.problem.elem_bytes, "; this codec stores ", kv_bytes, "-byte K/V elements");
    paged_problem problem = a.problem;
    problem.token_scales = memory::per_token_scales<Codec>;  // the planner's hint, from the codec
    return plan_paged_attention<Variant>(a.q_indptr, a.host_table, problem, mask_params, a.device, a.options);
  }

  static std::size_t workspace_size(const paged_plan& p) { return p.workspace_bytes(); }

  // Copies the plan's work lists into the workspace (once per plan, before captured runs).
  static void initialize(const paged_plan& p, void* workspace, cudaStream_t stream = nullptr) {
    upload_plan(p, workspace, stream);
  }

  // The run's checks against the plan, host values only (the workspace is run's to check).
  static void check(const paged_plan& p, const arguments& a) {
    check_paged_attention<Variant, HeadDim>(p, a.q, a.kv, a.o, a.mask_params, scale_of(a));
  }

  static bool can_implement(const paged_plan& p, const arguments& a) noexcept {
    return kvtile::detail::passes([&] { check(p, a); });
  }

  // Launches the plan's kernels on `stream` (checks first; graph safe).
  static void run(const paged_plan& p, const arguments& a, void* workspace, cudaStream_t stream = nullptr) {
    run_paged_attention<Variant, HeadDim>(p, workspace, a.q, a.kv, a.o, a.lse, a.mask_params, scale_of(a), stream);
  }

 private:
  static float scale_of(const arguments& a) { return a.scale > 0.f ? a.scale : 1.f / std::sqrt(float(HeadDim)); }
};

}  // namespace attention::cuda
KVTILE_NAMESPACE_END
