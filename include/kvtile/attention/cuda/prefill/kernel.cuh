// kvtile/attention/cuda/prefill/kernel.cuh: the device side of the prefill (forward) attention
// kernel, FlashAttention-2 class: one CTA owns BlockQ query rows of one (sequence, query head),
// streams K/V tiles of BlockKV keys through a Stages-deep cp.async ring in shared memory, and
// keeps S = Q K^T, P and O in registers (mma.sync m16n8k16, ldmatrix).
//
// Work split inside the CTA: warp w owns query rows [w * RowsPerWarp, (w + 1) * RowsPerWarp),
// i.e. RowsPerWarp / 16 MMA row tiles; every warp reads every K/V tile. Each warp runs the
// mma.sync mainloop part (mma_warp.cuh: S = Q K^T, logits and mask, online softmax, O += P V)
// over its rows; this file is the loads, the pipeline and the epilogue around it.
//
// The mask policy is asked per tile (classify) and per element only on partial tiles.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "kvtile/attention/cuda/arch/cp_async.cuh"
#include "kvtile/attention/cuda/arch/cp_async_shared.cuh"
#include "kvtile/attention/cuda/arch/mma.cuh"
#include "kvtile/attention/cuda/mma_warp.cuh"
#include "kvtile/attention/cuda/tuning.hpp"
#include "kvtile/attention/dense_view.hpp"
#include "kvtile/attention/mask.hpp"
#include "kvtile/attention/tile_shape.hpp"


KVTILE_NAMESPACE_BEGIN
namespace attention::cuda::detail {

// Everything the kernel reads, by value (trivially copyable). Q/O: [.., q_len, qo_heads, D];
// K/V: [.., kv_len, kv_heads, D]; lse: [rows, qo_heads] or null.
template <class T, class Mask>
struct prefill_params {
  using element = T;
  const T* q;
  const T* k;
  const T* v;
  T* o;
  float* lse;
  ragged_layout q_layout;
  ragged_layout kv_layout;
  ragged_layout o_layout;
  typename Mask::params mask;
  float scale_log2;    // softmax scale * log2(e)
  std::int32_t group;  // query heads per KV head
};

// The parameters both prefill kernels take, from cuda::prefill's arguments (`Args`).
template <class T, class Mask, int HeadDim, class Args>
prefill_params<T, Mask> make_prefill_params(const Args& a) {
  prefill_params<T, Mask> p{};
  p.q = a.q.data;
  p.k = a.kv.k;
  p.v = a.kv.v;
  p.o = a.o.data;
  p.lse = a.lse;
  p.q_layout = a.q.layout;
  p.kv_layout = a.kv.layout;
  p.o_layout = a.o.layout;
  p.mask = a.mask_params;
  const float scale = a.scale > 0.f ? a.scale : 1.f / std::sqrt(float(HeadDim));
  p.scale_log2 = scale * log2e;
  p.group = a.q.layout.heads / a.kv.layout.heads;
  return p;
}

// The longest query length of cuda::prefill's arguments: the fixed length, or the bound the
// caller gives for varlen batches.
template <class Args>
std::int32_t prefill_max_q_len(const Args& a) {
  return a.q.layout.indptr ? a.max_q_len : a.q.layout.len;
}

// The grid of a prefill kernel with `block_q` query rows per CTA: (query tiles, query heads,
// sequences).
inline dim3 prefill_grid(const ragged_layout& q, std::int32_t max_q_len, int block_q) {
  return dim3(unsigned((max_q_len + block_q - 1) / block_q), unsigned(q.heads), unsigned(q.batch));
}

// Whether the mma.sync kernel takes head dim D with tile Tile: prefill_geometry's rules below,
// as a value the dispatch asks.
template <int D, class Tile>
inline constexpr bool prefill_tile_ok = is_supported_head_dim<D> && Tile::block_q % (16 * Tile::warps) == 0 &&
                                        Tile::block_kv % 16 == 0 && Tile::stages >= 2;

// Compile-time geometry of one instantiation; every divisibility rule is checked here.
template <class T, int D, class Tile>
struct prefill_geometry {
  static constexpr int block_q = Tile::block_q;
  static constexpr int block_kv = Tile::block_kv;
  static constexpr int warps = Tile::warps;
  static constexpr int stages = Tile::stages;
  static constexpr int threads = Tile::threads;

  static_assert(is_supported_head_dim<D>, "prefill: head dim must be a multiple of 16 in [16, 256]");
  static_assert(block_q % (16 * warps) == 0,
                "prefill: BlockQ must be a multiple of 16 * Warps (each warp owns whole 16-row MMA tiles)");
  static_assert(block_kv % 16 == 0, "prefill: BlockKV must be a multiple of 16 (the MMA k-step of P V)");
  static_assert(stages >= 2, "prefill: Stages must be at least 2 (one tile computing, one loading)");

  static constexpr int rows_per_warp = block_q / warps;
  static constexpr int m_tiles = rows_per_warp / 16;  // 16-row MMA tiles per warp
  static constexpr int s_tiles = block_kv / 8;        // 8-column tiles of S
  static constexpr int d_steps = D / 16;              // k-steps of Q K^T
  static constexpr int o_tiles = D / 8;               // 8-column tiles of O
  static constexpr int kv_steps = block_kv / 16;      // k-steps of P V
  static constexpr int chunks = D / 8;                // 16-byte chunks per row
  // Shared-memory row pitch: padded_tile's, D + 8 elements (no ldmatrix bank conflicts).
  static constexpr int pitch = padded_tile<D>::pitch;

  // Q fragments stay in registers when they fit beside S and O; otherwise they are re-read from
  // shared memory every tile (more shared-memory traffic, no spills).
  static constexpr int q_regs = m_tiles * d_steps * 4;
  static constexpr int o_regs = m_tiles * o_tiles * 4;
  static constexpr int s_regs = m_tiles * s_tiles * 4;
  static constexpr bool q_in_registers = q_regs + o_regs + s_regs <= 192;
  // With Q in shared memory the k-steps of Q K^T index nothing in registers, so they need not
  // be unrolled fully; a deep unroll lets the compiler run ldmatrix ahead of the MMAs (faster
  // at D=128 despite a few more bytes of spills).
  static constexpr int qk_unroll = q_in_registers ? d_steps : tuning::prefill_qk_unroll;
  // Pipeline synchronisation. One barrier per tile (K and V waited together) lets the warps of
  // a CTA drift apart so that one warp's softmax overlaps another's MMAs: +3..8% at D=64 on
  // H100. For larger D a second wait and barrier before P V (V waited separately) measured
  // faster (D=128: 319 against 292 TFLOP/s at S=4096), see docs/perf-log/prefill.md.
  static constexpr bool split_wait = D > tuning::prefill_single_barrier_max_d;

  static constexpr std::size_t smem_elements = std::size_t(block_q + 2 * stages * block_kv) * pitch;
  static constexpr std::size_t smem_bytes = smem_elements * sizeof(T);
};

// One lane's share of copying `Rows` rows of D elements global -> shared with 16-byte cp.async;
// rows at or past `valid_rows` are zero-filled (never read), so padded keys and values are 0.
template <class T, class G, int Rows>
KVTILE_DEVICE KVTILE_FORCEINLINE void load_tile(std::uint32_t smem, const T* gmem, std::int64_t stride, int valid_rows,
                                                const T* any_valid, int tid) {
  constexpr int total = Rows * G::chunks;
  constexpr int per_thread = (total + G::threads - 1) / G::threads;
  if constexpr (G::threads % G::chunks == 0) {
    // A thread copies the same column chunk of rows r0, r0 + row_step, ...: one running source
    // pointer instead of a 64-bit offset per copy kept alive across the main loop.
    constexpr int row_step = G::threads / G::chunks;
    const int r0 = tid / G::chunks, c = tid % G::chunks;
    const T* src = gmem + r0 * stride + c * 8;
    const std::int64_t src_step = row_step * stride;
    const std::uint32_t dst = smem + (r0 * G::pitch + c * 8) * sizeof(T);
    KVTILE_PRAGMA_UNROLL
    for (int i = 0; i < per_thread; ++i) {
      const int r = r0 + i * row_step;
      if (total % G::threads == 0 || r < Rows) {
        const bool ok = r < valid_rows;
        arch::cp_async_16_to(dst + i * row_step * G::pitch * sizeof(T), ok ? src : any_valid, ok);
      }
      src += src_step;
    }
  } else {
    KVTILE_PRAGMA_UNROLL
    for (int i = 0; i < per_thread; ++i) {
      const int id = tid + i * G::threads;
      if (total % G::threads == 0 || id < total) {
        const int r = id / G::chunks, c = id % G::chunks;
        const bool ok = r < valid_rows;
        const T* src = ok ? gmem + r * stride + c * 8 : any_valid;
        arch::cp_async_16_to(smem + (r * G::pitch + c * 8) * sizeof(T), src, ok);
      }
    }
  }
}

template <class T, int D, class Tile, class Mask>
struct prefill_kernel {
  using G = prefill_geometry<T, D, Tile>;
  using params = prefill_params<T, Mask>;
  using mainloop = mma_rows<T, D, G::m_tiles, G::block_kv>;

  static KVTILE_DEVICE void run(const params& p, T* smem) {
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, t = lane % 4;
    const int b = blockIdx.z, h = blockIdx.y;
    // Heaviest query tiles first (causal: the last tiles see the most keys), so the grid's
    // tail is made of light tiles.
    const int q_tile = int(gridDim.x) - 1 - int(blockIdx.x);
    const int q_len = p.q_layout.len_of(b);
    const int q0 = q_tile * G::block_q;
    if (q0 >= q_len) return;
    const int q1 = min_i(q0 + G::block_q, q_len);
    const int kv_len = p.kv_layout.len_of(b);
    const Mask mask(p.mask, q_len, kv_len);
    const int kv_lo = mask.kv_begin(q0, q1), kv_hi = mask.kv_end(q0, q1);
    const int n_tiles = kv_hi > kv_lo ? (kv_hi - kv_lo + G::block_kv - 1) / G::block_kv : 0;
    const int hk = h / p.group;

    const T* q_g = p.q + p.q_layout.offset(b, q0, h);
    const T* k_g = p.k + p.kv_layout.offset(b, 0, hk);
    const T* v_g = p.v + p.kv_layout.offset(b, 0, hk);
    const std::int64_t kv_stride = p.kv_layout.stride_token;

    // Shared memory, as 32-bit shared-window addresses (bytes).
    constexpr std::uint32_t row_bytes = G::pitch * sizeof(T);
    constexpr std::uint32_t kv_stage_bytes = G::block_kv * row_bytes;
    T* s_q = smem;                                                  // [block_q][pitch]
    const std::uint32_t q_base = arch::smem_addr(smem);
    const std::uint32_t k_base = q_base + G::block_q * row_bytes;  // [stages][block_kv][pitch]
    const std::uint32_t v_base = k_base + G::stages * kv_stage_bytes;  // [stages][block_kv][pitch]

    // Tiles the whole CTA can skip (a sliding window's gap between sinks and window).
    auto next_tile = [&](int i) {
      while (i < n_tiles && mask.classify(q0, q1, kv_lo + i * G::block_kv, kv_lo + (i + 1) * G::block_kv) ==
                                tile_visibility::empty)
        ++i;
      return i;
    };
    // Two commit groups per ring slot (K, then V), issued even when empty, so that the waits
    // below count groups at compile time.
    auto fetch_tile = [&](int i, int stage) {
      if (i < n_tiles) {
        const int k0 = kv_lo + i * G::block_kv;
        load_tile<T, G, G::block_kv>(k_base + stage * kv_stage_bytes, k_g + k0 * kv_stride, kv_stride,
                                     kv_len - k0, p.k, tid);
      }
      arch::cp_async_commit();
      if (i < n_tiles) {
        const int k0 = kv_lo + i * G::block_kv;
        load_tile<T, G, G::block_kv>(v_base + stage * kv_stage_bytes, v_g + k0 * kv_stride, kv_stride,
                                     kv_len - k0, p.v, tid);
      }
      arch::cp_async_commit();
    };

    load_tile<T, G, G::block_q>(q_base, q_g, p.q_layout.stride_token, q1 - q0, p.q, tid);
    arch::cp_async_commit();
    fill_rotary_table<D>(mask, tid, G::threads);  // a rotary variant's table
    int fetch = next_tile(0);
    KVTILE_PRAGMA_UNROLL
    for (int s = 0; s < G::stages - 1; ++s) {
      fetch_tile(fetch, s);
      fetch = next_tile(fetch + 1);
    }

    mainloop rows;
    rows.init();
    const int warp_row0 = warp * G::rows_per_warp;
    q_operand<T, D, G::m_tiles, G::q_in_registers> q;
    arch::cp_async_wait<2 * G::stages - 2>();  // Q landed (the K/V groups may still fly)
    __syncthreads();
    if constexpr (has_rotary<Mask>) {
      // A rotary variant: the Q tile rotated in place once, row r at its query's position.
      rotate_tile_rows<T, D>(s_q, q1 - q0, mask, [&](int r) { return mask.query_position(q0 + r); }, tid, G::threads);
      __syncthreads();
    }
    q.load(q_base, warp_row0, lane);

    const int wq0 = q0 + warp_row0, wq1 = min_i(wq0 + G::rows_per_warp, q_len);
    int stage = 0, refill = G::stages - 1;
    for (int i = next_tile(0); i < n_tiles; i = next_tile(i + 1)) {
      // Barrier: the tile's K (and V, unless split_wait) landed and is visible to every warp,
      // and every warp is done with the previous tile, whose slot is refilled right away.
      if constexpr (G::split_wait)
        arch::cp_async_wait<2 * G::stages - 3>();
      else
        arch::cp_async_wait<2 * G::stages - 4>();
      __syncthreads();
      fetch_tile(fetch, refill);
      fetch = next_tile(fetch + 1);
      refill = refill + 1 == G::stages ? 0 : refill + 1;

      const int k0 = kv_lo + i * G::block_kv;
      if constexpr (has_rotary<Mask>) {
        // A rotary variant: the tile's keys rotated in place at their positions, once for every
        // warp (the stage is refilled only after the next iteration's barrier).
        rotate_tile_rows<T, D>(s_q + (G::block_q + stage * G::block_kv) * G::pitch, min_i(G::block_kv, kv_len - k0), mask,
                               [&](int r) { return mask.key_position(k0 + r); }, tid, G::threads);
        __syncthreads();
      }
      tile_visibility vis =
          wq0 < wq1 ? mask.classify(wq0, wq1, k0, k0 + G::block_kv) : tile_visibility::empty;
      if (vis == tile_visibility::full && k0 + G::block_kv > kv_len) vis = tile_visibility::partial;

      typename mainloop::tile_scores s;
      if (vis != tile_visibility::empty) {
        mainloop::template qk<G::qk_unroll>(s, q, smem_tile<T, padded_tile<D>>{k_base + stage * kv_stage_bytes}, lane);
        // The mask, asked per element only where the tile is partial (or runs past kv_len).
        rows.probabilities(s, mask, p.scale_log2, vis == tile_visibility::partial, lane, [&](int mt, int hh, int j) {
          const int row = wq0 + mt * 16 + g + 8 * hh, col = k0 + j;
          return col < kv_len && mask.visible(row, col);
        });
      }

      if constexpr (G::split_wait) {
        arch::cp_async_wait<2 * G::stages - 2>();  // V of this tile
        __syncthreads();
      }
      if (vis != tile_visibility::empty) rows.pv(s, smem_tile<T, padded_tile<D>>{v_base + stage * kv_stage_bytes}, lane);
      stage = stage + 1 == G::stages ? 0 : stage + 1;
    }
    arch::cp_async_wait<0>();

    // Epilogue: finish each row (sum l over the quad, normalise, LSE), stage O through this
    // warp's own rows of the Q buffer, then write 16-byte rows.
    const std::int32_t heads = p.q_layout.heads;
    float lse[G::m_tiles][2];
    rows.finish(lse);
    KVTILE_PRAGMA_UNROLL
    for (int mt = 0; mt < G::m_tiles; ++mt)
      KVTILE_PRAGMA_UNROLL
      for (int hh = 0; hh < 2; ++hh) {
        const int row = wq0 + mt * 16 + g + 8 * hh;
        if (p.lse != nullptr && t == 0 && row < q_len) p.lse[p.q_layout.row(b, row) * heads + h] = lse[mt][hh];
      }
    __syncwarp();
    rows.store_o(s_q, warp_row0, lane);
    __syncwarp();
    T* o_g = p.o + p.o_layout.offset(b, q0, h);
    const std::int64_t o_stride = p.o_layout.stride_token;
    constexpr int out_chunks = G::rows_per_warp * G::chunks;
    KVTILE_PRAGMA_UNROLL
    for (int id = lane; id < out_chunks; id += 32) {
      const int r = warp_row0 + id / G::chunks, c = id % G::chunks;
      if (q0 + r < q_len)
        *reinterpret_cast<uint4*>(o_g + r * o_stride + c * 8) =
            *reinterpret_cast<const uint4*>(s_q + r * G::pitch + c * 8);
    }
  }
};

template <class Kernel>
KVTILE_KERNEL void __launch_bounds__(Kernel::G::threads) prefill_entry(const typename Kernel::params p) {
  extern __shared__ __align__(16) unsigned char prefill_smem[];
  Kernel::run(p, reinterpret_cast<typename Kernel::params::element*>(prefill_smem));
}

}  // namespace attention::cuda::detail
KVTILE_NAMESPACE_END
