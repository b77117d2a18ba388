// kvtile/attention/cuda/paged/decode_fp8_kernel.cuh: paged decode over fp8 (e4m3) K/V pages
// with cp.async (sm_80+; on Hopper the TMA decode kernel reads fp8 pages where it can:
// decode_sm90_kernel.cuh, plan.reason says which runs).
//
// The cp.async decode kernel (kernel.cuh) with pages of one byte per element: the same work
// items, warps (16 packed rows, WN warps splitting each key tile) and warp arithmetic
// (decode_warp.cuh), Q and O in T (fp16 / bf16), fp32 accumulation. Per key tile:
//
//   cp.async the fp8 K and V rows as bytes (half the bytes of a bf16 page) and, with
//   per_token_head scales, each row's two floats           -- ST-stage pipeline of byte tiles
//   each warp converts its own TPW rows of K and V to T    -- e4m3 is exact in fp16 / bf16
//   in registers (memory/cuda/fp8_convert.cuh) into a
//   padded T tile of its own (no CTA barrier: a warp
//   reads only the rows it converted)
//   S = Q K^T; per_token_head: S column j times k_scale[j]  -- item_scales (decode_warp.cuh)
//   scale, mask, online softmax; per_token_head: P column j times v_scale[j]
//   O += P V
//
// per_head scales cost nothing per tile: the K scale is folded into the softmax scale, the V
// scale into O before the epilogue. Scales multiply scores and probabilities, never elements.
// Two ways from the byte tile to the mma fragments (Registers; plan_options::fp8_registers
// picks, true by default: 1.05-1.44x the shared tiles on the H200, docs/perf-log/decode.md v16):
//   false  each warp converts its rows into a padded T tile of its own in shared memory, then
//          the bf16 kernels' ldmatrix path (one extra write and read of the tile per warp);
//   true   ldmatrix / ldmatrix.trans over the byte rows (padded to D + 16 bytes: conflict-free)
//          and conversion in registers to fp16 fragments whatever T is (fp8_compute_t: one cvt
//          per two codes), Q's fragments loaded in the matching head-dim order (a bf16 Q
//          converted times a power of two) and O written back through finish_rows' fp8 order
//          (decode_warp.cuh: scores_fp8, accumulate_fp8); head dims multiple of 32, variants
//          without rotary.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "kvtile/attention/cuda/arch/cp_async.cuh"
#include "kvtile/attention/cuda/paged/decode_warp.cuh"
#include "kvtile/attention/cuda/paged/kernel.cuh"
#include "kvtile/core/fast_divmod.hpp"
#include "kvtile/memory/cuda/fp8_convert.cuh"
#include "kvtile/memory/kv_codec.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda::paged {

template <int D>
using fp8_decode_config = kernel_config<paged_kernel_kind::decode, D>;

// Bytes between byte rows of a stage: D + 16 on the register path (ldmatrix over 8 rows of 16
// bytes without bank conflicts), D when each warp converts its rows to a T tile.
template <int D, bool Registers>
inline constexpr int fp8_row_bytes = Registers ? D + 16 : D;

// Dynamic shared memory of the kernel (paged_kernel_shape::decode_fp8_smem_bytes is the larger,
// the planner's bound).
template <int D, bool Registers>
constexpr std::size_t fp8_decode_smem_bytes() {
  using C = fp8_decode_config<D>;
  const std::size_t q_tile = std::size_t(C::bm) * (D + 8) * 2;
  const std::size_t t_tiles = Registers ? 0 : 2 * std::size_t(C::bn) * (D + 8) * 2;
  const std::size_t stages = 2 * std::size_t(C::stages) * C::bn * (fp8_row_bytes<D, Registers> + sizeof(float));
  const std::size_t reduce = std::size_t(C::wn) * 16 * (std::size_t(D + 4) * 4 + 8);
  const std::size_t tiles = q_tile + t_tiles + stages;
  return tiles > reduce ? tiles : reduce;
}

// The CTA's work (the kernel below is it over the dynamic shared memory): one work item,
// blockIdx.x, in smem_raw.
template <class T, int D, class Codec, class Mask, class Table, bool Registers>
KVTILE_DEVICE KVTILE_FORCEINLINE void paged_decode_fp8_cta(const kernel_params<T, Table, Mask, Codec>& p,
                                                           unsigned char* smem_raw) {
  using C = fp8_decode_config<D>;
  constexpr int BM = C::bm, BN = C::bn, WN = C::wn, ST = C::stages, NT = C::threads;
  constexpr int LD = D + 8;     // T tile row stride (elements): 16-byte pad, ldmatrix without bank conflicts
  constexpr int CPR = D / 16;   // 16-byte chunks per fp8 row
  constexpr int TPW = BN / WN;  // keys per warp per tile
  constexpr bool token_scales = memory::per_token_scales<Codec>;
  static_assert(memory::is_fp8_codec<Codec>, "paged_decode_fp8_kernel reads fp8 pools");
  static_assert(D % 16 == 0, "fp8 decode: head_dim must be a multiple of 16");
  static_assert(!Registers || (D % 32 == 0 && !has_rotary<Mask>),
                "fp8 decode in registers: head_dim a multiple of 32, no rotary (its fragments are in head-dim order)");
  constexpr int RB = fp8_row_bytes<D, Registers>;  // bytes between byte rows

  // Shared memory: Q [BM][LD] T | K, V converted [BN][LD] T each (not on the register path) |
  // K, V bytes [ST][BN][RB] each | K, V scales [ST][BN] floats each (per_token_head).
  T* q_s = reinterpret_cast<T*>(smem_raw);
  T* kt_s = q_s + BM * LD;
  T* vt_s = kt_s + BN * LD;
  std::uint8_t* k8_s = reinterpret_cast<std::uint8_t*>(Registers ? kt_s : vt_s + BN * LD);
  std::uint8_t* v8_s = k8_s + ST * BN * RB;
  float* ksc_s = reinterpret_cast<float*>(v8_s + ST * BN * RB);
  float* vsc_s = ksc_s + ST * BN;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wm = warp / WN, wn = warp % WN;
  const int g = lane / 4;

  const item_tiles<BM, BN, Mask> it(p, blockIdx.x);
  const paged_work_item& w = it.w;
  const int kvh = w.kv_head, row0 = w.row0, group = p.group, rows = it.rows;
  const int kv_begin = w.kv_begin, kv_end = w.kv_end, n_tiles = it.n_tiles;
  const Mask& mask = it.mask;
  const auto& pool = p.kv.pool;
  const auto* kbase = reinterpret_cast<const std::uint8_t*>(pool.k);
  const auto* vbase = reinterpret_cast<const std::uint8_t*>(pool.v);

  // ---- loads -------------------------------------------------------------------------------
  it.template q_chunks<D>(p, tid, NT, [&](int r, int c, const T* src, bool valid) {
    arch::cp_async_16(q_s + r * LD + c * 8, src, valid);
  });
  arch::cp_async_commit();

  const std::int32_t* pages = page_row(p.kv.table, w);
  const fast_divmod page(pool.page_size);
  constexpr bool fast_map = NT % CPR == 0 && BN % (NT / CPR) == 0;
  constexpr int RPP = fast_map ? NT / CPR : 1;  // rows per pass of the CTA
  constexpr int RPT = fast_map ? BN / RPP : 1;  // rows per thread per tile
  std::int32_t blk[RPT];
  auto fetch_blocks = [&](int tile) {
    if constexpr (fast_map) {
      const int k0 = kv_begin + tile * BN, k1 = min_i(k0 + BN, kv_end);
      KVTILE_PRAGMA_UNROLL
      for (int i = 0; i < RPT; ++i) {
        const int tok = k0 + tid / CPR + i * RPP;
        blk[i] = (tile < n_tiles && tok < k1) ? pages[page.div(tok)] : 0;
      }
    }
  };
  // Chunk c of row r of the stage: the row's bytes, and (chunk 0) its scales.
  auto load_chunk = [&](int stage, int r, int c, std::int32_t block, int tok, bool valid) {
    const int slot = valid ? page.mod(tok) : 0;
    const std::int64_t off = valid ? pool.offset(block, slot, kvh) + c * 16 : 0;
    arch::cp_async_16(k8_s + (stage * BN + r) * RB + c * 16, kbase + off, valid);
    arch::cp_async_16(v8_s + (stage * BN + r) * RB + c * 16, vbase + off, valid);
    if constexpr (token_scales) {
      if (c == 0) {
        arch::cp_async_4(ksc_s + stage * BN + r, valid ? static_cast<const void*>(pool.scale_ptr(pool.k, block, slot, kvh)) : pool.k,
                         valid);
        arch::cp_async_4(vsc_s + stage * BN + r, valid ? static_cast<const void*>(pool.scale_ptr(pool.v, block, slot, kvh)) : pool.v,
                         valid);
      }
    }
  };
  auto load_kv = [&](int stage, int tile) {
    const int k0 = kv_begin + tile * BN, k1 = min_i(k0 + BN, kv_end);
    if constexpr (fast_map) {
      const int c = tid % CPR;
      KVTILE_PRAGMA_UNROLL
      for (int i = 0; i < RPT; ++i) {
        const int r = tid / CPR + i * RPP;
        load_chunk(stage, r, c, blk[i], k0 + r, k0 + r < k1);
      }
    } else {
      for (int idx = tid; idx < BN * CPR; idx += NT) {
        const int r = idx / CPR, c = idx % CPR;
        const int tok = k0 + r;
        const bool valid = tok < k1;
        load_chunk(stage, r, c, valid ? pages[page.div(tok)] : 0, tok, valid);
      }
    }
  };

  // ---- state ---------------------------------------------------------------------------------
  using F = std::conditional_t<Registers, fp8_compute_t, T>;  // the fragments' type
  warp_rows<F, D, TPW> st;
  st.init();
  int t_row[2];
  KVTILE_PRAGMA_UNROLL
  for (int i = 0; i < 2; ++i) t_row[i] = (row0 + 16 * wm + g + 8 * i) / group;
  item_scales<F, Codec> scales(pool, kvh, p.scale_log2);

  int cur = it.next_tile(0);
  int fetch = cur, stage_w = 0, stage_r = 0;
  // The next visible tile's copies into the next stage (an empty group past the last tile).
  auto issue_next = [&] {
    if (fetch < n_tiles) {
      load_kv(stage_w, fetch);
      fetch = it.next_tile(fetch + 1);
      fetch_blocks(fetch);
    }
    arch::cp_async_commit();
    stage_w = (stage_w + 1) % ST;
  };
  fetch_blocks(fetch);
  KVTILE_PRAGMA_UNROLL
  for (int s = 0; s < ST - 1; ++s) issue_next();
  fill_rotary_table<D>(mask, tid, NT);  // a rotary variant's table
  arch::cp_async_wait<ST - 1>();         // the Q group has landed
  __syncthreads();

  if constexpr (Registers) {
    scales.scale_log2 *= st.load_q_fp8_order(q_s, 16 * wm, lane);
  } else {
    st.load_q(q_s, 16 * wm, lane);
    st.rotate_q(mask, t_row, lane);
  }

  // This warp's rows of the converted tiles: keys [wn * TPW, wn * TPW + TPW) of each tile.
  T* kt = kt_s + wn * TPW * LD;
  T* vt = vt_s + wn * TPW * LD;
  if constexpr (Registers) (void)kt, (void)vt;

  // ---- main loop -----------------------------------------------------------------------------
  while (cur < n_tiles) {
    issue_next();
    arch::cp_async_wait<ST - 1>();
    __syncthreads();

    const std::uint8_t* k8 = k8_s + stage_r * BN * RB;  // the stage's byte tiles
    const std::uint8_t* v8 = v8_s + stage_r * BN * RB;
    if constexpr (!Registers) {
      // Convert this warp's rows (the previous tile's ldmatrix reads of kt / vt are done: they
      // are warp-synchronous, and __syncwarp orders them before these stores).
      __syncwarp();
      KVTILE_PRAGMA_UNROLL
      for (int idx = lane; idx < TPW * CPR; idx += 32) {
        const int r = idx / CPR, c = idx % CPR;
        uint4 lo, hi;
        memory::cuda::e4m3x16_to<T>(*reinterpret_cast<const uint4*>(k8 + (wn * TPW + r) * RB + c * 16), lo, hi);
        *reinterpret_cast<uint4*>(kt + r * LD + c * 16) = lo;
        *reinterpret_cast<uint4*>(kt + r * LD + c * 16 + 8) = hi;
        memory::cuda::e4m3x16_to<T>(*reinterpret_cast<const uint4*>(v8 + (wn * TPW + r) * RB + c * 16), lo, hi);
        *reinterpret_cast<uint4*>(vt + r * LD + c * 16) = lo;
        *reinterpret_cast<uint4*>(vt + r * LD + c * 16 + 8) = hi;
      }
      __syncwarp();
    }

    typename warp_rows<F, D, TPW>::tile_scores s;
    const int k0 = kv_begin + cur * BN, k1 = min_i(k0 + BN, kv_end);
    if constexpr (Registers)
      st.template scores_fp8<padded_byte_rows<RB>>(s, k8, wn * TPW, lane);
    else
      st.template scores<padded_tile<D>>(s, kt, 0, lane, mask, k0 + wn * TPW);
    const bool partial = k1 - k0 < BN || it.visibility(cur) != tile_visibility::full;
    st.tile_softmax(s, scales, ksc_s + stage_r * BN + wn * TPW, vsc_s + stage_r * BN + wn * TPW, partial, k0 + wn * TPW, k1, mask,
                    t_row, lane);
    if constexpr (Registers)
      st.template accumulate_fp8<padded_byte_rows<RB>>(s, v8, wn * TPW, lane);
    else
      st.template accumulate<padded_tile<D>>(s, vt, 0, lane);
    __syncthreads();  // this stage is refilled next
    stage_r = (stage_r + 1) % ST;
    cur = it.next_tile(cur + 1);
  }

  // ---- epilogue: merge the WN warps of each row, normalise, write ----------------------------
  arch::cp_async_wait<0>();
  __syncthreads();
  if constexpr (merge_early == 2) arch::launch_dependents();
  scales.finish(st);
  finish_rows<BM, NT, WN, Registers>(p, w, rows, st, smem_raw);
}

template <class T, int D, class Codec, class Mask, class Table, bool Registers>
KVTILE_KERNEL void __launch_bounds__(fp8_decode_config<D>::threads, fp8_decode_config<D>::min_blocks)
    paged_decode_fp8_kernel(const kernel_params<T, Table, Mask, Codec> p) {
  if constexpr (merge_early == 1) arch::launch_dependents();  // the merge grid may start; it waits for this grid
  extern __shared__ __align__(16) unsigned char smem_raw[];
  paged_decode_fp8_cta<T, D, Codec, Mask, Table, Registers>(p, smem_raw);
}

}  // namespace attention::cuda::paged
KVTILE_NAMESPACE_END
