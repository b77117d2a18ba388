// kvtile/attention/cuda/backward/params.cuh: what every kernel of the CUDA attention backward
// reads (by value, trivially copyable), and the shape rules of its tiles.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kvtile/attention/dense_view.hpp"
#include "kvtile/attention/tile_shape.hpp"
#include "kvtile/attention/cuda/tuning.hpp"
#include "kvtile/core/config.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda::detail {

// Q, O, dO, dQ: [.., q_len, qo_heads, D]; K, V, dK, dV: [.., kv_len, kv_heads, D]; lse:
// [rows, qo_heads] (natural log). The workspace arrays are indexed by the packed row r of a
// query token (ragged_layout::row) below ws_rows, an upper bound on the batch's rows.
template <class T, class Mask>
struct backward_params {
  using element = T;
  const T* q;
  const T* k;
  const T* v;
  const T* o;
  const T* d_o;
  const float* lse;
  T* dq;
  T* dk;
  T* dv;
  ragged_layout q_layout, kv_layout, o_layout, do_layout, dq_layout, dk_layout, dv_layout;
  typename Mask::params mask;
  float scale;         // softmax scale
  float scale_log2;    // scale * log2(e)
  std::int32_t group;  // query heads per KV head
  std::int64_t ws_rows;
  float* dq_acc;  // [ws_rows, qo_heads, D] fp32, zeroed by the pre-pass; null: dQ by the Q-outer kernel
  float* lse2;    // [qo_heads, ws_rows]: lse * log2(e), +inf where lse = -inf (the row's P is then 0)
  float* delta;   // [qo_heads, ws_rows]: dO . O
};

// The tile geometry of the K/V-outer kernel (dK, dV and the atomic dQ) and every rule it needs.
// A warp owns 16 keys: S^T = K Q^T puts keys on the MMA rows, so P^T and dS^T come out of the
// accumulators as the A operands of dV += P^T dO and dK += dS^T Q without leaving registers.
template <class T, int D, class Tile>
struct backward_geometry {
  static constexpr int block_q = Tile::block_q;
  static constexpr int block_kv = Tile::block_kv;
  static constexpr int warps = Tile::warps;
  static constexpr int threads = Tile::threads;

  static_assert(is_supported_head_dim<D>, "backward: head dim must be a multiple of 16 in [16, 256]");
  static_assert(block_kv == 16 * warps, "backward: BlockKV must be 16 * Warps (each warp owns 16 keys)");
  static_assert(block_q % 16 == 0, "backward: BlockQ must be a multiple of 16 (the MMA k-step of dV and dK)");
  static_assert(Tile::stages == 2, "backward: Stages must be 2 (the Q / dO tiles are double-buffered)");

  // dK / dV columns a CTA accumulates: all of D up to backward_max_dkv_cols, else D split
  // evenly over col_splits CTAs (each recomputing S and dP).
  static constexpr int col_splits = (D + tuning::backward_max_dkv_cols - 1) / tuning::backward_max_dkv_cols;
  static constexpr int dkv_cols = D / col_splits;
  static_assert(D % col_splits == 0 && dkv_cols % 16 == 0,
                "backward: head dims above 128 must split into equal column slices that are multiples of 16 "
                "(160, 192, 224, 256)");

  static constexpr int chunks = D / 8;      // 16-byte chunks per row
  static constexpr int pitch = D + 8;       // shared-memory row pitch (odd count of 16-byte chunks)
  static constexpr int ds_pitch = block_q + 8;  // of dS^T [block_kv][block_q]
  static constexpr int q_tiles = block_q / 8;   // 8-query column tiles of S^T
  static constexpr int c_tiles = dkv_cols / 8;  // 8-column tiles of dK / dV
  // dQ of one step: [block_q x D] = dS K, in units of 16 rows x dq_unit_cols, spread over warps.
  static constexpr int dq_unit_cols = D % 32 == 0 ? 32 : 16;
  static constexpr int dq_units = (block_q / 16) * (D / dq_unit_cols);

  static constexpr std::size_t kv_bytes = std::size_t(block_kv) * pitch * sizeof(T);  // K or V
  static constexpr std::size_t q_slot_bytes = std::size_t(block_q) * pitch * sizeof(T);  // Q or dO, one slot
  static constexpr std::size_t ds_bytes = std::size_t(block_kv) * ds_pitch * sizeof(T);
  static constexpr std::size_t row_stat_bytes = 2 * std::size_t(block_q) * sizeof(float);  // two slots
  static constexpr std::size_t smem_bytes = 2 * kv_bytes + 4 * q_slot_bytes + ds_bytes + 2 * row_stat_bytes;
};

// The tile geometry of the Q-outer dQ kernel (the deterministic mode): 16 query rows per warp,
// tuning::backward_dq_block_kv keys per step through a two-slot K/V ring.
template <class T, int D, class Tile>
struct backward_dq_geometry {
  static constexpr int warps = Tile::warps;
  static constexpr int threads = Tile::threads;
  static constexpr int block_q = 16 * warps;
  static constexpr int block_kv = tuning::backward_dq_block_kv<D, Tile::block_kv>;
  static_assert(block_kv % 16 == 0, "backward: BlockKV must be a multiple of 16");
  static constexpr int chunks = D / 8;
  static constexpr int pitch = D + 8;
  static constexpr int s_tiles = block_kv / 8;
  static constexpr int o_tiles = D / 8;
  static constexpr std::size_t q_bytes = std::size_t(block_q) * pitch * sizeof(T);
  static constexpr std::size_t kv_slot_bytes = std::size_t(block_kv) * pitch * sizeof(T);
  static constexpr std::size_t smem_bytes = 2 * q_bytes + 4 * kv_slot_bytes;  // Q, dO; K and V x 2 slots
};

}  // namespace attention::cuda::detail
KVTILE_NAMESPACE_END
