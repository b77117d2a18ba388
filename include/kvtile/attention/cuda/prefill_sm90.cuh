// kvtile/attention/cuda/prefill_sm90.cuh: prefill (forward) attention for Hopper (compute
// capability 9.x, binaries built for sm_90a), on warpgroup MMA (wgmma).
//
//   using kernel = kvtile::attention::cuda::prefill_sm90<kvtile::bfloat16, 128, causal_mask>;
//   kernel::arguments args{q, kv, o, lse, {}, scale};   // the same struct as cuda::prefill
//   if (kernel::can_implement(args)) kernel::run(args, nullptr, stream);
//
// Same arguments, shapes and protocol as cuda::prefill (prefill.cuh): check, can_implement,
// workspace_size (0), run. Head dim 64 or 128 (and 256 on the warp-specialised kernel, fixed
// length only), bf16 or fp16, any mask policy, GQA, fixed or
// varlen lengths, optional LSE. Two kernels, chosen by the tile:
//   warp-specialised (the default): tile_shape<64 * C, 64 or 128, 4 * (C + 1), Stages>, a TMA
//     producer warpgroup and C consumer warpgroups of 64 query rows (prefill_sm90/ws_kernel.cuh);
//     on tensors a tensor map cannot describe (varlen layouts) the cp.async kernel runs instead,
//     with its default tile, and the dispatch log says so;
//   cp.async: tile_shape<64 * W / 4, 64 or 128, W, Stages>, W / 4 warpgroups that load their
//     own tiles (prefill_sm90/kernel.cuh).
//
// can_implement is false, and run throws kvtile::error (unsupported), on a device that is not
// compute capability 9.x or when this binary carries no sm_90a code for it (compile with
// -gencode=arch=compute_90a,code=sm_90a, CMake architecture "90a"). The first call per device
// reads one word from the module (a synchronous copy), then caches the answer.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "kvtile/attention/cuda/prefill.cuh"
#include "kvtile/attention/cuda/prefill_sm90/kernel.cuh"
#include "kvtile/attention/cuda/prefill_sm90/ws_kernel.cuh"
#include "kvtile/attention/mask.hpp"
#include "kvtile/attention/tile_shape.hpp"
#include "kvtile/core/cuda_check.cuh"
#include "kvtile/core/error.hpp"
#include "kvtile/core/numeric.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda {

// Default tiles of the sm_90a kernel (tile sweep of bench/prefill_bench.cu, docs/prefill.md).
template <int HeadDim>
using default_prefill_sm90_tile_t = detail::sm90_default_tile_t<HeadDim>;

template <prefill_element T, int HeadDim, mask_policy Mask = no_mask,
          tile_shape_type Tile = default_prefill_sm90_tile_t<HeadDim>>
class prefill_sm90 {
  using portable = prefill<T, HeadDim, Mask>;  // owns the arguments and their checks
  using kernels = detail::sm90_prefill_kernels<T, HeadDim, Tile, Mask>;
  static_assert(detail::prefill_sm90_ws_tile_ok<HeadDim, Tile> || detail::prefill_sm90_tile_ok<HeadDim, Tile>,
                "prefill_sm90: head dim 64 or 128 (256 warp-specialised); BlockKV 64 or 128 (176, 192 warp-specialised), "
                "Stages >= 2, Warps a multiple of 4 with "
                "BlockQ = 16 * (Warps - 4) (warp-specialised) or BlockQ = 16 * Warps (cp.async)");

 public:
  using element = T;
  using mask = Mask;
  using tile = Tile;
  using arguments = typename portable::arguments;
  static constexpr int head_dim = HeadDim;
  static constexpr bool warp_specialised = kernels::warp_specialised;
  static constexpr std::size_t shared_memory_bytes = kernels::smem_bytes();
  static constexpr int threads = Tile::threads;

  // Argument checks: exactly cuda::prefill's (kvtile::error, invalid_argument).
  static void check(const arguments& a) { portable::check(a); }

  // The arguments pass check() and the current device runs this binary's sm_90a code.
  static bool can_implement(const arguments& a) noexcept {
    try {
      check(a);
      int device = 0;
      if (cudaGetDevice(&device) != cudaSuccess) return false;
      return detail::sm90_kernels_available(device) &&
             (portable::nothing_to_compute(a) || kernels::can_launch(detail::make_prefill_params<T, Mask, HeadDim>(a)));
    } catch (...) {
      return false;
    }
  }

  static std::size_t workspace_size(const arguments&) { return 0; }

  static dim3 grid(const arguments& a) {
    return detail::prefill_grid(a.q.layout, detail::prefill_max_q_len(a), Tile::block_q);
  }

  static void run(const arguments& a, void* workspace = nullptr, cudaStream_t stream = nullptr) {
    (void)workspace;
    check(a);
    if (portable::nothing_to_compute(a)) return;  // empty batch: no launch, null pointers allowed
    int device = 0, major = 0;
    KVTILE_CUDA_CHECK(cudaGetDevice(&device));
    KVTILE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    KVTILE_REQUIRE(major == 9, errc::unsupported, "prefill_sm90 needs a compute capability 9.x device (Hopper), device ",
                   device, " has major ", major);
    KVTILE_REQUIRE(detail::sm90_kernels_available(device), errc::unsupported,
                   "prefill_sm90: this binary has no sm_90a code for device ", device,
                   " (build with CUDA architecture 90a)");
    kernels::launch(detail::make_prefill_params<T, Mask, HeadDim>(a), detail::prefill_max_q_len(a), device, stream);
  }
};

}  // namespace attention::cuda
KVTILE_NAMESPACE_END
