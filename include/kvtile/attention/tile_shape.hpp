// kvtile/attention/tile_shape.hpp: the compile-time tile geometry of an attention kernel.
//
// tile_shape<BlockQ, BlockKV, Warps, Stages>: queries per tile, keys per tile, warps per CTA
// (CUDA), and K/V pipeline stages (CUDA). The CPU kernels use BlockQ and BlockKV only. Values
// that shape registers and shared memory are template parameters; everything a user varies
// freely (lengths, batch, group size, window) stays runtime.
#pragma once

#include "kvtile/core/config.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention {

template <int BlockQ, int BlockKV, int Warps = 4, int Stages = 2>
struct tile_shape {
  static_assert(BlockQ >= 1 && BlockKV >= 1, "tile_shape: BlockQ and BlockKV must be positive");
  static_assert(Warps >= 1 && Stages >= 1, "tile_shape: Warps and Stages must be positive");
  static constexpr int block_q = BlockQ;
  static constexpr int block_kv = BlockKV;
  static constexpr int warps = Warps;
  static constexpr int stages = Stages;
  static constexpr int threads = 32 * Warps;
};

template <class T>
inline constexpr bool is_tile_shape_v = false;
template <int Q, int K, int W, int S>
inline constexpr bool is_tile_shape_v<tile_shape<Q, K, W, S>> = true;

template <class T>
concept tile_shape_type = is_tile_shape_v<T>;

// Head dims kernels accept: a multiple of 16, at most 256.
template <int D>
inline constexpr bool is_supported_head_dim = D > 0 && D % 16 == 0 && D <= 256;

}  // namespace attention
KVTILE_NAMESPACE_END
