// kvtile/attention/cuda/prefill.cuh: prefill (forward) attention on NVIDIA GPUs (sm_80+).
// On Hopper (compute capability 9.x, binary with sm_90a code) run() hands head dims 64 and
// 128 with the default tile and the no / causal / sliding-window masks to the wgmma kernel of
// prefill_sm90.cuh (sm90_dispatch);
// run_portable() always takes the mma.sync kernel of this file.
//
//   using kernel = kvtile::attention::cuda::prefill<kvtile::bfloat16, 128, causal_mask>;
//   kernel::arguments args{q, kv, o, lse, {}, scale};
//   kernel::check(args);                        // kvtile::error naming the bad value
//   std::size_t ws = kernel::workspace_size(args);  // 0 today; the protocol keeps the slot
//   kernel::run(args, workspace, stream);
//
// Template parameters: element type (kvtile::half, kvtile::bfloat16), head dim (a multiple of
// 16 up to 256), mask policy (no_mask, causal_mask, sliding_window_mask or any type meeting
// mask_policy) and tile shape (tile_shape<BlockQ, BlockKV, Warps, Stages>, default per head
// dim below). Runtime: batch, query / KV heads (any GQA group), fixed or varlen lengths, the
// mask's parameters and the softmax scale.
//
// Shapes: q, o [batch, q_len, qo_heads, D] (or varlen: packed rows with a device indptr),
// kv [batch, kv_len, kv_heads, D] (fixed or varlen, device indptr), lse [rows, qo_heads]
// (natural log, -inf for a row that sees no key; may be null). Queries are aligned to the
// bottom right of the keys (mask.hpp).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include <cuda_runtime.h>

#include "kvtile/attention/cuda/prefill/kernel.cuh"
#include "kvtile/attention/cuda/prefill_sm90/kernel.cuh"
#include "kvtile/attention/dense_view.hpp"
#include "kvtile/attention/mask.hpp"
#include "kvtile/attention/tile_shape.hpp"
#include "kvtile/core/cuda_check.cuh"
#include "kvtile/core/error.hpp"
#include "kvtile/core/numeric.hpp"

// 1: on a compute capability 9.x device running this binary's sm_90a code, prefill with the
// default tile and head dim 64 or 128 runs the wgmma kernel of prefill_sm90.cuh; 0: always
// the mma.sync kernel below.
#ifndef KVTILE_PREFILL_SM90_DISPATCH
#define KVTILE_PREFILL_SM90_DISPATCH 1
#endif

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda {

// Default tiles per head dim, chosen by the tile sweep of bench/prefill_bench.cu on an
// H100 80GB HBM3 (bf16, 16k tokens, hidden 2048); docs/prefill.md has the numbers.
template <int HeadDim>
struct default_prefill_tile {
  using type = tile_shape<128, 64, 4, 2>;  // D 80..128
};
template <int HeadDim>
  requires(HeadDim <= 64)
struct default_prefill_tile<HeadDim> {
  using type = tile_shape<128, 64, 4, 2>;
};
template <int HeadDim>
  requires(HeadDim > 128)
struct default_prefill_tile<HeadDim> {
  using type = tile_shape<64, 32, 4, 2>;
};
template <int HeadDim>
using default_prefill_tile_t = typename default_prefill_tile<HeadDim>::type;

template <class T>
concept prefill_element = std::is_same_v<T, kvtile::half> || std::is_same_v<T, kvtile::bfloat16>;

template <prefill_element T, int HeadDim, mask_policy Mask = no_mask, tile_shape_type Tile = default_prefill_tile_t<HeadDim>>
class prefill {
 public:
  using element = T;
  using mask = Mask;
  using tile = Tile;
  static constexpr int head_dim = HeadDim;

 private:
  using kernel_t = detail::prefill_kernel<T, HeadDim, Tile, Mask>;
  using geometry = typename kernel_t::G;

 public:
  // Of the mma.sync kernel (sm_80+); see sm90_dispatch.
  static constexpr std::size_t shared_memory_bytes = geometry::smem_bytes;
  static constexpr int threads = geometry::threads;
  // Whether run() hands this configuration to the sm_90a wgmma kernel on Hopper (default tile,
  // D 64 or 128, the masks verified on that kernel on a GPU: none, causal, sliding window); the mma.sync
  // kernel stays the path for every other configuration, device and binary.
  static constexpr bool sm90_dispatch = KVTILE_PREFILL_SM90_DISPATCH && (HeadDim == 64 || HeadDim == 128) &&
                                        std::is_same_v<Tile, default_prefill_tile_t<HeadDim>> &&
                                        (std::is_same_v<Mask, no_mask> || std::is_same_v<Mask, causal_mask> ||
                                         std::is_same_v<Mask, sliding_window_mask>);

  struct arguments {
    dense_tensor<const T> q;  // [batch, q_len, qo_heads, HeadDim]
    dense_kv<const T> kv;     // [batch, kv_len, kv_heads, HeadDim]
    dense_tensor<T> o;        // same shape as q
    float* lse = nullptr;     // [rows, qo_heads], natural log; null: not written
    typename Mask::params mask_params{};
    float scale = 0.f;           // softmax scale; 0 means 1 / sqrt(HeadDim)
    std::int32_t max_q_len = 0;  // varlen q only: an upper bound on every q_len (sizes the grid)
  };

  // Throws kvtile::error (invalid_argument) naming the first value the kernel cannot accept.
  // Reads nothing behind the pointers (indptr arrays live on the device).
  static void check(const arguments& a) {
    const ragged_layout &ql = a.q.layout, &kl = a.kv.layout, &ol = a.o.layout;
    KVTILE_REQUIRE(ql.head_dim == HeadDim, errc::invalid_argument, "prefill<D=", HeadDim, ">: q head_dim is ",
                   ql.head_dim);
    KVTILE_REQUIRE(kl.head_dim == HeadDim, errc::invalid_argument, "prefill<D=", HeadDim, ">: kv head_dim is ",
                   kl.head_dim);
    KVTILE_REQUIRE(ol.head_dim == HeadDim, errc::invalid_argument, "prefill<D=", HeadDim, ">: o head_dim is ",
                   ol.head_dim);
    KVTILE_REQUIRE(ql.batch >= 0 && ql.batch <= 65535, errc::invalid_argument, "prefill: batch must be in [0, 65535], got ",
                   ql.batch);
    KVTILE_REQUIRE(kl.batch == ql.batch, errc::invalid_argument, "prefill: kv batch ", kl.batch, " differs from q batch ",
                   ql.batch);
    KVTILE_REQUIRE(ol.batch == ql.batch, errc::invalid_argument, "prefill: o batch ", ol.batch, " differs from q batch ",
                   ql.batch);
    KVTILE_REQUIRE(ql.heads > 0 && ql.heads <= 65535, errc::invalid_argument,
                   "prefill: query heads must be in [1, 65535], got ", ql.heads);
    KVTILE_REQUIRE(kl.heads > 0 && ql.heads % kl.heads == 0, errc::invalid_argument, "prefill: query heads (", ql.heads,
                   ") must be a positive multiple of KV heads (", kl.heads, ")");
    KVTILE_REQUIRE(ol.heads == ql.heads, errc::invalid_argument, "prefill: o heads ", ol.heads, " differ from q heads ",
                   ql.heads);
    KVTILE_REQUIRE(ol.indptr == ql.indptr, errc::invalid_argument,
                   "prefill: o must use the same indptr as q (varlen rows are shared)");
    if (ql.indptr == nullptr) {
      KVTILE_REQUIRE(ql.len >= 0, errc::invalid_argument, "prefill: q_len must be >= 0, got ", ql.len);
      KVTILE_REQUIRE(ol.len == ql.len, errc::invalid_argument, "prefill: o len ", ol.len, " differs from q_len ", ql.len);
    } else {
      KVTILE_REQUIRE(a.max_q_len > 0 || ql.batch == 0, errc::invalid_argument,
                     "prefill: varlen q needs max_q_len > 0 (an upper bound on every q_len), got ", a.max_q_len);
    }
    if (kl.indptr == nullptr)
      KVTILE_REQUIRE(kl.len >= 0, errc::invalid_argument, "prefill: kv_len must be >= 0, got ", kl.len);
    if (nothing_to_compute(a)) return;  // no query token: null pointers (zero-element tensors) allowed
    KVTILE_REQUIRE(a.q.data && a.kv.k && a.kv.v && a.o.data, errc::invalid_argument,
                   "prefill: q, k, v and o must be non-null");
    KVTILE_REQUIRE(aligned16(a.q.data) && aligned16(a.kv.k) && aligned16(a.kv.v) && aligned16(a.o.data),
                   errc::invalid_argument, "prefill: q, k, v and o must be 16-byte aligned");
    constexpr std::int64_t vec = 16 / sizeof(T);
    for (const ragged_layout* l : {&ql, &kl, &ol})
      KVTILE_REQUIRE(l->stride_token % vec == 0 && l->stride_head % vec == 0 && l->stride_batch % vec == 0,
                     errc::invalid_argument, "prefill: strides must be multiples of ", vec,
                     " elements (16 bytes), got token ", l->stride_token, ", head ", l->stride_head, ", batch ",
                     l->stride_batch);
    KVTILE_REQUIRE(std::isfinite(a.scale) && a.scale >= 0.f, errc::invalid_argument,
                   "prefill: softmax scale must be finite and positive (0 = 1/sqrt(D)), got ", a.scale);
  }

  // An empty batch, or fixed-length q of 0 tokens: run() does nothing. (A varlen batch's lengths
  // live on the device: its q_len are not known here, so it needs pointers unless batch is 0.)
  static bool nothing_to_compute(const arguments& a) {
    const auto& ql = a.q.layout;
    return ql.batch == 0 || (!ql.indptr && ql.len == 0);
  }

  static bool can_implement(const arguments& a) noexcept {
    try {
      check(a);
      return true;
    } catch (...) {
      return false;
    }
  }

  static std::size_t workspace_size(const arguments&) { return 0; }

  static dim3 grid(const arguments& a) {
    return detail::prefill_grid(a.q.layout, detail::prefill_max_q_len(a), Tile::block_q);
  }

  // Checks, raises the kernel's shared-memory limit where it needs more than 48 KB, launches on
  // `stream`. Asynchronous: errors of the launch itself throw here, errors while running show
  // at the next synchronisation.
  // On a Hopper device with this binary's sm_90a code and sm90_dispatch, the wgmma kernel runs.
  static void run(const arguments& a, void* workspace = nullptr, cudaStream_t stream = nullptr) {
    (void)workspace;
    launch(a, stream, true);
  }

  // The mma.sync kernel on every device, never the sm_90a one (to compare the two paths).
  static void run_portable(const arguments& a, void* workspace = nullptr, cudaStream_t stream = nullptr) {
    (void)workspace;
    launch(a, stream, false);
  }

 private:
  static void launch(const arguments& a, cudaStream_t stream, bool allow_sm90) {
    check(a);
    if (nothing_to_compute(a)) return;
    int device = 0, major = 0, smem_optin = 0;
    KVTILE_CUDA_CHECK(cudaGetDevice(&device));
    KVTILE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    KVTILE_REQUIRE(major >= 8, errc::unsupported, "prefill needs compute capability 8.0 or newer, device ", device,
                   " has major ", major);
    KVTILE_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    KVTILE_REQUIRE(shared_memory_bytes <= std::size_t(smem_optin), errc::unsupported, "prefill tile <",
                   Tile::block_q, ", ", Tile::block_kv, ", ", Tile::warps, ", ", Tile::stages, "> with D=", HeadDim,
                   " needs ", shared_memory_bytes, " bytes of shared memory, device ", device, " allows ", smem_optin);
    const dim3 g = grid(a);
    if (g.x == 0 || g.y == 0 || g.z == 0) return;
    auto* fn = &detail::prefill_entry<kernel_t>;
    if (shared_memory_bytes > 48 * 1024)
      KVTILE_CUDA_CHECK(
          cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared_memory_bytes)));
    const typename kernel_t::params p = detail::make_prefill_params<T, Mask, HeadDim>(a);
    if constexpr (sm90_dispatch) {
      if (allow_sm90 && major == 9 && detail::sm90_kernels_available(device)) {
        using sm90_kernel = detail::prefill_sm90_kernel<T, HeadDim, detail::sm90_default_tile_t<HeadDim>, Mask>;
        detail::launch_prefill_sm90<sm90_kernel>(p, detail::prefill_max_q_len(a), device, stream);
        return;
      }
    }
    fn<<<g, threads, shared_memory_bytes, stream>>>(p);
    KVTILE_CUDA_CHECK_LAUNCH();
  }

  static bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }
};

}  // namespace attention::cuda
KVTILE_NAMESPACE_END
