// kvtile/attention/cuda/prefill.cuh: prefill (forward) attention on NVIDIA GPUs (sm_80+).
// On Hopper (compute capability 9.x, binary with sm_90a code) run() hands head dims 64 and 128
// to the sm_90a kernels of prefill_sm90.cuh, with any mask policy (the library's or the user's):
// the warp-specialised TMA kernel (prefill_sm90/ws_kernel.cuh) for its tiles and the default
// tile on tensors a tensor map can describe, the cp.async wgmma kernel for its tiles and for
// varlen layouts; the user's tile where one of them takes it, the default where the user kept
// the default (sm90_dispatch). Everything else runs the mma.sync kernel of this file, as does
// run_portable() always. dispatch(args) says which kernel run() takes and why, and every run
// reports it to the dispatch log (dispatch.hpp).
//
//   using kernel = kvtile::attention::cuda::prefill<kvtile::bfloat16, 128, causal_mask>;
//   kernel::arguments args{q, kv, o, lse, {}, scale};
//   kernel::check(args);                        // kvtile::error naming the bad value
//   std::size_t ws = kernel::workspace_size(args);  // 0 but for rotary variants (rotate_once)
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
#include <string>
#include <type_traits>

#include <cuda_runtime.h>

#include "kvtile/attention/cuda/dispatch.hpp"
#include "kvtile/attention/cuda/prefill/kernel.cuh"
#include "kvtile/attention/cuda/prefill/rotate_launch.cuh"
#include "kvtile/attention/cuda/prefill_sm90/kernel.cuh"
#include "kvtile/attention/cuda/prefill_sm90/ws_kernel.cuh"
#include "kvtile/attention/cuda/scores.cuh"
#include "kvtile/attention/dense_view.hpp"
#include "kvtile/attention/mask.hpp"
#include "kvtile/attention/tile_shape.hpp"
#include "kvtile/core/cuda_check.cuh"
#include "kvtile/core/error.hpp"
#include "kvtile/core/numeric.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda {

// Default tiles per head dim of the mma.sync kernel (tuning.hpp, with the sweep behind them).
template <int HeadDim>
using default_prefill_tile_t = typename tuning::prefill_tile<HeadDim>::type;

template <class T>
concept prefill_element = std::is_same_v<T, kvtile::half> || std::is_same_v<T, kvtile::bfloat16>;

template <prefill_element T, int HeadDim, mask_policy Mask = no_mask, tile_shape_type Tile = default_prefill_tile_t<HeadDim>>
class prefill;

namespace detail {
// The prefill over Q and K already rotated: the same tile, the variant without its rotation
// (variant.hpp, rotary_stripped); void where the variant has no such form.
template <class T, int HeadDim, class Stripped, class Tile>
struct rotated_prefill {
  using type = void;
};
template <class T, int HeadDim, class Stripped, class Tile>
  requires mask_policy<Stripped>
struct rotated_prefill<T, HeadDim, Stripped, Tile> {
  using type = prefill<T, HeadDim, Stripped, Tile>;
};

}  // namespace detail

template <prefill_element T, int HeadDim, mask_policy Mask, tile_shape_type Tile>
class prefill {
 public:
  using element = T;
  using mask = Mask;
  using tile = Tile;
  static constexpr int head_dim = HeadDim;

 private:
  static constexpr bool default_tile = std::is_same_v<Tile, default_prefill_tile_t<HeadDim>>;

 public:
  // Whether the mma.sync kernel (sm_80+) takes this tile.
  static constexpr bool portable_tile = detail::prefill_tile_ok<HeadDim, Tile>;
  // The tile the sm_90a kernels run on Hopper: the user's where one of them takes it (a
  // warp-specialised tile or a cp.async one), the default where the user kept the default; void
  // where they cannot run this configuration. A rotary variant runs on the warp-specialised
  // kernel only (its producer warpgroup rotates the K tiles in shared memory; the cp.async
  // kernel has no warps to spare for it).
  using sm90_tile = std::conditional_t<
      detail::prefill_sm90_ws_tile_ok<HeadDim, Tile> || (!has_rotary<Mask> && detail::prefill_sm90_tile_ok<HeadDim, Tile>),
      Tile,
      std::conditional_t<default_tile && (HeadDim == 64 || HeadDim == 128 || HeadDim == 256),
                         std::conditional_t<has_rotary<Mask>, typename tuning::prefill_sm90_rotary_tile<HeadDim>::type,
                                            detail::sm90_default_tile_t<HeadDim>>,
                         void>>;
  // Whether run() hands this configuration to the sm_90a kernel on a Hopper device running this
  // binary's sm_90a code. Any mask policy goes there: the kernel asks the mask, never names it.
  static constexpr bool sm90_dispatch = !std::is_void_v<sm90_tile>;
  // A rotary variant the library can take the rotation out of (rotary<M>, softcap<rotary<M>>):
  // run() with a workspace of workspace_size(args) bytes (fixed-length K/V) rotates Q and K once
  // into it (prefill/rotate.cuh) and runs `rotated`, this prefill without the rotation -- on
  // Hopper the sm_90a kernels -- over them. Without a workspace the kernel rotates each tile as
  // it loads it (every CTA that reads a key rotates it again): on Hopper the warp-specialised
  // kernel, in shared memory beside its GEMMs; elsewhere the mma.sync kernel.
  using rotated = typename detail::rotated_prefill<T, HeadDim, rotary_stripped_t<Mask>, Tile>::type;
  static constexpr bool rotate_once = has_rotary<Mask> && !std::is_void_v<rotated>;
  static_assert(portable_tile || sm90_dispatch,
                "prefill: this tile fits neither kernel. The mma.sync kernel needs BlockQ a multiple of 16 * Warps, "
                "BlockKV a multiple of 16 and Stages >= 2; the sm_90a kernels need Stages >= 2 and Warps a multiple "
                "of 4, and either BlockQ = 16 * (Warps - 4), BlockKV 64, 128, 176 or 192, D 64, 128 or 256 "
                "(warp-specialised: a producer warpgroup) or BlockQ = 16 * Warps, BlockKV 64 or 128, D 64 or 128 "
                "(cp.async)");

 private:
  // The mma.sync kernel; an sm_90a-only tile instantiates it with the default tile, never run.
  using kernel_t = detail::prefill_kernel<T, HeadDim, std::conditional_t<portable_tile, Tile, default_prefill_tile_t<HeadDim>>, Mask>;
  using geometry = typename kernel_t::G;

 public:
  // Of the mma.sync kernel (sm_80+).
  static constexpr std::size_t shared_memory_bytes = geometry::smem_bytes;
  static constexpr int threads = geometry::threads;

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
    check_variant<Mask>(a.mask_params, HeadDim);
    check_cuda_rotary<Mask>(a.mask_params, HeadDim);
  }

  // An empty batch, or fixed-length q of 0 tokens: run() does nothing. (A varlen batch's lengths
  // live on the device: its q_len are not known here, so it needs pointers unless batch is 0.)
  static bool nothing_to_compute(const arguments& a) {
    const auto& ql = a.q.layout;
    return ql.batch == 0 || (!ql.indptr && ql.len == 0);
  }

  static bool can_implement(const arguments& a) noexcept {
    return kvtile::detail::passes([&] { check(a); });
  }

  // Bytes of workspace run() uses: the rotated Q and K of the rotate-once path (with the strides
  // of q and kv, each 256-byte aligned), else 0 (also where the sm_90a kernel's own rotation is
  // the faster: short sequences on Hopper, fused_is_faster).
  static std::size_t workspace_size(const arguments& a) {
    if (!rotates_once(a)) return 0;
    return rotated_q_bytes(a) + rotated_k_bytes(a);
  }

  static dim3 grid(const arguments& a) {
    return detail::prefill_grid(a.q.layout, detail::prefill_max_q_len(a), Tile::block_q);
  }

  // Checks, raises the kernel's shared-memory limit where it needs more than 48 KB, launches on
  // `stream`. Asynchronous: errors of the launch itself throw here, errors while running show
  // at the next synchronisation.
  // On a Hopper device with this binary's sm_90a code and sm90_dispatch, the wgmma kernel runs.
  // A rotary variant given a workspace of workspace_size(a) > 0 bytes: Q and K rotated once into
  // it, then the prefill without the rotation (rotate_once).
  static void run(const arguments& a, void* workspace = nullptr, cudaStream_t stream = nullptr) {
    if (workspace != nullptr && rotates_once(a)) return rotate_and_run(a, workspace, stream, true);
    launch(a, stream, true);
  }

  // The mma.sync kernel on every device, never the sm_90a one (to compare the two paths).
  static void run_portable(const arguments& a, void* workspace = nullptr, cudaStream_t stream = nullptr) {
    if (workspace != nullptr && rotates_once(a, false)) return rotate_and_run(a, workspace, stream, false);
    launch(a, stream, false);
  }

  // Which kernel run(a, workspace) launches on the current device, and why (nothing is launched).
  static kernel_choice dispatch(const arguments& a, const void* workspace = nullptr) {
    if constexpr (rotate_once) {
      if (workspace != nullptr && rotates_once(a)) {
        kernel_choice c = rotated::dispatch(rotated_arguments(a, a.q.data, a.kv.k));
        c.reason = "a rotary variant: Q and K rotated once into the workspace, then " + c.reason;
        return c;
      }
    }
    int device = 0;
    KVTILE_CUDA_CHECK(cudaGetDevice(&device));
    return choose(device, true, &a);
  }

 private:
  static constexpr const char* portable_name = "prefill (mma.sync, sm_80+)";

  // The sm_90a tile for short queries where the user kept the default (tuning.hpp).
  using short_tile = typename tuning::prefill_sm90_short_tile<HeadDim>::type;
  static constexpr bool has_short_tile = default_tile && !std::is_void_v<short_tile>;
  static bool short_queries(const arguments& a) {
    if constexpr (has_short_tile) return detail::prefill_max_q_len(a) <= tuning::prefill_sm90_short_q;
    else return false;
  }

  template <class Tl>
  static std::string tile_text() {
    return "<" + std::to_string(Tl::block_q) + ", " + std::to_string(Tl::block_kv) + ", " + std::to_string(Tl::warps) +
           ", " + std::to_string(Tl::stages) + ">";
  }

  // The kernel for `device` (and the arguments, when given) and the reason, as text (built only
  // when asked or logged).
  static kernel_choice choose(int device, bool allow_sm90, const arguments* a = nullptr) {
    kernel_choice c;
    c.entry = "cuda::prefill";
    const std::string d = "D " + std::to_string(HeadDim) + ", mask " + Mask::name;
    if constexpr (sm90_dispatch) {
      if (!allow_sm90) {
        c.kernel = portable_name;
        c.reason = "run_portable asked for the mma.sync kernel; " + d;
      } else if (kvtile::detail::compute_capability_major(device) != 9) {
        c.kernel = portable_name;
        c.reason = "device " + std::to_string(device) + " is not compute capability 9.x; " + d;
      } else if (!detail::sm90_kernels_available(device)) {
        c.kernel = portable_name;
        c.reason = "this binary has no sm_90a code (build for CUDA architecture 90a); " + d;
      } else if (a != nullptr && short_queries(*a)) {
        if constexpr (has_short_tile) {
          using sm90_short = detail::sm90_prefill_kernels<T, HeadDim, short_tile, Mask>;
          const bool tma = sm90_short::tma(detail::make_prefill_params<T, Mask, HeadDim>(*a));
          c.kernel = sm90_short::name(tma);
          c.reason = d + ", tile " + tile_text<short_tile>() + " (the default for queries of at most " +
                     std::to_string(tuning::prefill_sm90_short_q) + " tokens at this head dim)";
          if (!tma) c.reason += "; " + sm90_short::why_not_tma() + " " + tile_text<typename sm90_short::cp_async_tile>();
        }
      } else {
        using sm90 = detail::sm90_prefill_kernels<T, HeadDim, sm90_tile, Mask>;
        const bool tma = a == nullptr || sm90::tma(detail::make_prefill_params<T, Mask, HeadDim>(*a));
        if (!tma && !sm90::has_cp_async) {
          c.kernel = portable_name;
          c.reason = d + "; " + sm90::why_not_tma() + ", tile " + tile_text<Tile>();
        } else {
          c.kernel = sm90::name(tma);
          c.reason = d + ", tile " + tile_text<sm90_tile>() + (default_tile ? " (the default)" : " (the user's)");
          if (sm90::warp_specialised && !tma)
            c.reason += "; " + sm90::why_not_tma() + " " + tile_text<typename sm90::cp_async_tile>();
        }
      }
    } else {
      c.kernel = portable_name;
      if constexpr (HeadDim != 64 && HeadDim != 128 && HeadDim != 256)
        c.reason = "the sm_90a kernels take head dims 64, 128 and 256, not " + std::to_string(HeadDim) + "; " + d;
      else if constexpr (has_rotary<Mask>)
        c.reason = "tile " + tile_text<Tile>() +
                   " is not a warp-specialised sm_90a tile, the one sm_90a kernel that rotates keys (BlockKV 64, 128, 176 "
                   "or 192, Warps a multiple of 4, BlockQ = 16 * (Warps - 4)); " + d;
      else
        c.reason = "tile " + tile_text<Tile>() +
                   " is not an sm_90a tile (BlockKV 64 or 128, or 176 or 192 warp-specialised, Warps a multiple of 4, BlockQ = 16 * Warps or "
                   "16 * (Warps - 4)); " + d;
    }
    return c;
  }

  static void launch(const arguments& a, cudaStream_t stream, bool allow_sm90) {
    check(a);
    if (nothing_to_compute(a)) return;
    int device = 0, major = 0, smem_optin = 0;
    KVTILE_CUDA_CHECK(cudaGetDevice(&device));
    KVTILE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    KVTILE_REQUIRE(major >= 8, errc::unsupported, "prefill needs compute capability 8.0 or newer, device ", device,
                   " has major ", major);
    const dim3 g = grid(a);
    if (g.x == 0 || g.y == 0 || g.z == 0) return;
    const typename kernel_t::params p = detail::make_prefill_params<T, Mask, HeadDim>(a);
    if constexpr (sm90_dispatch) {
      using sm90 = detail::sm90_prefill_kernels<T, HeadDim, sm90_tile, Mask>;
      if (allow_sm90 && major == 9 && detail::sm90_kernels_available(device)) {
        if constexpr (has_short_tile) {
          using sm90_short = detail::sm90_prefill_kernels<T, HeadDim, short_tile, Mask>;
          if (short_queries(a) && sm90_short::can_launch(p)) {
            if (dispatch_log_enabled()) log_dispatch(choose(device, allow_sm90, &a));
            sm90_short::launch(p, detail::prefill_max_q_len(a), device, stream);
            return;
          }
        }
        if (sm90::can_launch(p)) {
          if (dispatch_log_enabled()) log_dispatch(choose(device, allow_sm90, &a));
          sm90::launch(p, detail::prefill_max_q_len(a), device, stream);
          return;
        }
      }
    }
    KVTILE_REQUIRE(portable_tile, errc::unsupported, "prefill tile ", tile_text<Tile>(), " with D=", HeadDim,
                   " runs only on the sm_90a kernel, and ", choose(device, allow_sm90, &a).reason);
    KVTILE_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    KVTILE_REQUIRE(shared_memory_bytes <= std::size_t(smem_optin), errc::unsupported, "prefill tile ", tile_text<Tile>(),
                   " with D=", HeadDim, " needs ", shared_memory_bytes, " bytes of shared memory, device ", device,
                   " allows ", smem_optin);
    if (dispatch_log_enabled()) log_dispatch(choose(device, allow_sm90, &a));
    auto* fn = &detail::prefill_entry<kernel_t>;
    if (shared_memory_bytes > 48 * 1024)
      KVTILE_CUDA_CHECK(
          cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared_memory_bytes)));
    fn<<<g, threads, shared_memory_bytes, stream>>>(p);
    KVTILE_CUDA_CHECK_LAUNCH();
  }

  static bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

  // ---- the rotate-once path ------------------------------------------------------------------
  // Whether run() with a workspace takes it: a rotary variant with a rotation-free form, K/V of
  // fixed length (a varlen K's size is on the device), something to compute -- and not where
  // the warp-specialised sm_90a kernel rotating in shared memory is the faster (fused_is_faster).
  // run_portable (allow_sm90 false) rotates once wherever it can.
  static bool rotates_once(const arguments& a, bool allow_sm90 = true) {
    if constexpr (rotate_once)
      return a.kv.layout.indptr == nullptr && !nothing_to_compute(a) && !(allow_sm90 && fused_is_faster(a));
    else return (void)a, (void)allow_sm90, false;
  }
  // Keys of at most tuning::prefill_rotary_fused_max_kv a sequence, on a device whose sm_90a
  // code runs the warp-specialised kernel for these tensors: there the rotate pass's fixed cost
  // is more than what the kernel's own rotation costs.
  static bool fused_is_faster(const arguments& a) {
    if constexpr (sm90_dispatch) {
      if (a.kv.layout.len > tuning::prefill_rotary_fused_max_kv) return false;
      int device = 0;
      if (cudaGetDevice(&device) != cudaSuccess) {
        (void)cudaGetLastError();
        return false;
      }
      return kvtile::detail::compute_capability_major(device) == 9 && detail::sm90_kernels_available(device) &&
             detail::sm90_prefill_kernels<T, HeadDim, sm90_tile, Mask>::can_launch(
                 detail::make_prefill_params<T, Mask, HeadDim>(a));
    } else {
      return (void)a, false;
    }
  }
  // Tokens of a sequence of q: its length (fixed), at most max_q_len (varlen).
  static std::int64_t q_len_bound(const arguments& a) { return a.q.layout.indptr ? a.max_q_len : a.q.layout.len; }
  static std::size_t rotated_q_bytes(const arguments& a) { return detail::rotated_rows_bytes<T>(a.q.layout, q_len_bound(a)); }
  static std::size_t rotated_k_bytes(const arguments& a) { return detail::rotated_rows_bytes<T>(a.kv.layout, a.kv.layout.len); }
  // The arguments of `rotated` over Q and K at q2 / k2 (V, O, LSE and the rest as given).
  static auto rotated_arguments(const arguments& a, const T* q2, const T* k2) {
    typename rotated::arguments r;
    r.q = {q2, a.q.layout};
    r.kv = {k2, a.kv.v, a.kv.layout};
    r.o = a.o;
    r.lse = a.lse;
    r.mask_params = rotary_stripped<Mask>::params(a.mask_params);
    r.scale = a.scale;
    r.max_q_len = a.max_q_len;
    return r;
  }
  static void rotate_and_run(const arguments& a, void* workspace, cudaStream_t stream, bool allow_sm90) {
    if constexpr (rotate_once) {
      check(a);
      KVTILE_REQUIRE(aligned16(workspace), errc::invalid_argument, "prefill: the workspace must be 16-byte aligned");
      auto* ws = static_cast<unsigned char*>(workspace);
      T* q2 = reinterpret_cast<T*>(ws);
      T* k2 = reinterpret_cast<T*>(ws + rotated_q_bytes(a));
      const ragged_layout &ql = a.q.layout, &kl = a.kv.layout;
      detail::launch_rotate_rows<T, HeadDim, Mask>({a.q, dense_tensor<T>{q2, ql}},
                                                   {dense_tensor<const T>{a.kv.k, kl}, dense_tensor<T>{k2, kl}}, ql, kl,
                                                   q_len_bound(a), kl.len, a.mask_params, stream);
      const auto r = rotated_arguments(a, q2, k2);
      if (allow_sm90)
        rotated::run(r, nullptr, stream);
      else
        rotated::run_portable(r, nullptr, stream);
    } else {
      (void)a, (void)workspace, (void)stream, (void)allow_sm90;
    }
  }
};

}  // namespace attention::cuda
KVTILE_NAMESPACE_END
