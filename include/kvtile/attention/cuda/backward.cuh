// kvtile/attention/cuda/backward.cuh: attention backward on NVIDIA GPUs (sm_80+), recomputing
// the scores from the forward's saved LSE (FlashAttention-2's backward). Portable mma.sync
// kernels (backward/kernel.cuh, backward/dq_kernel.cuh) on every device; on Hopper (a binary
// with sm_90a code) head dims 64 and 128 with the default tile run the main kernel on warpgroup
// MMA instead (backward/sm90_kernel.cuh). dispatch(args) says which, and why.
//
//   using kernel = kvtile::attention::cuda::backward<kvtile::bfloat16, 128, causal_mask>;
//   kernel::arguments args{q, kv, o, d_o, lse, dq, dk, dv, {}, scale};
//   kernel::check(args);                             // kvtile::error naming the bad value
//   std::size_t ws = kernel::workspace_size(args);   // the caller allocates it (256-byte aligned)
//   kernel::run(args, workspace, stream);            // no allocation, no sync: graph-capturable
//
// A run is three launches on `stream`: a pre-pass (Delta = rowsum(dO o O), the LSE in base 2,
// the fp32 dQ accumulator zeroed), the K/V-outer kernel (dK, dV; dQ added to the fp32 workspace
// with atomics, on Hopper TMA bulk reductions) and a post-pass (dQ fp32 -> T, times the scale). With `deterministic` the main
// kernel skips dQ and a Q-outer kernel computes it without atomics instead: bit-identical
// gradients from run to run, for about 2/5 more matrix work.
//
// Template parameters: element type (kvtile::half, kvtile::bfloat16), head dim (a multiple of
// 16 up to 128; above, 160 / 192 / 224 / 256), mask policy (no_mask, causal_mask,
// sliding_window_mask or any type meeting mask_policy) and tile shape (tile_shape<BlockQ,
// BlockKV, Warps, 2> with BlockKV = 16 * Warps, default per head dim in tuning.hpp). A logit
// transform (softcap) runs with its derivative hook; a rotary variant runs as the backward of
// its rotation-free form over Q and K rotated once, with dQ and dK rotated back (the
// specialisation at the end of this file).
//
// Shapes: q, o, d_o, dq [batch, q_len, qo_heads, D] (or varlen: packed rows with a device
// indptr, one indptr for the four); kv, dk, dv [batch, kv_len, kv_heads, D] (fixed or varlen,
// the K/V indptr for the three); lse [rows, qo_heads] as the forward wrote it (natural log, -inf
// for a row that sees no key: its dQ is 0). Queries are aligned to the bottom right of the keys
// (mask.hpp). Gradients have the inputs' element type; every element of dq, dk, dv is written.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <type_traits>

#include <cuda_runtime.h>

#include "kvtile/attention/cuda/backward/dq_kernel.cuh"
#include "kvtile/attention/cuda/backward/kernel.cuh"
#include "kvtile/attention/cuda/backward/params.cuh"
#include "kvtile/attention/cuda/backward/passes.cuh"
#include "kvtile/attention/cuda/backward/sm90_kernel.cuh"
#include "kvtile/attention/cuda/dispatch.hpp"
#include "kvtile/attention/cuda/prefill/rotate_launch.cuh"
#include "kvtile/attention/cuda/scores.cuh"
#include "kvtile/attention/cuda/tuning.hpp"
#include "kvtile/attention/dense_view.hpp"
#include "kvtile/attention/mask.hpp"
#include "kvtile/attention/tile_shape.hpp"
#include "kvtile/attention/variant.hpp"
#include "kvtile/core/cuda_check.cuh"
#include "kvtile/core/error.hpp"
#include "kvtile/core/numeric.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda {

template <int HeadDim>
using default_backward_tile_t = typename tuning::backward_tile<HeadDim>::type;

template <class T>
concept backward_element = std::is_same_v<T, kvtile::half> || std::is_same_v<T, kvtile::bfloat16>;

namespace detail {
// The arguments of cuda::backward<T, D, Mask> (MaskParams = Mask::params).
template <class T, class MaskParams>
struct backward_arguments {
  dense_tensor<const T> q;    // [batch, q_len, qo_heads, HeadDim]
  dense_kv<const T> kv;       // [batch, kv_len, kv_heads, HeadDim]
  dense_tensor<const T> o;    // the forward's output, same shape as q
  dense_tensor<const T> d_o;  // upstream gradient, same shape as q
  const float* lse = nullptr;  // [rows, qo_heads], the forward's (natural log)
  dense_tensor<T> dq;          // same shape as q
  dense_tensor<T> dk, dv;      // same shape as k and v
  MaskParams mask_params{};
  float scale = 0.f;            // softmax scale; 0 means 1 / sqrt(HeadDim)
  std::int32_t max_q_len = 0;   // varlen q only: an upper bound on every q_len (sizes grids and workspace)
  std::int32_t max_kv_len = 0;  // varlen kv only: an upper bound on every kv_len (sizes the grid)
  bool deterministic = false;   // dQ without atomics (Q-outer kernel): bit-identical over runs
};
}  // namespace detail

template <backward_element T, int HeadDim, mask_policy Mask = no_mask, tile_shape_type Tile = default_backward_tile_t<HeadDim>>
class backward {
 public:
  using element = T;
  using mask = Mask;
  using tile = Tile;
  static constexpr int head_dim = HeadDim;

  static_assert(!has_logit_transform<Mask> || has_logit_derivative<Mask>,
                "cuda::backward: the variant's logit transform needs `float logit_derivative(float s) const` (d "
                "logit / d s, by which dS is multiplied; softcap<> has it), see attention/variant.hpp");

 private:
  using kernel_t = detail::backward_kernel<T, HeadDim, Tile, Mask>;
  using dq_kernel_t = detail::backward_dq_kernel<T, HeadDim, Tile, Mask>;
  using geometry = typename kernel_t::G;
  using dq_geometry = typename dq_kernel_t::G;
  using params_t = detail::backward_params<T, Mask>;

 public:
  static constexpr std::size_t shared_memory_bytes = geometry::smem_bytes;  // of the K/V-outer kernel
  static constexpr std::size_t dq_shared_memory_bytes = dq_geometry::smem_bytes;  // of the Q-outer dQ kernel
  static constexpr int threads = geometry::threads;
  // Whether run() takes the sm_90a main kernel on a Hopper device (with this binary's sm_90a
  // code): head dims 64 and 128 with the default tile (a user's tile is the mma.sync kernel's).
  static constexpr bool sm90_capable =
      detail::backward_sm90_head_dim<HeadDim> && std::is_same_v<Tile, default_backward_tile_t<HeadDim>>;

  using arguments = detail::backward_arguments<T, typename Mask::params>;

  // Throws kvtile::error (invalid_argument) naming the first value the kernels cannot accept.
  // Reads nothing behind the pointers (indptr arrays live on the device).
  static void check(const arguments& a) {
    const ragged_layout &ql = a.q.layout, &kl = a.kv.layout;
    KVTILE_REQUIRE(ql.head_dim == HeadDim, errc::invalid_argument, "backward<D=", HeadDim, ">: q head_dim is ",
                   ql.head_dim);
    KVTILE_REQUIRE(kl.head_dim == HeadDim, errc::invalid_argument, "backward<D=", HeadDim, ">: kv head_dim is ",
                   kl.head_dim);
    KVTILE_REQUIRE(ql.batch >= 0 && ql.batch <= 65535, errc::invalid_argument,
                   "backward: batch must be in [0, 65535], got ", ql.batch);
    KVTILE_REQUIRE(kl.batch == ql.batch, errc::invalid_argument, "backward: kv batch ", kl.batch,
                   " differs from q batch ", ql.batch);
    KVTILE_REQUIRE(ql.heads > 0 && ql.heads <= 65535, errc::invalid_argument,
                   "backward: query heads must be in [1, 65535], got ", ql.heads);
    KVTILE_REQUIRE(kl.heads > 0 && ql.heads % kl.heads == 0, errc::invalid_argument, "backward: query heads (",
                   ql.heads, ") must be a positive multiple of KV heads (", kl.heads, ")");
    KVTILE_REQUIRE(std::int64_t(kl.heads) * geometry::col_splits <= 65535, errc::invalid_argument,
                   "backward: KV heads must be at most ", 65535 / geometry::col_splits, ", got ", kl.heads);
    struct like {
      const ragged_layout* l;
      const char* name;
      const ragged_layout* ref;
    };
    for (const like& x : {like{&a.o.layout, "o", &ql}, like{&a.d_o.layout, "d_o", &ql}, like{&a.dq.layout, "dq", &ql},
                          like{&a.dk.layout, "dk", &kl}, like{&a.dv.layout, "dv", &kl}}) {
      const char* ref_name = x.ref == &ql ? "q" : "kv";
      KVTILE_REQUIRE(x.l->head_dim == HeadDim, errc::invalid_argument, "backward<D=", HeadDim, ">: ", x.name,
                     " head_dim is ", x.l->head_dim);
      KVTILE_REQUIRE(x.l->batch == x.ref->batch, errc::invalid_argument, "backward: ", x.name, " batch ", x.l->batch,
                     " differs from ", ref_name, " batch ", x.ref->batch);
      KVTILE_REQUIRE(x.l->heads == x.ref->heads, errc::invalid_argument, "backward: ", x.name, " heads ", x.l->heads,
                     " differ from ", ref_name, " heads ", x.ref->heads);
      KVTILE_REQUIRE(x.l->indptr == x.ref->indptr, errc::invalid_argument, "backward: ", x.name,
                     " must use the same indptr as ", ref_name, " (varlen rows are shared)");
      if (x.ref->indptr == nullptr)
        KVTILE_REQUIRE(x.l->len == x.ref->len, errc::invalid_argument, "backward: ", x.name, " len ", x.l->len,
                       " differs from ", ref_name, " len ", x.ref->len);
    }
    if (ql.indptr == nullptr) {
      KVTILE_REQUIRE(ql.len >= 0, errc::invalid_argument, "backward: q_len must be >= 0, got ", ql.len);
    } else {
      KVTILE_REQUIRE(a.max_q_len > 0 || ql.batch == 0, errc::invalid_argument,
                     "backward: varlen q needs max_q_len > 0 (an upper bound on every q_len), got ", a.max_q_len);
    }
    if (kl.indptr == nullptr) {
      KVTILE_REQUIRE(kl.len >= 0, errc::invalid_argument, "backward: kv_len must be >= 0, got ", kl.len);
    } else {
      KVTILE_REQUIRE(a.max_kv_len > 0 || kl.batch == 0, errc::invalid_argument,
                     "backward: varlen kv needs max_kv_len > 0 (an upper bound on every kv_len), got ", a.max_kv_len);
    }
    KVTILE_REQUIRE(std::isfinite(a.scale) && a.scale >= 0.f, errc::invalid_argument,
                   "backward: softmax scale must be finite and positive (0 = 1/sqrt(D)), got ", a.scale);
    check_variant<Mask>(a.mask_params, HeadDim);
    // Zero-element tensors may be null: an empty batch, or fixed lengths of 0 on one side.
    const bool no_queries = a.q.layout.batch == 0 || (!ql.indptr && ql.len == 0);
    const bool no_keys = a.q.layout.batch == 0 || (!kl.indptr && kl.len == 0);
    if (!no_queries) {
      KVTILE_REQUIRE(a.q.data && a.o.data && a.d_o.data && a.dq.data, errc::invalid_argument,
                     "backward: q, o, d_o and dq must be non-null");
      KVTILE_REQUIRE(a.lse != nullptr, errc::invalid_argument, "backward: lse must be non-null (the forward's LSE)");
    }
    if (!no_keys)
      KVTILE_REQUIRE(a.kv.k && a.kv.v && a.dk.data && a.dv.data, errc::invalid_argument,
                     "backward: k, v, dk and dv must be non-null");
    if (a.q.layout.batch == 0) return;
    for (const void* ptr : {(const void*)a.q.data, (const void*)a.kv.k, (const void*)a.kv.v, (const void*)a.o.data,
                            (const void*)a.d_o.data, (const void*)a.dq.data, (const void*)a.dk.data,
                            (const void*)a.dv.data})
      KVTILE_REQUIRE(aligned16(ptr), errc::invalid_argument,
                     "backward: q, k, v, o, d_o, dq, dk and dv must be 16-byte aligned, got ", ptr);
    constexpr std::int64_t vec = 16 / sizeof(T);
    for (const ragged_layout* l : {&ql, &kl, &a.o.layout, &a.d_o.layout, &a.dq.layout, &a.dk.layout, &a.dv.layout})
      KVTILE_REQUIRE(l->stride_token % vec == 0 && l->stride_head % vec == 0 && l->stride_batch % vec == 0,
                     errc::invalid_argument, "backward: strides must be multiples of ", vec,
                     " elements (16 bytes), got token ", l->stride_token, ", head ", l->stride_head, ", batch ",
                     l->stride_batch);
  }

  static bool can_implement(const arguments& a) noexcept {
    return kvtile::detail::passes([&] { check(a); });
  }

  // Bytes of workspace run() needs (256-byte aligned pointer): lse2 and Delta [qo_heads, rows]
  // fp32, and without `deterministic` the dQ accumulator [rows, qo_heads, D] fp32, rows being
  // batch * q_len (varlen: batch * max_q_len).
  static std::size_t workspace_size(const arguments& a) {
    const layout_t w = workspace_layout(a);
    return w.total;
  }

  // Which kernels run(a) launches on the current device, and why (nothing is launched); every
  // run reports it to the dispatch log (dispatch.hpp).
  static kernel_choice dispatch(const arguments& a) {
    int device = 0;
    KVTILE_CUDA_CHECK(cudaGetDevice(&device));
    return choose(a, use_sm90(a, device, true));
  }

  // Checks, launches the three kernels on `stream`. Asynchronous; graph-capturable (no
  // allocation, no synchronisation; cudaFuncSetAttribute is host-side). The first run on a
  // device asks whether its sm_90a code is loaded: make it outside a graph capture.
  static void run(const arguments& a, void* workspace, cudaStream_t stream = nullptr) { launch(a, workspace, stream, true); }

  // The mma.sync kernels on every device, never the sm_90a one (to compare the two paths).
  static void run_portable(const arguments& a, void* workspace, cudaStream_t stream = nullptr) {
    launch(a, workspace, stream, false);
  }

 private:
  using sm90_kernel_t = std::conditional_t<sm90_capable, detail::backward_sm90_kernel<T, HeadDim, Mask>, void>;
  static constexpr int dq_pad_rows = [] {
    if constexpr (sm90_capable)
      return sm90_kernel_t::G::dq_pad_rows;
    else
      return 0;
  }();

  // Q and dO as tensor maps describe them (the sm_90a kernel loads them by TMA); a fixed layout
  // of no query rows has no tensor map (its run only zeroes dK and dV: the mma.sync kernel).
  static bool sm90_layouts_ok(const arguments& a) {
    const bool rows = a.q.layout.indptr != nullptr || (a.q.layout.len > 0 && a.q.layout.batch > 0);
    return rows && detail::dense_tma_layout_ok(a.q.data, a.q.layout) &&
           detail::dense_tma_layout_ok(a.d_o.data, a.d_o.layout);
  }
  static bool use_sm90(const arguments& a, int device, bool allow) {
    if constexpr (sm90_capable)
      return allow && sm90_layouts_ok(a) && kvtile::detail::compute_capability_major(device) == 9 &&
             detail::sm90_kernels_available(device);
    else
      return (void)a, (void)device, (void)allow, false;
  }

  static kernel_choice choose(const arguments& a, bool sm90) {
    kernel_choice c;
    c.entry = "cuda::backward";
    const std::string shape = "D " + std::to_string(HeadDim) + ", mask " + Mask::name;
    if (sm90) {
      c.kernel = a.deterministic ? "backward (wgmma, sm_90a), Q-outer mma.sync dQ without atomics"
                                 : "backward (wgmma, sm_90a), dQ by fp32 TMA bulk reductions";
      c.reason = shape + ", " + std::to_string(64 * sm90_warpgroups()) + " keys per CTA over " +
                 std::to_string(sm90_warpgroups()) + " warpgroup(s), 64-query steps";
      return c;
    }
    c.kernel = a.deterministic ? "backward (mma.sync, sm_80+), Q-outer dQ without atomics"
                               : "backward (mma.sync, sm_80+), dQ by fp32 atomics";
    c.reason = shape + ", tile <" + std::to_string(Tile::block_q) + ", " + std::to_string(Tile::block_kv) + ", " +
               std::to_string(Tile::warps) + ", " + std::to_string(Tile::stages) + ">; ";
    if (!detail::backward_sm90_head_dim<HeadDim>)
      c.reason += "the sm_90a kernel takes head dims 64 and 128";
    else if (!sm90_capable)
      c.reason += "a user tile runs on the mma.sync kernel (the sm_90a kernel has its own)";
    else if (!sm90_layouts_ok(a))
      c.reason += "q or d_o has a layout no tensor map describes (the sm_90a kernel loads them by TMA: 16-byte "
                  "aligned, batches of a fixed length contiguous, 1 to 2^31 - 1 rows)";
    else
      c.reason += "not a Hopper device running this binary's sm_90a code, or the portable path was asked for";
    return c;
  }

  static void launch(const arguments& a, void* workspace, cudaStream_t stream, bool allow_sm90) {
    check(a);
    const layout_t w = workspace_layout(a);
    if (a.q.layout.batch == 0) return;
    const std::int32_t max_q = a.q.layout.indptr ? a.max_q_len : a.q.layout.len;
    const std::int32_t max_kv = a.kv.layout.indptr ? a.max_kv_len : a.kv.layout.len;
    if (max_kv == 0 && max_q == 0) return;
    KVTILE_REQUIRE(workspace != nullptr || w.total == 0, errc::invalid_argument, "backward: workspace of ", w.total,
                   " bytes (workspace_size) is null");
    KVTILE_REQUIRE((reinterpret_cast<std::uintptr_t>(workspace) & 255u) == 0, errc::invalid_argument,
                   "backward: workspace must be 256-byte aligned, got ", workspace);
    int device = 0, major = 0, smem_optin = 0;
    KVTILE_CUDA_CHECK(cudaGetDevice(&device));
    KVTILE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    KVTILE_REQUIRE(major >= 8, errc::unsupported, "backward needs compute capability 8.0 or newer, device ", device,
                   " has major ", major);
    KVTILE_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    const bool sm90 = use_sm90(a, device, allow_sm90);
    const std::size_t main_smem = sm90 ? sm90_smem_bytes() : shared_memory_bytes;
    const std::size_t need = a.deterministic ? std::max(main_smem, dq_shared_memory_bytes) : main_smem;
    KVTILE_REQUIRE(need <= std::size_t(smem_optin), errc::unsupported, "backward tile <", Tile::block_q, ", ",
                   Tile::block_kv, ", ", Tile::warps, ", ", Tile::stages, "> with D=", HeadDim, " needs ", need,
                   " bytes of shared memory, device ", device, " allows ", smem_optin);

    if (dispatch_log_enabled()) log_dispatch(choose(a, sm90));

    params_t p{};
    p.q = a.q.data;
    p.k = a.kv.k;
    p.v = a.kv.v;
    p.o = a.o.data;
    p.d_o = a.d_o.data;
    p.lse = a.lse;
    p.dq = a.dq.data;
    p.dk = a.dk.data;
    p.dv = a.dv.data;
    p.q_layout = a.q.layout;
    p.kv_layout = a.kv.layout;
    p.o_layout = a.o.layout;
    p.do_layout = a.d_o.layout;
    p.dq_layout = a.dq.layout;
    p.dk_layout = a.dk.layout;
    p.dv_layout = a.dv.layout;
    p.mask = a.mask_params;
    p.scale = a.scale > 0.f ? a.scale : 1.f / std::sqrt(float(HeadDim));
    p.scale_log2 = p.scale * log2e;
    p.group = a.q.layout.heads / a.kv.layout.heads;
    p.ws_rows = w.rows;
    auto* base = static_cast<unsigned char*>(workspace);
    p.dq_acc = a.deterministic ? nullptr : reinterpret_cast<float*>(base + w.dq_acc);
    p.lse2 = reinterpret_cast<float*>(base + w.lse2);
    p.delta = reinterpret_cast<float*>(base + w.delta);

    const dim3 pass_grid = detail::backward_pass_grid<HeadDim>(a.q.layout, max_q);
    const bool any_q = max_q > 0;
    if (any_q) {
      detail::backward_prepass<T, HeadDim, params_t><<<pass_grid, 32 * detail::backward_pass_warps, 0, stream>>>(p);
      KVTILE_CUDA_CHECK_LAUNCH();
    }
    // The K/V-outer kernel also runs without queries: it writes dK = dV = 0.
    if constexpr (sm90_capable) {
      if (sm90) {
        const dim3 g = detail::backward_sm90_grid<typename sm90_kernel_t::G>(a.kv.layout, max_kv);
        if (g.x > 0) {
          typename sm90_kernel_t::params kp;
          kp.p = p;
          kp.q = detail::make_dense_tma(p.q, p.q_layout, sm90_kernel_t::G::block_q);
          kp.d_o = detail::make_dense_tma(p.d_o, p.do_layout, sm90_kernel_t::G::block_q);
          kp.dq_acc = p.dq_acc != nullptr
                          ? detail::make_dq_acc_tma(p.dq_acc - std::int64_t(dq_pad_rows) * p.q_layout.heads * HeadDim,
                                                    w.rows + dq_pad_rows, p.q_layout.heads, HeadDim, sm90_kernel_t::G::block_q)
                          : CUtensorMap{};
          launch_smem(&detail::backward_sm90_entry<sm90_kernel_t>, g, sm90_kernel_t::G::threads, main_smem, stream, kp);
        }
      }
    }
    if (!sm90) {
      const dim3 g = detail::backward_grid<geometry>(a.kv.layout, max_kv);
      if (g.x > 0) launch_smem(&detail::backward_entry<kernel_t>, g, threads, shared_memory_bytes, stream, p);
    }
    if (!any_q) return;
    if (a.deterministic) {
      const dim3 gq(unsigned((max_q + dq_geometry::block_q - 1) / dq_geometry::block_q), unsigned(a.q.layout.heads),
                    unsigned(a.q.layout.batch));
      launch_smem(&detail::backward_dq_entry<dq_kernel_t>, gq, dq_geometry::threads, dq_shared_memory_bytes, stream, p);
    } else {
      detail::backward_postpass<T, HeadDim, params_t><<<pass_grid, 32 * detail::backward_pass_warps, 0, stream>>>(p);
      KVTILE_CUDA_CHECK_LAUNCH();
    }
  }

  static constexpr int sm90_warpgroups() {
    if constexpr (sm90_capable)
      return sm90_kernel_t::G::warpgroups;
    else
      return 0;
  }
  static constexpr std::size_t sm90_smem_bytes() {
    if constexpr (sm90_capable)
      return sm90_kernel_t::G::smem_bytes;
    else
      return 0;
  }

  struct layout_t {
    std::int64_t rows = 0;
    std::size_t dq_acc = 0, lse2 = 0, delta = 0, total = 0;
  };

  static std::size_t round_up(std::size_t x) { return (x + 255) / 256 * 256; }

  static layout_t workspace_layout(const arguments& a) {
    layout_t w;
    const auto& ql = a.q.layout;
    const std::int64_t per_seq = ql.indptr ? a.max_q_len : ql.len;
    w.rows = std::int64_t(ql.batch) * std::max<std::int64_t>(per_seq, 0);
    const std::size_t stats = round_up(std::size_t(w.rows) * std::size_t(ql.heads) * sizeof(float));
    // The fp32 dQ accumulator, after dq_pad_rows rows that the sm_90a kernel's tensor map starts
    // at (its reduction boxes never start before the map's first row).
    const std::size_t pad = a.deterministic ? 0 : round_up(std::size_t(dq_pad_rows) * ql.heads * HeadDim * sizeof(float));
    const std::size_t acc =
        a.deterministic ? 0 : pad + round_up(std::size_t(w.rows) * std::size_t(ql.heads) * HeadDim * sizeof(float));
    w.dq_acc = pad;
    w.lse2 = acc;
    w.delta = acc + stats;
    w.total = acc + 2 * stats;
    return w;
  }

  template <class Fn, class Params>
  static void launch_smem(Fn* fn, dim3 grid, int block, std::size_t smem, cudaStream_t stream, const Params& p) {
    if (smem > 48 * 1024)
      KVTILE_CUDA_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    fn<<<grid, block, smem, stream>>>(p);
    KVTILE_CUDA_CHECK_LAUNCH();
  }

  static bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }
};

// A rotary variant (rotary<M>, softcap<rotary<M>>: any variant with a rotation-free form,
// variant.hpp's rotary_stripped): the forward scored R(m) q . R(n) k, so the backward is that of
// the variant without its rotation over the rotated rows, whose dQ' and dK' are rotated back,
// dQ = R(m)^T dQ', dK = R(n)^T dK' (dV needs nothing). run() rotates Q and K once into the
// workspace (prefill/rotate.cuh, the rotate-once pass of cuda::prefill), runs the backward of
// the stripped variant over them, then rotates dQ and dK back in place: two launches more than
// the plain backward, on whichever kernels that one dispatches to.
template <backward_element T, int HeadDim, mask_policy Mask, tile_shape_type Tile>
  requires has_rotary<Mask>
class backward<T, HeadDim, Mask, Tile> {
  static_assert(!std::is_void_v<rotary_stripped_t<Mask>>,
                "cuda::backward: this rotary variant has no rotation-free form (rotary_stripped, variant.hpp), so "
                "its rotation cannot be taken out of the backward");
  using stripped_mask = rotary_stripped_t<Mask>;
  using inner = backward<T, HeadDim, stripped_mask, Tile>;

 public:
  using element = T;
  using mask = Mask;
  using tile = Tile;
  static constexpr int head_dim = HeadDim;
  static constexpr std::size_t shared_memory_bytes = inner::shared_memory_bytes;
  using arguments = detail::backward_arguments<T, typename Mask::params>;

  // The plain backward's checks on the stripped arguments, then the variant's (rotary_dim a
  // multiple of 32 for the rotate pass).
  static void check(const arguments& a) {
    inner::check(stripped(a, a.q.data, a.kv.k));
    check_variant<Mask>(a.mask_params, HeadDim);
    check_cuda_rotary<Mask>(a.mask_params, HeadDim);
  }

  static bool can_implement(const arguments& a) noexcept {
    return kvtile::detail::passes([&] { check(a); });
  }

  // The stripped backward's workspace, then the rotated Q and K (with the strides of q and kv).
  static std::size_t workspace_size(const arguments& a) {
    return inner_bytes(a) + detail::rotated_rows_bytes<T>(a.q.layout, q_len_bound(a)) +
           detail::rotated_rows_bytes<T>(a.kv.layout, kv_len_bound(a));
  }

  // The stripped backward's kernels; the reason names the rotate passes around them.
  static kernel_choice dispatch(const arguments& a) {
    kernel_choice c = inner::dispatch(stripped(a, a.q.data, a.kv.k));
    c.reason = std::string("a rotary variant: Q and K rotated once into the workspace, the backward of ") +
               stripped_mask::name + " over them, dQ and dK rotated back in place; " + c.reason;
    return c;
  }

  static void run(const arguments& a, void* workspace, cudaStream_t stream = nullptr) {
    launch(a, workspace, stream, true);
  }
  static void run_portable(const arguments& a, void* workspace, cudaStream_t stream = nullptr) {
    launch(a, workspace, stream, false);
  }

 private:
  static std::int64_t q_len_bound(const arguments& a) { return a.q.layout.indptr ? a.max_q_len : a.q.layout.len; }
  static std::int64_t kv_len_bound(const arguments& a) { return a.kv.layout.indptr ? a.max_kv_len : a.kv.layout.len; }
  static std::size_t inner_bytes(const arguments& a) {
    return (inner::workspace_size(stripped(a, a.q.data, a.kv.k)) + 255) / 256 * 256;
  }
  // The stripped backward's arguments over Q and K at q2 / k2 (the rest as given).
  static typename inner::arguments stripped(const arguments& a, const T* q2, const T* k2) {
    typename inner::arguments r;
    r.q = {q2, a.q.layout};
    r.kv = {k2, a.kv.v, a.kv.layout};
    r.o = a.o;
    r.d_o = a.d_o;
    r.lse = a.lse;
    r.dq = a.dq;
    r.dk = a.dk;
    r.dv = a.dv;
    r.mask_params = rotary_stripped<Mask>::params(a.mask_params);
    r.scale = a.scale;
    r.max_q_len = a.max_q_len;
    r.max_kv_len = a.max_kv_len;
    r.deterministic = a.deterministic;
    return r;
  }
  static void launch(const arguments& a, void* workspace, cudaStream_t stream, bool allow_sm90) {
    check(a);
    const ragged_layout &ql = a.q.layout, &kl = a.kv.layout;
    if (ql.batch == 0) return;
    const std::size_t need = workspace_size(a);
    KVTILE_REQUIRE(workspace != nullptr || need == 0, errc::invalid_argument, "backward: workspace of ", need,
                   " bytes (workspace_size) is null");
    KVTILE_REQUIRE((reinterpret_cast<std::uintptr_t>(workspace) & 255u) == 0, errc::invalid_argument,
                   "backward: workspace must be 256-byte aligned, got ", workspace);
    auto* ws = static_cast<unsigned char*>(workspace);
    T* q2 = reinterpret_cast<T*>(ws + inner_bytes(a));
    T* k2 = reinterpret_cast<T*>(ws + inner_bytes(a) + detail::rotated_rows_bytes<T>(ql, q_len_bound(a)));
    detail::launch_rotate_rows<T, HeadDim, Mask>({a.q, dense_tensor<T>{q2, ql}},
                                                 {dense_tensor<const T>{a.kv.k, kl}, dense_tensor<T>{k2, kl}}, ql, kl,
                                                 q_len_bound(a), kv_len_bound(a), a.mask_params, stream);
    const auto r = stripped(a, q2, k2);
    if (allow_sm90)
      inner::run(r, ws, stream);
    else
      inner::run_portable(r, ws, stream);
    const ragged_layout &gl = a.dq.layout, &kgl = a.dk.layout;
    detail::launch_rotate_rows<T, HeadDim, Mask, true>(
        {dense_tensor<const T>{a.dq.data, gl}, a.dq}, {dense_tensor<const T>{a.dk.data, kgl}, a.dk}, gl, kgl,
        q_len_bound(a), kv_len_bound(a), a.mask_params, stream);
  }
};

}  // namespace attention::cuda
KVTILE_NAMESPACE_END
