// kvtile/attention/cuda/prefill_sm90/ws_kernel.cuh: the warp-specialised Hopper (sm_90a)
// attention mainloop, FlashAttention-3's structure (Shah et al., 2024):
//
//   producer warpgroup   its first warp issues every copy (one thread for a source of a few
//                        large boxes, a lane per box for the paged append's page boxes): the
//                        Q tile once, then K and V tiles of
//                        the CTA's visible key tiles through the Tensor Memory Accelerator into
//                        a Stages-deep ring (per slot: full_k, full_v mbarriers completed by the
//                        copies' bytes; empty_k, empty_v with one arrival per consumer warp:
//                        a K slot is free once its S = Q K^T is done, a V slot once its P V is,
//                        so the next K streams in a whole tile before it is needed). It keeps 24
//                        registers (setmaxnreg) and gives the rest to the consumers.
//   consumer warpgroups  C of them, 64 query rows each, only compute. Per key tile j:
//                          wait K_j; [turn]  S_j = Q K_j^T  and  O += P_{j-1} V_{j-1}  issued
//                          [hand the turn on]; wait S_j, release K_j; mask, online softmax ->
//                          P_j (the exponentials run while P_{j-1} V_{j-1} is in the tensor
//                          cores); wait P V, release V_{j-1}; O takes the softmax factor
//                          just before the next P V is issued.
//                        "Turn" is a named barrier per warpgroup passed round-robin (ping-pong):
//                        while one warpgroup runs its softmax the next issues its GEMMs.
//
// The sources of the tiles are policies (dense_ws_source below; the paged append can add its
// own): a source says where the CTA's rows and keys are and issues the TMA copies. A schedule
// says which work tiles a CTA runs: one (ws_single_schedule, the launch grid being the work
// grid), or, persistent, a CTA per SM walking every work tile (ws_dense_schedule), the next
// tile's Q and K/V streaming in while the consumers finish the last one. The score
// transform, the mask and the softmax statistics are the parts every mainloop shares
// (scores.cuh, mask.hpp, softmax_state.hpp's softmax_row_stats).
//
// Tile: tile_shape<64 * C, BlockKV, 4 * (C + 1), Stages>: 4 * C consumer warps plus the
// producer warpgroup; BlockKV 64, 128, 176 or 192; Stages >= 2. Shared memory: the Q tile and 2 * Stages
// K/V tiles, 128-byte swizzled exactly as arch/wgmma.cuh's descriptors read them (the TMA's
// SWIZZLE_128B writes that layout), plus the mbarriers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include <cuda.h>
#include <cuda_runtime.h>

#include "kvtile/attention/cuda/arch/cp_async.cuh"
#include "kvtile/attention/cuda/arch/cp_async_shared.cuh"
#include "kvtile/attention/cuda/arch/mbarrier.cuh"
#include "kvtile/attention/cuda/arch/mma.cuh"
#include "kvtile/attention/cuda/arch/tma.cuh"
#include "kvtile/attention/cuda/arch/wgmma.cuh"
#include "kvtile/attention/cuda/prefill/kernel.cuh"
#include "kvtile/attention/cuda/prefill/rotate.cuh"
#include "kvtile/attention/cuda/prefill_sm90/kernel.cuh"
#include "kvtile/attention/cuda/scores.cuh"
#include "kvtile/attention/dense_view.hpp"
#include "kvtile/attention/mask.hpp"
#include "kvtile/attention/softmax_state.hpp"
#include "kvtile/attention/variant.hpp"
#include "kvtile/core/cuda_check.cuh"
#include "kvtile/core/error.hpp"
#include "kvtile/memory/cuda/fp8_convert.cuh"
#include "kvtile/memory/kv_codec.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda::detail {

// Whether the warp-specialised kernel takes head dim D with tile Tile.
template <int D, class Tile>
inline constexpr bool prefill_sm90_ws_tile_ok = (D == 64 || D == 128 || D == 256) && Tile::warps % 4 == 0 && Tile::warps >= 8 &&
                                                Tile::warps <= 16 && Tile::block_q == 16 * (Tile::warps - 4) &&
                                                (Tile::block_kv == 64 || Tile::block_kv == 128 || Tile::block_kv == 176 ||
                                                 Tile::block_kv == 192) &&
                                                Tile::stages >= 2;

template <class T, int D, class Tile>
struct ws_geometry {
  static constexpr int block_q = Tile::block_q;
  static constexpr int block_kv = Tile::block_kv;
  static constexpr int stages = Tile::stages;
  static constexpr int threads = Tile::threads;
  static constexpr int consumers = Tile::warps / 4 - 1;  // consumer warpgroups
  static_assert(prefill_sm90_ws_tile_ok<D, Tile>,
                "prefill_sm90 (warp-specialised): D 64, 128 or 256, Warps = 4 * (consumer warpgroups + 1) in 8..16, "
                "BlockQ = 64 per consumer warpgroup, BlockKV 64, 128, 176 or 192, Stages >= 2");

  // Registers: the launch gives every thread 65536 / threads (rounded down to 8); the producer
  // warpgroup drops to 24 and the consumers share what it frees (at most 240 each).
  // A producer warpgroup whose warps 1 .. 3 also transform the tiles keeps more. Rotating keys
  // (a rotary variant): rotary_producer_regs, 72 (its rotating threads hold a task's angles and
  // their step, 32 floats; at 56 they spilled), which leaves two consumer warpgroups 216; or 32
  // beside three consumer warpgroups (which then keep 160 instead of 152; their rotators spill,
  // so no default tile has three). Converting fp8 tiles: convert_producer_regs, 56 with per-head
  // scales (consumers 224: the append +0.3 / +1.6 % against 72), 72 with per-token scales (at
  // 56 they spilled 4 bytes and ran 0.93x). Eight consumer registers more or less are worth
  // little by themselves; what a transforming producer costs is its own work (prefill.md sm90
  // v14).
  static constexpr int launch_regs = (65536 / threads) / 8 * 8 > 255 ? 248 : (65536 / threads) / 8 * 8;
  static constexpr int consumer_regs_for(int producer) {
    const int raw = launch_regs + ((launch_regs - producer) / consumers) / 8 * 8;
    return raw > 240 ? 240 : raw;
  }
  static constexpr int producer_regs = 24;
  static constexpr int rotary_producer_regs = consumers > 2 ? 32 : 72;
  static constexpr int convert_producer_regs(bool token_scales) { return consumers > 2 ? 32 : token_scales ? 72 : 56; }
  static constexpr int consumer_regs = consumer_regs_for(producer_regs);
  static constexpr bool reallocate = consumers > 1;

  static constexpr int d_steps = D / 16;
  static constexpr int kv_steps = block_kv / 16;
  static constexpr int s_regs = block_kv / 2;  // S accumulators per thread
  static constexpr int o_regs = D / 2;         // O accumulators per thread
  static constexpr int panels = D / 64;        // 64-column (128-byte) panels of a row
  static constexpr std::uint32_t q_bytes = std::uint32_t(block_q) * D * sizeof(T);
  static constexpr std::uint32_t kv_bytes = std::uint32_t(block_kv) * D * sizeof(T);  // one K or V tile
  // Aligned base (+1024), Q, the K and V rings, the mbarriers (q_full, q_empty, then full_k,
  // full_v, empty_k, empty_v per slot).
  static constexpr std::size_t smem_bytes = 1024 + q_bytes + 2 * std::size_t(stages) * kv_bytes + 8 * (2 + 4 * stages);
};

// The dense source's parameters: cuda::prefill's, and the three tensor maps (the kernel takes
// them as a __grid_constant__ parameter, where the TMA reads them).
template <class T, class Mask>
struct ws_dense_params {
  prefill_params<T, Mask> p;
  CUtensorMap q, k, v;
  std::int32_t q_tiles;  // query tiles of the longest sequence
  std::int32_t persistent;  // 1: gridDim.x CTAs walk every work tile (ws_persistent_schedule)
};

// Dense Q, K, V through TMA: CTA (q tile, query head, sequence). Each tensor is a 3-D map
// (head dim, heads, rows of the batch); a tile is `panels` boxes of 64 columns x rows. A varlen
// map has no row bound the host knows, and a tile that runs past its sequence's end may run past
// the tensor's (when the sequences after it are short), so no varlen box runs past its
// sequence's end: a sequence's last Q tile and last K/V tile are loaded as the window that ends
// there (CTA row r is token q_start + r; smem key row j is key k_start(k0) + j; a window longer
// than the sequence starts in the sequence before, or before row 0, which reads as zeros), and
// the rows that belong to the tile before are neither stored nor counted.
template <class T, int D, class G, class Mask>
struct dense_ws_source {
  using params = ws_dense_params<T, Mask>;
  const params& P;
  int b, h, q0, q_start, row_lo, row_hi, kv_lo, kv_hi, kv_limit;
  int q_row, kv_row;  // TMA row coordinates of (b, q_start) and (b, 0)
  bool shift_kv;      // varlen K/V: windows end at the sequence's end
  Mask mask;
  float scale_log2;

  KVTILE_DEVICE dense_ws_source(const params& pp, int q_tile, int head, int batch)
      : P(pp), b(batch), h(head), q0(q_tile * G::block_q),
        mask(pp.p.mask, pp.p.q_layout.len_of(batch), pp.p.kv_layout.len_of(batch)) {
    const auto& p = P.p;
    const int q_len = p.q_layout.len_of(b);
    const int n = min_i(G::block_q, q_len - q0);
    const bool shift_q = p.q_layout.indptr != nullptr;
    q_start = shift_q && q0 + G::block_q > q_len ? q_len - G::block_q : q0;
    row_lo = q0 - q_start;
    row_hi = row_lo + n;
    kv_limit = p.kv_layout.len_of(b);
    shift_kv = p.kv_layout.indptr != nullptr;
    kv_lo = n > 0 ? mask.kv_begin(q0, q0 + n) : 0;
    kv_hi = n > 0 ? mask.kv_end(q0, q0 + n) : 0;
    q_row = int(p.q_layout.row(b, 0)) + q_start;
    kv_row = int(p.kv_layout.row(b, 0));
    scale_log2 = p.scale_log2;
  }
  KVTILE_DEVICE KVTILE_FORCEINLINE int token(int r) const { return q_start + r; }
  // The key held by shared-memory row 0 of the tile whose first key is k0.
  KVTILE_DEVICE KVTILE_FORCEINLINE int k_start(int k0) const {
    return shift_kv && k0 + G::block_kv > kv_limit ? kv_limit - G::block_kv : k0;
  }
  KVTILE_DEVICE KVTILE_FORCEINLINE void issue_q(std::uint32_t dst, std::uint32_t bar) const {
    KVTILE_PRAGMA_UNROLL
    for (int c = 0; c < G::panels; ++c)
      arch::tma_load_3d(dst + c * G::block_q * 128, &P.q, c * 64, h, q_row, bar);
  }
  KVTILE_DEVICE KVTILE_FORCEINLINE void issue_k(std::uint32_t dst, int k0, std::uint32_t bar) const {
    const int row = kv_row + k_start(k0);
    KVTILE_PRAGMA_UNROLL
    for (int c = 0; c < G::panels; ++c)
      arch::tma_load_3d(dst + c * G::block_kv * 128, &P.k, c * 64, h / P.p.group, row, bar);
  }
  KVTILE_DEVICE KVTILE_FORCEINLINE void issue_v(std::uint32_t dst, int k0, std::uint32_t bar) const {
    const int row = kv_row + k_start(k0);
    KVTILE_PRAGMA_UNROLL
    for (int c = 0; c < G::panels; ++c)
      arch::tma_load_3d(dst + c * G::block_kv * 128, &P.v, c * 64, h / P.p.group, row, bar);
  }
  KVTILE_DEVICE KVTILE_FORCEINLINE void store(int r, const float* o, float lse, int t) const {
    store_dense_row<D>(P.p, b, token(r), h, o, lse, t);
  }
};

// What a source may ask of the core beyond the copies: `q_by_consumers` (Q rows that no tensor
// map describes, such as GQA-packed rows: the consumer threads copy them with cp.async before the
// first tile) and `zero_v_tail` (V rows past the keys' end may hold anything, e.g. a page's
// unwritten slots: they are zeroed before the last P V, since 0 * NaN is NaN).
template <class Source>
inline constexpr bool ws_q_by_consumers = requires { requires Source::q_by_consumers; };
template <class Source>
inline constexpr bool ws_zero_v_tail = requires { requires Source::zero_v_tail; };
// `warp_issue`: the producer warp's lanes share a tile's copies. Such a source has
// `locate(k0, lane)`, what lane `lane` copies of the tile whose first key is k0 (looked up before
// the tile's slot is free), and issue_k / issue_v taking that in place of k0.
template <class Source>
inline constexpr bool ws_warp_issue = requires { requires Source::warp_issue; };
// What the normalised output rows take before they are stored: a source's `o_factor` (the V
// scale of a per-head quantized pool), else 1.
template <class Source>
KVTILE_DEVICE KVTILE_FORCEINLINE float ws_out_factor(const Source& src) {
  if constexpr (requires { src.o_factor; }) return src.o_factor;
  else return 1.f;
}

// Which work tiles a CTA runs, in order: `for_each(f)` calls f(source) for each. The producer
// and the consumers walk the same sequence; every pipeline counter runs on across its tiles.
// One source (a CTA per work tile, the launch grid being the work grid):
template <class Source>
struct ws_single_schedule {
  using source_type = Source;
  const Source& src;
  template <class F>
  KVTILE_DEVICE KVTILE_FORCEINLINE void for_each(F&& f) const {
    f(src);
  }
  // The variant, for what does not depend on a work tile (a rotary variant's dims and theta).
  KVTILE_DEVICE KVTILE_FORCEINLINE auto variant() const { return src.mask; }
};

// The warp-specialised core over any source and schedule (see the file comment). Across the work
// tiles of a persistent CTA the K/V ring, its barrier phases and the ping-pong turns run on; Q has
// a `q_empty` barrier (one arrival per consumer warp once its last Q K^T of a tile is done), so the
// producer loads the next tile's Q while the consumers finish the last P V and the epilogue.
//
// A rotary variant (has_rotary<Mask>: Q and K given before rotation) is rotated in shared memory
// as the tiles arrive: each consumer warpgroup rotates its own 64 Q rows once per work tile
// (then a fence to the async proxy and the warpgroup's own barrier), and the producer
// warpgroup's three idle warps rotate every K tile once the TMA has landed it, then publish it
// on the slot's `ready_k` mbarrier, which the consumers wait on instead of `full_k`. So the
// rotation runs beside the consumers' GEMMs and softmax, one K tile ahead, and costs the
// consumers no instructions; the producer warpgroup keeps rotary_producer_regs registers for it.
// Angles in fp32 from a frequency table the CTA fills once, the rotation in T's packed arithmetic
// (rotate_task below). The table is the core's own contiguous floats, not scores.cuh's
// rotary_table (16-byte entries): a task reads eight consecutive frequencies, two 16-byte loads
// here (the shared table measured 2-4 % slower, docs/perf-log/composed.md).
//
// A quantized K/V codec (Codec::quantized: fp8 e4m3 pages, memory/kv_codec.hpp) is decoded the
// same way: the source's copies land a tile's bytes in the upper half of its T slot (and, with
// per-token scales, the tile's K or V scales at the slot's start), the same three producer
// warps convert it in place into the T tile the consumers read (convert_tile), then publish K on
// ready_k and V on a ready_v mbarrier per slot. So the consumers' mainloop is the 2-byte one,
// instruction for instruction. Per-head scales never touch the elements (the source folds the K
// scale into its softmax scale and the V scale into `o_factor`); per-token scales multiply each
// element in fp32 as it is converted, one rounding to T.
template <class T, int D, class Tile, class Mask, class Codec = memory::identity>
struct sm90_ws_core {
  using G = ws_geometry<T, D, Tile>;
  static constexpr bool rotates = has_rotary<Mask>;
  static constexpr bool converts = Codec::quantized;
  static constexpr bool token_scales = memory::per_token_scales<Codec>;
  // The element type of the tiles the consumers multiply: T, but fp16 for fp8 pages with
  // per-head scales under a bf16 query (no logit transform): e4m3 -> fp16 is one instruction a
  // pair, e4m3 -> bf16 four, and the conversion is what limits that kernel (prefill.md sm90
  // v11). Q then goes into fp16 times a power of two per warp (q_to_compute), folded back into
  // the softmax scale, P into fp16 (as the fp8 decode kernels compute).
  using Tc = std::conditional_t<converts && !token_scales && std::is_same_v<T, kvtile::bfloat16> && !has_logit_transform<Mask>,
                                kvtile::half, T>;
  static constexpr bool q_converts = !std::is_same_v<Tc, T>;
  using qk_op = arch::wgmma_op<Tc, G::block_kv>;
  using pv_op = arch::wgmma_op<Tc, D>;
  static_assert(!(rotates && converts), "sm90_ws_core: quantized K/V pages with a rotary variant are not supported");
  static_assert(!converts || D % 128 == 0, "sm90_ws_core: fp8 tiles come as 128-byte rows (head_dim a multiple of 128)");
  // Whether the producer warps 1 .. 3 work on the tiles (rotate or convert) before the consumers.
  static constexpr bool transforms = rotates || converts;
  static constexpr int producer_regs = rotates    ? G::rotary_producer_regs
                                       : converts ? G::convert_producer_regs(token_scales)
                                                  : G::producer_regs;
  static constexpr int consumer_regs = G::consumer_regs_for(producer_regs);
  static constexpr int rotators = 96;  // producer warps 1 .. 3
  // The geometry's bytes and, rotating, a ready_k mbarrier per slot and the frequency table;
  // converting, a ready_k and a ready_v mbarrier per slot.
  static constexpr std::size_t smem_bytes =
      G::smem_bytes + (rotates ? 8 * std::size_t(G::stages) + 4 * (D / 2) : 0) + (converts ? 16 * std::size_t(G::stages) : 0);
  // A quantized tile as the copies land it: bytes of the source's stored elements, then (per-token
  // scales) a float per key.
  static constexpr std::uint32_t stored_bytes = converts ? G::kv_bytes / 2 : G::kv_bytes;
  static constexpr std::uint32_t tile_tx_bytes = stored_bytes + (token_scales ? 4u * G::block_kv : 0u);
  static constexpr int turn_barrier = 1;  // named barriers 1 .. consumers: whose turn to issue
  static constexpr int consumers_barrier = 1 + G::consumers;  // every consumer thread
  static constexpr int q_rotated_barrier = 2 + G::consumers;  // + cw: a warpgroup's rotated Q rows
  static constexpr int convert_barrier = 2 + 2 * G::consumers;  // the converting warps' scales read

  // ---- quantized tiles (converting codecs) ----
  // The slot at `tile` (generic pointer, G::kv_bytes): its upper half holds the stored tile as
  // the copies wrote it (rows of D bytes in 128-byte swizzled panels, as the TMA's SWIZZLE_128B
  // lays them), its first block_kv floats the per-token scales. Row r's bytes lie exactly where
  // row r of the T tile's upper panels go, and nowhere else a T row goes, so a row converted by
  // the lanes that read it (D / 16 lanes of one warp, a __syncwarp between their reads and
  // writes) is converted in place without a race. The scales sit in the lines of T rows
  // [0, scale_rows): those rows are converted last, by warp 0 alone, after a barrier of the
  // converting threads (every other row's scale has been read by then).
  static constexpr int scale_rows = token_scales ? G::block_kv * 4 / 128 : 0;
  static KVTILE_DEVICE KVTILE_FORCEINLINE void convert_tile(unsigned char* tile, int id) {
    constexpr int per_row = D / 16;  // 16-byte chunks of stored bytes per row
    static_assert(32 % per_row == 0 && scale_rows * per_row <= 32, "sm90_ws_core: a row's chunks, and the scale rows, in one warp");
    constexpr int rows_per_pass = rotators / per_row;
    constexpr int passes = (G::block_kv - scale_rows + rows_per_pass - 1) / rows_per_pass;
    const int c = id % per_row, r0 = id / per_row;
    const unsigned char* stored = tile + G::kv_bytes / 2;
    const float* scales = reinterpret_cast<const float*>(tile);
    // Rows [r, r + U * rows_per_pass) in steps of rows_per_pass (those below `end`): U reads in
    // flight, then the warp's __syncwarp (every lane calls it alike), then the writes.
    auto rows = [&](auto u, int r, int end) {
      constexpr int U = decltype(u)::value;
      uint4 in[U];
      float sc[U];
      KVTILE_PRAGMA_UNROLL
      for (int k = 0; k < U; ++k) {
        const int rk = r + k * rows_per_pass;
        in[k] = make_uint4(0u, 0u, 0u, 0u);
        sc[k] = 1.f;
        if (rk < end) {
          in[k] = *reinterpret_cast<const uint4*>(stored + arch::sw128_offset(G::block_kv, rk, c));
          if constexpr (token_scales) sc[k] = scales[rk];
        }
      }
      __syncwarp();  // the rows' stored bytes (and scales) are read before any of their lanes overwrites them
      KVTILE_PRAGMA_UNROLL
      for (int k = 0; k < U; ++k) {
        const int rk = r + k * rows_per_pass;
        if (rk < end) {
          uint4 lo, hi;
          if constexpr (token_scales) memory::cuda::e4m3x16_to_scaled<T>(in[k], sc[k], lo, hi);
          else memory::cuda::e4m3x16_to<Tc>(in[k], lo, hi);
          *reinterpret_cast<uint4*>(tile + arch::sw128_offset(G::block_kv, rk, 2 * c)) = lo;
          *reinterpret_cast<uint4*>(tile + arch::sw128_offset(G::block_kv, rk, 2 * c + 1)) = hi;
        }
      }
    };
    constexpr int U = 4;
#pragma unroll 1
    for (int x = 0; x < passes; x += U) rows(std::integral_constant<int, U>{}, scale_rows + r0 + x * rows_per_pass, G::block_kv);
    if constexpr (token_scales) {
      arch::named_barrier_sync(convert_barrier, rotators);
      if (id < 32) rows(std::integral_constant<int, 1>{}, r0, scale_rows);
    }
  }

  // Q rows [r0, r0 + 16) of the SW128 tile, T (bf16) -> Tc (fp16) in place, by one warp, times
  // 2^e for the 16 rows (arch::bf16_to_fp16_scaled, as the fp8 decode kernels take Q); returns
  // 2^-e for the softmax scale.
  static KVTILE_DEVICE float q_to_compute(unsigned char* q_tile, int r0, int lane) {
    using cv = arch::bf16_to_fp16_scaled;
    constexpr int chunks = D / 8;  // 16-byte chunks of a row
    constexpr int per_lane = 16 * chunks / 32;
    uint4 x[per_lane];
    std::uint32_t mx = 0;
    KVTILE_PRAGMA_UNROLL
    for (int k = 0; k < per_lane; ++k) {
      const int id = lane + 32 * k, r = r0 + id / chunks, c = id % chunks;
      x[k] = *reinterpret_cast<const uint4*>(q_tile + arch::sw128_offset(G::block_q, r, c));
      mx = cv::max_abs(cv::max_abs(cv::max_abs(cv::max_abs(mx, x[k].x), x[k].y), x[k].z), x[k].w);
    }
    const int e = cv::exponent(mx);
    const float up = cv::up(e);
    KVTILE_PRAGMA_UNROLL
    for (int k = 0; k < per_lane; ++k) {
      const int id = lane + 32 * k, r = r0 + id / chunks, c = id % chunks;
      *reinterpret_cast<uint4*>(q_tile + arch::sw128_offset(G::block_q, r, c)) =
          make_uint4(cv::pair(x[k].x, up), cv::pair(x[k].y, up), cv::pair(x[k].z, up), cv::pair(x[k].w, up));
    }
    return cv::down(e);
  }

  // ---- rotation in shared memory (rotating variants) ----
  // A row of the SW128 tile is cut as the rotate pass cuts it: rotated 16-byte task c holds
  // pairs [rotate_first_pair(8c), + pairs_per_task) -- half-split, chunk c and its partner chunk
  // R / 16 on (eight pairs), interleaved, chunk c (four pairs). A pair's angle is fp32 (its
  // frequency from the CTA's table); the rotation runs in T's packed arithmetic (arch::rotate2 /
  // arch::rotate_halves: two roundings of T per element, as the decode kernels rotate keys).
  static constexpr bool half_split = [] {
    if constexpr (rotates) return Mask::rotary_layout_v == rotary_layout::half_split;
    else return true;
  }();
  static constexpr int task_pairs = half_split ? 8 : 4;

  // The task of row r, chunk c, at the angles' cosines cs and sines sn, in place.
  static KVTILE_DEVICE KVTILE_FORCEINLINE void rotate_task(unsigned char* tile, int rows, int rdims, int r, int c,
                                                           const float (&cs)[task_pairs], const float (&sn)[task_pairs]) {
    uint4* pa = reinterpret_cast<uint4*>(tile + arch::sw128_offset(rows, r, c));
    uint4 lo = *pa;
    std::uint32_t x[4] = {lo.x, lo.y, lo.z, lo.w};
    if constexpr (half_split) {
      uint4* pb = reinterpret_cast<uint4*>(tile + arch::sw128_offset(rows, r, c + rdims / 16));
      const uint4 hi = *pb;
      std::uint32_t y[4] = {hi.x, hi.y, hi.z, hi.w};
      KVTILE_PRAGMA_UNROLL
      for (int i = 0; i < 4; ++i)
        arch::rotate2<T>(x[i], y[i], arch::pack2<T>(cs[2 * i], cs[2 * i + 1]), arch::pack2<T>(sn[2 * i], sn[2 * i + 1]));
      *pb = make_uint4(y[0], y[1], y[2], y[3]);
    } else {
      KVTILE_PRAGMA_UNROLL
      for (int i = 0; i < 4; ++i) arch::rotate_halves<T>(x[i], arch::pack2<T>(cs[i], cs[i]), arch::pack2<T>(-sn[i], sn[i]));
    }
    *pa = make_uint4(x[0], x[1], x[2], x[3]);
  }

  // Rows [r0, r0 + n) of the SW128 tile at `tile` (`rows` rows), row r at position pos(r), over
  // threads [0, nt) of the caller (this one `id`), each angle from rotary_cos_sin_fast. For the
  // Q tile (once a work tile) and keys at positions that are not consecutive.
  template <class Position>
  static KVTILE_DEVICE KVTILE_FORCEINLINE void rotate_rows(unsigned char* tile, int rows, int r0, int n, const float* freq,
                                                           int rdims, Position&& pos, int id, int nt) {
    const int per_row = rotate_rotated_tasks<Mask::rotary_layout_v>(rdims);
    for (int x = id; x < n * per_row; x += nt) {
      const int r = r0 + x / per_row, c = x % per_row;
      const float* f = freq + rotate_first_pair<Mask::rotary_layout_v>(8 * c);
      const float p = float(pos(r));
      float cs[task_pairs], sn[task_pairs];
      KVTILE_PRAGMA_UNROLL
      for (int j = 0; j < task_pairs; ++j) rotary_cos_sin_fast(p, f[j], cs[j], sn[j]);
      rotate_task(tile, rows, rdims, r, c, cs, sn);
    }
  }

  // A K tile (block_kv rows, row r the key ks + r) by the rotating warps (id in [0, rotators)):
  // a thread keeps one task column c and takes rows r0, r0 + step, ... (step = the threads per
  // column). Keys at consecutive positions (rotary_keys_consecutive) take the first row's angles
  // exactly and step them on by a rotation through step * f (four fp32 operations a pair instead
  // of a range reduction and two multi-function ops, ~2^-21 each step); others go row by row.
  template <class Variant>
  static KVTILE_DEVICE KVTILE_FORCEINLINE void rotate_k_tile(unsigned char* tile, const Variant& v, int ks,
                                                             const float* freq, int rdims, int id) {
    if constexpr (rotary_keys_consecutive<Variant>) {
      const int per_row = rotate_rotated_tasks<Mask::rotary_layout_v>(rdims), step = rotators / per_row;
      if (id >= step * per_row) return;
      const int c = id % per_row, r0 = id / per_row;
      const float* f = freq + rotate_first_pair<Mask::rotary_layout_v>(8 * c);
      const float p0 = float(v.key_position(ks + r0));
      float cs[task_pairs], sn[task_pairs], dc[task_pairs], ds[task_pairs];
      KVTILE_PRAGMA_UNROLL
      for (int j = 0; j < task_pairs; ++j) {
        rotary_cos_sin_fast(p0, f[j], cs[j], sn[j]);
        rotary_cos_sin_fast(float(step), f[j], dc[j], ds[j]);
      }
      for (int r = r0; r < G::block_kv; r += step) {
        rotate_task(tile, G::block_kv, rdims, r, c, cs, sn);
        KVTILE_PRAGMA_UNROLL
        for (int j = 0; j < task_pairs; ++j) {
          const float cn = cs[j] * dc[j] - sn[j] * ds[j];
          sn[j] = sn[j] * dc[j] + cs[j] * ds[j];
          cs[j] = cn;
        }
      }
    } else {
      rotate_rows(tile, G::block_kv, 0, G::block_kv, freq, rdims, [&](int r) { return v.key_position(ks + r); }, id,
                  rotators);
    }
  }

  // A work tile's extent, as both roles see it: the rows it stores, their query positions, the
  // keys, and the visible key tiles (next_tile).
  template <class Source>
  struct extent {
    const Source& src;
    int row_lo, row_hi, q0, q1, kv_lo, kv_hi, kv_limit, n_tiles;
    KVTILE_DEVICE explicit extent(const Source& s)
        : src(s), row_lo(s.row_lo), row_hi(s.row_hi), q0(s.token(s.row_lo)), q1(s.token(max_i(s.row_hi, s.row_lo + 1) - 1) + 1),
          kv_lo(s.kv_lo), kv_hi(s.kv_hi), kv_limit(s.kv_limit),
          n_tiles(s.row_hi > s.row_lo && s.kv_hi > s.kv_lo ? (s.kv_hi - s.kv_lo + G::block_kv - 1) / G::block_kv : 0) {}
    KVTILE_DEVICE KVTILE_FORCEINLINE int next_tile(int i) const {
      while (i < n_tiles && src.mask.classify(q0, q1, kv_lo + i * G::block_kv, kv_lo + (i + 1) * G::block_kv) ==
                                tile_visibility::empty)
        ++i;
      return i;
    }
  };

  template <class Schedule>
  static KVTILE_DEVICE void run(const Schedule& schedule, unsigned char* smem_raw) {
    const int tid = int(threadIdx.x), warp = tid / 32, lane = tid % 32;
    const std::uint32_t raw = arch::smem_addr(smem_raw);
    const std::uint32_t q_base = (raw + 1023u) & ~1023u;            // [block_q rows] SW128
    const std::uint32_t k_base = q_base + G::q_bytes;               // [stages][block_kv rows]
    const std::uint32_t v_base = k_base + G::stages * G::kv_bytes;  // [stages][block_kv rows]
    const std::uint32_t bars = v_base + G::stages * G::kv_bytes;
    const std::uint32_t q_full = bars, q_empty = bars + 8u;
    // Rotating: ready_k per slot after the geometry's barriers, then the frequency table.
    // Converting: ready_k, then ready_v per slot.
    auto ready_k = [&](int slot) { return bars + 8u * std::uint32_t(2 + 4 * G::stages + slot); };
    auto ready_v = [&](int slot) { return bars + 8u * std::uint32_t(2 + 5 * G::stages + slot); };
    float* const freq = reinterpret_cast<float*>(smem_raw + (bars + 8u * std::uint32_t(2 + 5 * G::stages) - raw));
    int rdims = 0;  // rotating: the rotated dims R
    auto full_k = [&](int slot) { return bars + 8u * std::uint32_t(2 + slot); };
    auto full_v = [&](int slot) { return bars + 8u * std::uint32_t(2 + G::stages + slot); };
    auto empty_k = [&](int slot) { return bars + 8u * std::uint32_t(2 + 2 * G::stages + slot); };
    auto empty_v = [&](int slot) { return bars + 8u * std::uint32_t(2 + 3 * G::stages + slot); };

    if (tid == 0) {
      arch::mbarrier_init(q_full, 1);
      arch::mbarrier_init(q_empty, 4 * G::consumers);  // one arrival per consumer warp
      for (int x = 0; x < G::stages; ++x) {
        arch::mbarrier_init(full_k(x), 1);
        arch::mbarrier_init(full_v(x), 1);
        arch::mbarrier_init(empty_k(x), 4 * G::consumers);
        arch::mbarrier_init(empty_v(x), 4 * G::consumers);
        // One arrival per rotating warp; converting, one per converting thread (the consumers
        // write zeros over a converted V tile's tail rows, after each writer's own release).
        if constexpr (transforms) arch::mbarrier_init(ready_k(x), converts ? rotators : rotators / 32);
        if constexpr (converts) arch::mbarrier_init(ready_v(x), rotators);
      }
      arch::fence_barrier_init();
    }
    if constexpr (rotates) {
      const auto v = schedule.variant();
      rdims = v.rotary_dims(D);
      for (int i = tid; i < rdims / 2; i += G::threads) freq[i] = rotary_inv_freq(i, rdims, v.rotary_theta());
    }
    __syncthreads();

    if (warp < 4) {  // ---- producer warpgroup ----
      if constexpr (G::reallocate) arch::warpgroup_registers_dec<producer_regs>();
      if constexpr (converts) {
        if (warp > 0) {  // warps 1 .. 3: convert each K and V tile once it has landed, then publish it
          int c = 0;
          auto publish = [&](std::uint32_t bar) {
            arch::fence_proxy_async_shared();  // the converted tile, to the wgmma's async proxy
            arch::mbarrier_arrive(bar);
          };
          schedule.for_each([&](const auto& src) {
            const extent<std::decay_t<decltype(src)>> e(src);
            for (int i = e.next_tile(0); i < e.n_tiles; i = e.next_tile(i + 1), ++c) {
              const int slot = c % G::stages;
              const std::uint32_t parity = std::uint32_t((c / G::stages) & 1);
              arch::mbarrier_wait(full_k(slot), parity);
              convert_tile(smem_raw + (k_base + slot * G::kv_bytes - raw), tid - 32);
              publish(ready_k(slot));
              arch::mbarrier_wait(full_v(slot), parity);
              convert_tile(smem_raw + (v_base + slot * G::kv_bytes - raw), tid - 32);
              publish(ready_v(slot));
            }
          });
          return;
        }
      }
      if constexpr (rotates) {
        if (warp > 0) {  // warps 1 .. 3: rotate each K tile once it has landed, then publish it
          int c = 0;
          schedule.for_each([&](const auto& src) {
            const extent<std::decay_t<decltype(src)>> e(src);
            for (int i = e.next_tile(0); i < e.n_tiles; i = e.next_tile(i + 1), ++c) {
              const int slot = c % G::stages, ks = src.k_start(e.kv_lo + i * G::block_kv);
              arch::mbarrier_wait(full_k(slot), std::uint32_t((c / G::stages) & 1));
              rotate_k_tile(smem_raw + (k_base + slot * G::kv_bytes - raw), src.mask, ks, freq, rdims, tid - 32);
              arch::fence_proxy_async_shared();  // the rotated K, to the wgmma's async proxy
              __syncwarp();
              if (lane == 0) arch::mbarrier_arrive(ready_k(slot));
            }
          });
          return;
        }
      }
      // The copies: thread 0 alone for a source whose tiles are a few large boxes (dense), the
      // whole of warp 0 for one whose tiles are many small boxes (ws_warp_issue: the paged
      // append's one box per page, lane l issuing box l of the tile, its page looked up a tile
      // ahead, while the warp waits for the slot).
      using Source = typename Schedule::source_type;
      constexpr bool by_warp = ws_warp_issue<Source>;
      if (by_warp ? warp != 0 : tid != 0) return;
      int c = 0;       // K/V tiles issued: slot c % stages
      int q_uses = 0;  // work tiles with a Q
      schedule.for_each([&](const Source& src) {
        const extent<Source> e(src);
        const int first = e.next_tile(0);
        if (first >= e.n_tiles) return;  // Q only where a tile is visible: every copy is waited for
        if constexpr (!ws_q_by_consumers<Source>) {
          if (q_uses > 0) arch::mbarrier_wait(q_empty, std::uint32_t((q_uses - 1) & 1));  // the last Q's readers are done
          arch::mbarrier_arrive_expect_tx(q_full, G::q_bytes);
          src.issue_q(q_base, q_full);
        }
        ++q_uses;
        // Where tile i's copies come from, as the source's issue_k / issue_v take it: its first
        // key, or (by_warp) this lane's share of it, looked up before the tile's slot is free.
        auto locate = [&](int i) {
          if constexpr (by_warp) return src.locate(e.kv_lo + i * G::block_kv, lane);
          else return 0;
        };
        auto from = [&](int i, const auto& ahead) {
          if constexpr (by_warp) return ahead;
          else return e.kv_lo + i * G::block_kv;
        };
        auto expect = [&](std::uint32_t bar) {
          if constexpr (by_warp) {
            if (lane == 0) arch::mbarrier_arrive_expect_tx(bar, tile_tx_bytes);
            __syncwarp();  // the bytes are expected before any lane's copy lands
          } else {
            arch::mbarrier_arrive_expect_tx(bar, tile_tx_bytes);
          }
        };
        auto at = locate(first);
        for (int i = first; i < e.n_tiles; ++c) {
          const int slot = c % G::stages;
          const std::uint32_t reuse = std::uint32_t((c / G::stages - 1) & 1);  // the slot's previous use
          const std::uint32_t k_slot = k_base + slot * G::kv_bytes, v_slot = v_base + slot * G::kv_bytes;
          const auto where = from(i, at);
          if (c >= G::stages) arch::mbarrier_wait(empty_k(slot), reuse);
          expect(full_k(slot));
          if constexpr (converts) src.issue_k(k_slot + G::kv_bytes / 2, k_slot, where, full_k(slot));  // bytes, scales
          else src.issue_k(k_slot, where, full_k(slot));
          if (c >= G::stages) arch::mbarrier_wait(empty_v(slot), reuse);
          expect(full_v(slot));
          if constexpr (converts) src.issue_v(v_slot + G::kv_bytes / 2, v_slot, where, full_v(slot));
          else src.issue_v(v_slot, where, full_v(slot));
          i = e.next_tile(i + 1);
          if (i < e.n_tiles) at = locate(i);
        }
      });
      return;
    }

    // ---- consumer warpgroups ----
    if constexpr (G::reallocate) arch::warpgroup_registers_inc<consumer_regs>();
    const int cw = warp / 4 - 1, wq = warp % 4;  // consumer warpgroup, warp in it
    const int g = lane / 4, t = lane % 4;
    const int row_local = cw * 64 + wq * 16 + g;  // this thread's rows: row_local, row_local + 8
    const int ctid = tid - 128;                   // among the consumer threads
    const std::uint32_t q_wg = q_base + std::uint32_t(cw) * 64 * 128;
    constexpr std::uint32_t sbo = 1024;

    // Ping-pong: warpgroup cw issues its GEMMs after its named barrier, then hands the turn to
    // the next one. The last warpgroup opens the first turn.
    auto wait_turn = [&] {
      if constexpr (G::consumers > 1) arch::named_barrier_sync(turn_barrier + cw, 256);
    };
    auto pass_turn = [&] {
      if constexpr (G::consumers > 1) arch::named_barrier_arrive(turn_barrier + (cw + 1) % G::consumers, 256);
    };
    if constexpr (G::consumers > 1)
      if (cw == G::consumers - 1) arch::named_barrier_arrive(turn_barrier, 256);

    auto issue_qk = [&](float (&s)[G::s_regs], int slot) {
      const std::uint32_t k_tile = k_base + std::uint32_t(slot) * G::kv_bytes;
      arch::wgmma_fence();
      KVTILE_PRAGMA_UNROLL
      for (int kd = 0; kd < G::d_steps; ++kd) {
        const std::uint32_t col = std::uint32_t(kd / 4), in_atom = std::uint32_t(kd % 4) * 32;
        const std::uint64_t da = arch::sw128_desc(q_wg + col * G::block_q * 128 + in_atom, 16, sbo);
        const std::uint64_t db = arch::sw128_desc(k_tile + col * G::block_kv * 128 + in_atom, 16, sbo);
        qk_op::ss(s, da, db, kd > 0 ? 1 : 0);
      }
      arch::wgmma_commit();
    };
    auto release = [&](std::uint32_t bar) {
      if (lane == 0) arch::mbarrier_arrive(bar);
    };
    auto v_parity = [&](int c) { return std::uint32_t((c / G::stages) & 1); };
    auto wait_k = [&](int slot, int c) { arch::mbarrier_wait(transforms ? ready_k(slot) : full_k(slot), v_parity(c)); };
    auto wait_v = [&](int slot, int c) { arch::mbarrier_wait(converts ? ready_v(slot) : full_v(slot), v_parity(c)); };

    int c = 0;       // K/V tiles consumed: slot c % stages, phase v_parity(c)
    int q_uses = 0;  // work tiles with a Q
    schedule.for_each([&](const auto& src) {
      using Source = std::decay_t<decltype(src)>;
      const extent<Source> e(src);
      const Mask& mask = src.mask;
      const int wr0 = max_i(cw * 64, e.row_lo), wr1 = min_i(cw * 64 + 64, e.row_hi);  // this warpgroup's stored rows
      const int wq0 = wr0 < wr1 ? src.token(wr0) : 0, wq1 = wr0 < wr1 ? src.token(wr1 - 1) + 1 : 0;
      const int row_pos[2] = {src.token(row_local), src.token(row_local + 8)};
      float scale_log2 = softmax_scale_log2<Mask>(src.scale_log2);

      float o[G::o_regs];
      KVTILE_PRAGMA_UNROLL
      for (int x = 0; x < G::o_regs; ++x) o[x] = 0.f;
      arch::fence_operands(o);
      softmax_row_stats st[2];  // rows g and g + 8 of this warp's 16
      st[0].init();
      st[1].init();

      // A tile this warpgroup sees nothing of is computed as a partial one whose every score is
      // masked (P = 0, the statistics unchanged): the GEMMs of every tile are issued alike, so
      // the wgmma pipeline has no branch in it.
      auto visibility = [&](int k0) {
        tile_visibility vis = wq0 < wq1 ? mask.classify(wq0, wq1, k0, k0 + G::block_kv) : tile_visibility::empty;
        if (vis == tile_visibility::empty || k0 + G::block_kv > e.kv_limit || src.k_start(k0) != k0)
          vis = tile_visibility::partial;
        return vis;
      };
      auto issue_pv = [&](int slot, const std::uint32_t (&pa)[G::kv_steps][4]) {
        const std::uint32_t v_tile = v_base + std::uint32_t(slot) * G::kv_bytes;
        arch::wgmma_fence();
        KVTILE_PRAGMA_UNROLL
        for (int j = 0; j < G::kv_steps; ++j) {
          const std::uint64_t db = arch::sw128_desc(v_tile + std::uint32_t(j) * 16 * 128, G::block_kv * 128, sbo);
          pv_op::template rs<1>(o, pa[j], db, 1);
        }
        arch::wgmma_commit();
      };
      // Scores of a tile -> the variant's transform, the mask, the online softmax, in place (s
      // becomes P in fp32); returns the factors the accumulator rows must take.
      auto softmax = [&](float (&s)[G::s_regs], int k0, tile_visibility vis, float (&factor)[2]) {
        apply_logits(mask, s, src.scale_log2);  // a variant's logit transform (nothing for a mask)
        if (vis == tile_visibility::partial) {
          const bool none = wq0 >= wq1 || mask.classify(wq0, wq1, k0, k0 + G::block_kv) == tile_visibility::empty;
          const int ks = src.k_start(k0);  // the key of the tile's first shared-memory row
          KVTILE_PRAGMA_UNROLL
          for (int j = 0; j < G::block_kv / 8; ++j)
            KVTILE_PRAGMA_UNROLL
            for (int cc = 0; cc < 4; ++cc) {
              const int col = ks + j * 8 + 2 * t + (cc % 2);
              if (none || !(col >= k0 && col < e.kv_limit && mask.visible(row_pos[cc / 2], col))) s[4 * j + cc] = neg_inf;
            }
        }
        KVTILE_PRAGMA_UNROLL
        for (int half = 0; half < 2; ++half) {
          float base;
          factor[half] = st[half].enter_tile(fragment_row_max(s, half) * scale_log2, base);
          st[half].l += fragment_row_exp2(s, half, scale_log2, base);
        }
      };
      auto pack_p = [&](const float (&s)[G::s_regs], std::uint32_t (&pa)[G::kv_steps][4]) { fragment_to_a<Tc>(s, pa); };
      auto rescale_o = [&](const float (&factor)[2]) {
        KVTILE_PRAGMA_UNROLL
        for (int j = 0; j < D / 8; ++j) {
          o[4 * j + 0] *= factor[0];
          o[4 * j + 1] *= factor[0];
          o[4 * j + 2] *= factor[1];
          o[4 * j + 3] *= factor[1];
        }
      };

      int i = e.next_tile(0);
      if (i < e.n_tiles) {
        if constexpr (ws_q_by_consumers<Source>) {
          // The consumer threads copy Q, once every warp is past its last Q K^T of the tile before.
          if (q_uses > 0) arch::named_barrier_sync(consumers_barrier, 128 * G::consumers);
          src.load_q(q_base, ctid, 128 * G::consumers);
          arch::cp_async_commit();
          arch::cp_async_wait<0>();
          if constexpr (q_converts) {
            // Every row has landed; each warp takes its own 16 rows into Tc.
            arch::named_barrier_sync(consumers_barrier, 128 * G::consumers);
            scale_log2 *= q_to_compute(smem_raw + (q_base - raw), cw * 64 + wq * 16, lane);
          }
          arch::fence_proxy_async_shared();  // the copies, to the wgmma's async proxy
          arch::named_barrier_sync(consumers_barrier, 128 * G::consumers);
        } else {
          arch::mbarrier_wait(q_full, std::uint32_t(q_uses & 1));
        }
        if constexpr (rotates) {  // this warpgroup's 64 rows, at their query positions
          rotate_rows(smem_raw + (q_base - raw), G::block_q, cw * 64, 64, freq, rdims,
                      [&](int r) { return mask.query_position(src.token(r)); }, ctid % 128, 128);
          arch::fence_proxy_async_shared();
          arch::named_barrier_sync(q_rotated_barrier + cw, 128);
        }
        ++q_uses;
        // The first tile: S, softmax; its P V waits for the next tile's Q K^T.
        float s[G::s_regs];
        float factor[2];
        std::uint32_t pa[G::kv_steps][4];
        int k0 = e.kv_lo + i * G::block_kv;
        int slot = c % G::stages;
        wait_k(slot, c);
        wait_turn();
        issue_qk(s, slot);
        pass_turn();
        arch::wgmma_wait<0>();
        arch::fence_operands(s);
        release(empty_k(slot));
        softmax(s, k0, visibility(k0), factor);
        pack_p(s, pa);
        for (i = e.next_tile(i + 1), ++c; i < e.n_tiles; i = e.next_tile(i + 1), ++c) {
          const int prev = (c - 1) % G::stages;
          slot = c % G::stages;
          k0 = e.kv_lo + i * G::block_kv;
          wait_k(slot, c);
          wait_turn();
          issue_qk(s, slot);      // S of this tile ...
          rescale_o(factor);      // (O is no wgmma's operand now: the last P V was waited for)
          wait_v(prev, c - 1);
          issue_pv(prev, pa);     // ... and P V of the previous one, in flight together
          pass_turn();
          arch::wgmma_wait<1>();  // S
          arch::fence_operands(s);
          release(empty_k(slot));
          softmax(s, k0, visibility(k0), factor);
          arch::wgmma_wait<0>();  // P V
          arch::fence_operands(o);
          release(empty_v(prev));
          pack_p(s, pa);
        }
        // Every Q K^T of this tile is done: the producer may load the next Q.
        if constexpr (!ws_q_by_consumers<Source>) release(q_empty);
        // The last tile's P V.
        const int prev = (c - 1) % G::stages;
        rescale_o(factor);
        wait_v(prev, c - 1);
        if constexpr (ws_zero_v_tail<Source>) {
          const int ks = src.k_start(k0), n_valid = e.kv_limit - ks;
          if (n_valid < G::block_kv) {  // zero V rows [n_valid, block_kv) of the slot, then publish
            const std::uint32_t v_tile = v_base + std::uint32_t(prev) * G::kv_bytes;
            constexpr int chunks = D / 8;
            for (int x = ctid; x < (G::block_kv - n_valid) * chunks; x += 128 * G::consumers) {
              const int r = n_valid + x / chunks, cc = x % chunks;
              asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(v_tile + arch::sw128_offset(G::block_kv, r, cc)),
                           "r"(0u)
                           : "memory");
            }
            arch::fence_proxy_async_shared();
            arch::named_barrier_sync(consumers_barrier, 128 * G::consumers);
          }
        }
        issue_pv(prev, pa);
        arch::wgmma_wait<0>();
        arch::fence_operands(o);
        release(empty_v(prev));
      }

      // Epilogue: quad sum of l, LSE, normalise, store from the fragments.
      KVTILE_PRAGMA_UNROLL
      for (int r = 0; r < 2; ++r) {
        st[r].l += __shfl_xor_sync(0xffffffffu, st[r].l, 1);
        st[r].l += __shfl_xor_sync(0xffffffffu, st[r].l, 2);
        const int row = row_local + r * 8;
        if (row >= e.row_lo && row < e.row_hi) {
          const float inv = st[r].inv_l() * ws_out_factor(src);
          float out[D / 4];
          KVTILE_PRAGMA_UNROLL
          for (int j = 0; j < D / 8; ++j) {
            out[2 * j] = o[4 * j + 2 * r] * inv;
            out[2 * j + 1] = o[4 * j + 2 * r + 1] * inv;
          }
          src.store(row, out, st[r].lse(), t);
        }
      }
    });
    // The first warpgroup takes the last turn the last one handed on, so no arrival is left
    // pending on a named barrier when the CTA exits.
    if constexpr (G::consumers > 1)
      if (cw == 0) arch::named_barrier_sync(turn_barrier, 256);
  }
};

// The dense prefill's work tiles (q tile, query head, sequence) in the launch grid's order: the
// q tiles of one head and sequence together, heaviest (causal) first, so that the CTAs running
// at once read the same K and V (from L2; ordered head-major instead, the concurrent tiles of a
// 16k sequence read every head's K/V at once and ran 10-20% slower, perf-log prefill sm90 v9).
// A CTA per work tile (the launch grid: q tiles x heads x batch, the block scheduler handing
// tiles to free SMs), or persistent: gridDim.x CTAs, CTA c taking in round k the work tile
// k * gridDim.x + c, the order reversed every other round (a snake) so that no CTA gets the
// heavier end of every round.
template <class T, int D, class G, class Mask>
struct ws_dense_schedule {
  using source_type = dense_ws_source<T, D, G, Mask>;
  const ws_dense_params<T, Mask>& p;
  KVTILE_DEVICE KVTILE_FORCEINLINE Mask variant() const { return Mask(p.p.mask, 1, 1); }
  template <class F>
  KVTILE_DEVICE KVTILE_FORCEINLINE void for_each(F&& f) const {
    const int heads = p.p.q_layout.heads, batch = p.p.q_layout.batch;
    auto run = [&](int q_tile, int h, int b) {
      if (q_tile * G::block_q >= p.p.q_layout.len_of(b)) return;  // past this sequence's queries
      const source_type src(p, q_tile, h, b);
      f(src);
    };
    if (!p.persistent) {
      run(int(gridDim.x) - 1 - int(blockIdx.x), int(blockIdx.y), int(blockIdx.z));
      return;
    }
    const int total = p.q_tiles * heads * batch, ctas = int(gridDim.x), cta = int(blockIdx.x);
    for (int round = 0;; ++round) {
      const int w = round * ctas + (round % 2 == 0 ? cta : ctas - 1 - cta);
      if (w >= total) break;
      const int rest = w / p.q_tiles;
      run(p.q_tiles - 1 - w % p.q_tiles, rest % heads, rest / heads);
    }
  }
};

template <class T, int D, class Tile, class Mask>
struct prefill_sm90_ws_kernel {
  using G = ws_geometry<T, D, Tile>;
  using core = sm90_ws_core<T, D, Tile, Mask>;
  using params = ws_dense_params<T, Mask>;
  static constexpr std::size_t smem_bytes = core::smem_bytes;

  static KVTILE_DEVICE void run(const params& p, unsigned char* smem_raw) {
    core::run(ws_dense_schedule<T, D, G, Mask>{p}, smem_raw);
  }
};

template <class Kernel>
KVTILE_KERNEL void __launch_bounds__(Kernel::G::threads, 1)
    prefill_sm90_ws_entry(const __grid_constant__ typename Kernel::params p) {
#if KVTILE_WGMMA_AVAILABLE
  extern __shared__ __align__(1024) unsigned char prefill_sm90_ws_smem[];
  Kernel::run(p, prefill_sm90_ws_smem);
#else
  (void)p;
#endif
}

// Whether a dense tensor can be a TMA tensor map of (head dim, heads, rows): varlen layouts, and
// fixed-length ones whose sequences follow each other (stride_batch = len * stride_token) with
// fewer than 2^31 rows; 16-byte aligned.
inline bool dense_tma_layout_ok(const void* base, const ragged_layout& l) {
  const bool rows_ok = l.indptr != nullptr || (l.stride_batch == std::int64_t(l.len) * l.stride_token &&
                                               std::int64_t(l.batch) * l.len < (std::int64_t(1) << 31));
  return rows_ok && reinterpret_cast<std::uintptr_t>(base) % 16 == 0 && l.stride_head > 0 && l.stride_token > 0;
}

// The tensor map of a dense tensor (host): dims (head dim, heads, rows), boxes of 64 columns x
// 1 head x box_rows rows, 128-byte swizzle; rows before the first and past the end of a fixed
// layout read as zeros. A varlen layout's row count lives on the device: its map says 2^31 - 1
// rows and the source never loads past the last sequence (dense_ws_source).
template <class T>
CUtensorMap make_dense_tma(const T* base, const ragged_layout& l, int box_rows) {
  const std::uint64_t eb = sizeof(T);
  const std::int64_t rows = l.indptr != nullptr ? (std::int64_t(1) << 31) - 1 : std::int64_t(l.batch) * l.len;
  const cuuint64_t dims[3] = {cuuint64_t(l.head_dim), cuuint64_t(l.heads), cuuint64_t(rows)};
  const cuuint64_t strides[2] = {cuuint64_t(l.stride_head) * eb, cuuint64_t(l.stride_token) * eb};
  const cuuint32_t box[3] = {64, 1, cuuint32_t(box_rows)};
  const cuuint32_t unit[3] = {1, 1, 1};
  CUtensorMap map;
  const CUresult r = tensor_map_encoder()(&map, tensor_map_type<T>(), 3, const_cast<T*>(base), dims, strides, box, unit,
                                          CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                          CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  KVTILE_REQUIRE(r == CUDA_SUCCESS, errc::unsupported, "cuTensorMapEncodeTiled refused a dense tensor (error ", int(r),
                 "; strides in bytes ", strides[0], ", ", strides[1], " must be multiples of 16 below 2^40)");
  return map;
}

// Launches the warp-specialised kernel for `p` (checked; dense_tma_layout_ok for q, k and v).
template <class Kernel, class T, class Mask>
void launch_prefill_sm90_ws(const prefill_params<T, Mask>& p, std::int32_t max_q_len, int device, cudaStream_t stream) {
  using G = typename Kernel::G;
  int smem_optin = 0;
  KVTILE_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  KVTILE_REQUIRE(Kernel::smem_bytes <= std::size_t(smem_optin), errc::unsupported, "prefill_sm90 tile <", G::block_q,
                 ", ", G::block_kv, ", ", 4 * (G::consumers + 1), ", ", G::stages, "> needs ", Kernel::smem_bytes,
                 " bytes of shared memory, device ", device, " allows ", smem_optin);
  dim3 g = prefill_grid(p.q_layout, max_q_len, G::block_q);
  if (g.x == 0 || g.y == 0 || g.z == 0) return;
  typename Kernel::params kp;
  kp.p = p;
  kp.q_tiles = std::int32_t(g.x);
  // Persistent: one CTA per SM walks the work tiles (ws_dense_schedule), where there are more
  // and they are short (tuning::prefill_sm90_persistent_max_q).
  int sms = 0;
  KVTILE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const std::int64_t work = std::int64_t(g.x) * g.y * g.z;
  KVTILE_REQUIRE(work < (std::int64_t(1) << 31), errc::unsupported, "prefill_sm90: ", work,
                 " work tiles (q tiles x heads x sequences); the kernel indexes fewer than 2^31");
  kp.persistent = max_q_len <= tuning::prefill_sm90_persistent_max_q && work > sms ? 1 : 0;
  if (kp.persistent) g = dim3(unsigned(sms), 1, 1);
  kp.q = make_dense_tma(p.q, p.q_layout, G::block_q);
  kp.k = make_dense_tma(p.k, p.kv_layout, G::block_kv);
  kp.v = make_dense_tma(p.v, p.kv_layout, G::block_kv);
  auto* fn = &prefill_sm90_ws_entry<Kernel>;
  KVTILE_CUDA_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, int(Kernel::smem_bytes)));
  fn<<<g, G::threads, Kernel::smem_bytes, stream>>>(kp);
  KVTILE_CUDA_CHECK_LAUNCH();
}


// The two sm_90a prefill kernels behind one tile: a warp-specialised tile (prefill_sm90_ws_tile_ok)
// runs the TMA kernel wherever the tensors can be tensor maps (dense_tma_layout_ok) and the
// cp.async kernel with its default tile elsewhere; a cp.async tile (prefill_sm90_tile_ok) runs
// the cp.async kernel. cuda::prefill and cuda::prefill_sm90 both launch through here.
template <class T, int D, class Tile, class Mask>
struct sm90_prefill_kernels {
  static constexpr bool warp_specialised = prefill_sm90_ws_tile_ok<D, Tile>;
  // Whether the cp.async kernel exists for D (64 and 128) and the variant (it does not rotate
  // keys): otherwise only tensors the TMA can map run on sm_90a, the rest on the mma.sync kernel.
  static constexpr bool has_cp_async = (D == 64 || D == 128) && !has_rotary<Mask>;
  using cp_async_tile = std::conditional_t<warp_specialised || !has_cp_async,
                                           sm90_cp_async_default_tile_t<has_cp_async ? D : 128>, Tile>;
  using cp_async_kernel = prefill_sm90_kernel<T, has_cp_async ? D : 128, cp_async_tile, Mask>;  // D 256: never run
  using ws_kernel = prefill_sm90_ws_kernel<T, D, Tile, Mask>;  // instantiated only when warp_specialised
  static constexpr const char* ws_name = "prefill_sm90 (warp-specialised wgmma, TMA, sm_90a)";
  static constexpr const char* cp_async_name = "prefill_sm90 (wgmma, cp.async, sm_90a)";

  static constexpr std::size_t smem_bytes() {
    if constexpr (warp_specialised) return ws_kernel::smem_bytes;
    else return cp_async_kernel::G::smem_bytes;
  }
  // Whether an sm_90a kernel takes these tensors at all (else the mma.sync kernel runs).
  static bool can_launch(const prefill_params<T, Mask>& p) { return has_cp_async || tma(p); }
  // Whether these tensors run on the TMA kernel.
  static bool tma(const prefill_params<T, Mask>& p) {
    return warp_specialised && dense_tma_layout_ok(p.q, p.q_layout) && dense_tma_layout_ok(p.k, p.kv_layout) &&
           dense_tma_layout_ok(p.v, p.kv_layout);
  }
  static const char* name(bool use_tma) { return use_tma ? ws_name : cp_async_name; }
  // Why a warp-specialised tile runs the cp.async kernel, as text.
  static std::string why_not_tma() {
    return std::string("the TMA kernel maps varlen tensors and fixed-length ones whose sequences follow each other "
                       "(stride_batch = len * stride_token), 16-byte aligned, so ") +
           (has_cp_async ? "the cp.async kernel runs with its default tile"
                         : D == 256 ? "the mma.sync kernel runs (D 256)"
                                    : "the mma.sync kernel runs (a rotary variant: the cp.async kernel does not rotate keys)");
  }

  static void launch(const prefill_params<T, Mask>& p, std::int32_t max_q_len, int device, cudaStream_t stream) {
    if constexpr (warp_specialised) {
      if (tma(p)) {
        launch_prefill_sm90_ws<ws_kernel>(p, max_q_len, device, stream);
        return;
      }
    }
    if constexpr (has_cp_async) {
      launch_prefill_sm90<cp_async_kernel>(p, max_q_len, device, stream);
    } else {
      KVTILE_REQUIRE(false, errc::unsupported, "prefill_sm90 at D=", D, ": ", why_not_tma());
    }
  }
};

}  // namespace attention::cuda::detail
KVTILE_NAMESPACE_END
