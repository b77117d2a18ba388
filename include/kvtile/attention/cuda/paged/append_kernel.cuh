// kvtile/attention/cuda/paged/append_kernel.cuh: the paged append (chunked prefill) kernel for
// head dims up to 128.
//
// One CTA runs one work item of an append plan: 128 packed query rows (GQA packing, as in
// kernel.cuh) against the keys [kv_begin, kv_end) of one request and KV head, read page by page.
// Four warps own 32 rows each (two 16-row MMA tiles), so every K and V fragment a warp loads with
// ldmatrix feeds two MMAs; every warp reads every K/V tile. S, P and O stay in registers.
//
// Per key tile of 64 keys (2-stage cp.async ring, K and V in separate commit groups), the
// mma.sync mainloop part (mma_warp.cuh) between the waits:
//   wait K, barrier, refill the freed stage      S = Q K^T (raw dot products, fp32)
//   mask (only on partial tiles)                  online softmax in base 2: one FFMA + ex2
//   [D > 64: wait V, barrier]                     O += P V, P re-packed from S
// The split V wait for D > 64 staggers the warps of a CTA against the other CTA on the SM; one
// barrier per tile for D <= 64 (the measured choice of the dense prefill kernel, see
// docs/perf-log/prefill.md). Q stays in registers when Q, S and O fit 192 registers, else it is
// re-read from shared memory each tile.
//
// The epilogue normalises each row; whole rows go to O through the warp's own rows of the Q
// buffer (8-byte stores), split items write fp32 partial states for merge_partials_kernel.
//
// fp8 pages (Codec fp8_e4m3): the stages hold bytes (rows of D, and with per-token scales each
// row's K and V scale), half the bytes of a bf16 stage; once per tile, after the barrier that
// makes it visible, the CTA converts the tile's K and V into one 2-byte tile each (e4m3 is exact
// in fp16 and bf16), a barrier, and the mainloop reads those as it reads bf16 stages. The scales
// multiply scores and probabilities, never elements (item_scales, as in the decode kernels).
// K and V are waited for together (the bytes are half); the conversion adds a barrier a tile.
#pragma once

#include <cstdint>

#include "kvtile/attention/cuda/arch/cp_async.cuh"
#include "kvtile/attention/cuda/arch/cp_async_shared.cuh"
#include "kvtile/attention/cuda/arch/mma.cuh"
#include "kvtile/attention/cuda/mma_warp.cuh"
#include "kvtile/attention/cuda/paged/kernel.cuh"
#include "kvtile/attention/cuda/plan.hpp"
#include "kvtile/attention/cuda/tuning.hpp"
#include "kvtile/attention/mask.hpp"
#include "kvtile/core/fast_divmod.hpp"
#include "kvtile/memory/cuda/fp8_convert.cuh"
#include "kvtile/memory/kv_codec.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda::paged {

// Head dims served by paged_append_kernel (32 rows per warp); larger ones use the 16-row
// paged_attention_kernel.
template <paged_kernel_kind Kind, int D>
inline constexpr bool uses_wide_append = Kind == paged_kernel_kind::append && D <= 128;

// ElemBytes: of the pages' K/V elements (2: fp16 / bf16; 1: fp8).
template <int D, int ElemBytes = 2>
struct append_config {
  static constexpr paged_kernel_shape shape = paged_shape_for(paged_kernel_kind::append, D, ElemBytes);
  static constexpr bool fp8 = ElemBytes == 1;
  static constexpr int bm = shape.block_m, bn = shape.block_n, warps = shape.warps_m, stages = shape.stages;
  static constexpr int threads = 32 * warps;
  static constexpr int rows_per_warp = bm / warps;
  static constexpr int m_tiles = rows_per_warp / 16;  // 16-row MMA tiles per warp
  static constexpr int s_tiles = bn / 8;              // 8-key tiles of S
  static constexpr int d_steps = D / 16;              // k-steps of Q K^T
  static constexpr int o_tiles = D / 8;               // 8-column tiles of O
  static constexpr int kv_steps = bn / 16;            // k-steps of P V
  static constexpr int chunks = D / 8;                // 16-byte chunks per row
  static constexpr int pitch = padded_tile<D>::pitch;  // shared row stride: no ldmatrix bank conflicts
  static constexpr bool q_in_registers = m_tiles * (d_steps + o_tiles + s_tiles) * 4 <= 192;
  static constexpr int src_chunks = D * ElemBytes / 16;  // 16-byte chunks per stored K/V row
  static constexpr int src_row_bytes = fp8 ? D : pitch * 2;  // bytes between rows of a stage
  // Shared memory: Q; 2-byte K and V stages, or (fp8) the converted K and V tiles then the byte
  // stages and their per-token scales; then the rings of BN key row offsets (int64: two, four
  // with fp8 pages, the scales' offsets). paged_kernel_shape::smem_bytes is the sum.
  static constexpr std::size_t tile_bytes = fp8 ? std::size_t(bm + 2 * bn) * pitch * 2 + std::size_t(2 * stages * bn) * (D + 4)
                                                : std::size_t(bm + 2 * stages * bn) * pitch * 2;
  static constexpr std::size_t smem_bytes = tile_bytes + std::size_t(fp8 ? 4 : 2) * bn * 8;
  static_assert(smem_bytes == shape.smem_bytes(D, ElemBytes), "paged append kernel: the planner's shared-memory size");
  static_assert(stages == 2, "paged append kernel: the row-offset ring assumes two K/V stages");
  static constexpr bool split_wait = !fp8 && D > tuning::paged_append_single_barrier_max_d;
  static_assert(shape.warps_n == 1 && bm % (16 * warps) == 0 && rows_per_warp == 32,
                "paged append kernel: each warp owns 32 rows");
  static_assert(bn % 16 == 0 && stages >= 2 && D % 16 == 0 && D <= 128, "paged append kernel: shape");
};

// The CTA's work (the kernel below is it over the dynamic shared memory): one work item,
// blockIdx.x, in smem_raw.
template <class T, int D, class Mask, class Table, class Codec>
KVTILE_DEVICE KVTILE_FORCEINLINE void paged_append_cta(const kernel_params<T, Table, Mask, Codec>& p, unsigned char* smem_raw) {
  using S = typename paging::paged_kv<T, Table, Codec>::storage_type;  // T, or e4m3
  constexpr bool fp8 = Codec::quantized;
  constexpr bool token_scales = memory::per_token_scales<Codec>;
  using C = append_config<D, int(sizeof(S))>;
  constexpr int BM = C::bm, BN = C::bn, ST = C::stages, NT = C::threads, P = C::pitch, CH = C::src_chunks;
  constexpr int MT = C::m_tiles, RPW = C::rows_per_warp;
  constexpr int CE = 16 / int(sizeof(S));  // stored elements per 16-byte chunk
  constexpr std::uint32_t row_bytes = P * sizeof(T), stage_bytes = BN * C::src_row_bytes;

  // Q [BM][P] T | fp8: K, V converted [BN][P] T each | K, V stages [ST][BN] rows | fp8 with
  // per-token scales: K, V scales [ST][BN] float | offset rings.
  T* q_s = reinterpret_cast<T*>(smem_raw);
  const std::uint32_t q_base = arch::smem_addr(q_s);
  const std::uint32_t kt_base = q_base + BM * row_bytes, vt_base = kt_base + BN * row_bytes;  // fp8 only
  const std::uint32_t k_base = q_base + (BM + (fp8 ? 2 * BN : 0)) * row_bytes;  // [ST][BN] rows
  const std::uint32_t v_base = k_base + ST * stage_bytes;                        // [ST][BN] rows
  float* ksc_s = reinterpret_cast<float*>(smem_raw + (v_base + ST * stage_bytes - q_base));  // fp8: [ST][BN]
  float* vsc_s = ksc_s + ST * BN;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, t = lane % 4;

  const item_tiles<BM, BN, Mask> it(p, blockIdx.x);
  const paged_work_item& w = it.w;
  const int b = w.batch, kvh = w.kv_head, row0 = w.row0, group = p.group, rows = it.rows;
  const int kv_begin = w.kv_begin, kv_end = w.kv_end, n_tiles = it.n_tiles;
  const Mask& mask = it.mask;

  const std::int32_t* pages = page_row(p.kv.table, w);
  const fast_divmod page(p.kv.pool.page_size);  // no integer division per key row
  const S* kg = p.kv.k_base();
  const S* vg = p.kv.v_base();

  // ---- loads -------------------------------------------------------------------------------
  it.template q_chunks<D>(p, tid, NT, [&](int r, int c, const T* src, bool valid) {
    arch::cp_async_16_to(q_base + (r * P + c * 8) * sizeof(T), src, valid);
  });
  arch::cp_async_commit();

  // Key row offsets (elements, -1: not loaded) of the next tile to fetch, in a ring of two in
  // shared memory (and with per-token scales the byte offsets of the rows' scales, a second
  // ring). Threads tid < BN each look up one key row's block id a tile ahead (issued early in
  // an iteration, stored at its end), so a fetch is 16-byte copies from precomputed addresses:
  // no page-table lookups or divisions by page_size in its path.
  std::int64_t* off_s = reinterpret_cast<std::int64_t*>(smem_raw + C::tile_bytes);  // [2][BN]
  std::int64_t* soff_s = off_s + 2 * BN;                                            // [2][BN], token scales
  auto row_block = [&](int tile) {
    const int tok = kv_begin + tile * BN + tid;
    return tid < BN && tile < n_tiles && tok < kv_end ? pages[page.div(tok)] : -1;
  };
  // Offsets of the key row of thread tid < BN in tile `tile` (block blk) into ring slot `slot`.
  auto store_offsets = [&](int slot, int tile, int blk) {
    const int in_page = page.mod(kv_begin + tile * BN + tid);
    off_s[slot * BN + tid] = blk < 0 ? -1 : p.kv.pool.offset(blk, in_page, kvh);
    if constexpr (token_scales) {
      const auto* base = reinterpret_cast<const unsigned char*>(p.kv.pool.k);
      soff_s[slot * BN + tid] =
          blk < 0 ? -1 : reinterpret_cast<const unsigned char*>(p.kv.pool.scale_ptr(p.kv.pool.k, blk, in_page, kvh)) - base;
    }
  };

  // K then V of one tile, each its own commit group (issued even when empty, so the waits
  // below count groups at compile time), with their per-token scales. Keys at or past the
  // item's end are zero-filled.
  auto fetch_tile = [&](int tile, int stage, int slot) {
    const std::uint32_t ks = k_base + stage * stage_bytes, vs = v_base + stage * stage_bytes;
    const std::int64_t* offs = off_s + slot * BN;
    auto issue = [&](std::uint32_t dst, const S* src, float* sc_dst) {
      if (tile < n_tiles) {
        if constexpr (NT % CH == 0) {
          constexpr int RPP = NT / CH;  // rows per pass of the CTA
          const int c = tid % CH, r0 = tid / CH;
          KVTILE_PRAGMA_UNROLL
          for (int r = r0; r < BN; r += RPP) {
            const std::int64_t off = offs[r];
            const bool ok = off >= 0;
            arch::cp_async_16_to(dst + r * C::src_row_bytes + c * 16, src + (ok ? off + c * CE : 0), ok);
          }
        } else {
          for (int idx = tid; idx < BN * CH; idx += NT) {
            const int r = idx / CH, c = idx % CH;
            const std::int64_t off = offs[r];
            const bool ok = off >= 0;
            arch::cp_async_16_to(dst + r * C::src_row_bytes + c * 16, src + (ok ? off + c * CE : 0), ok);
          }
        }
        if constexpr (token_scales) {
          if (tid < BN) {
            const std::int64_t so = soff_s[slot * BN + tid];
            arch::cp_async_4(sc_dst + stage * BN + tid, reinterpret_cast<const unsigned char*>(src) + (so >= 0 ? so : 0), so >= 0);
          }
        } else {
          (void)sc_dst;
        }
      }
      arch::cp_async_commit();
    };
    issue(ks, kg, ksc_s);
    issue(vs, vg, vsc_s);
  };
  // fp8: the stage's K and V bytes into the converted 2-byte tiles, 16 bytes a thread at a time.
  auto convert_tile = [&](int stage) {
    if constexpr (fp8) {
      const unsigned char* k8 = smem_raw + (k_base + stage * stage_bytes - q_base);
      const unsigned char* v8 = smem_raw + (v_base + stage * stage_bytes - q_base);
      T* kt = q_s + BM * P;
      T* vt = kt + BN * P;
      auto convert = [&](int r, int c) {
        uint4 lo, hi;
        memory::cuda::e4m3x16_to<T>(*reinterpret_cast<const uint4*>(k8 + r * D + c * 16), lo, hi);
        *reinterpret_cast<uint4*>(kt + r * P + c * 16) = lo;
        *reinterpret_cast<uint4*>(kt + r * P + c * 16 + 8) = hi;
        memory::cuda::e4m3x16_to<T>(*reinterpret_cast<const uint4*>(v8 + r * D + c * 16), lo, hi);
        *reinterpret_cast<uint4*>(vt + r * P + c * 16) = lo;
        *reinterpret_cast<uint4*>(vt + r * P + c * 16 + 8) = hi;
      };
      if constexpr (NT % CH == 0 && BN % (NT / CH) == 0) {
        KVTILE_PRAGMA_UNROLL
        for (int r = tid / CH; r < BN; r += NT / CH) convert(r, tid % CH);
      } else {
        for (int idx = tid; idx < BN * CH; idx += NT) convert(idx / CH, idx % CH);
      }
    } else {
      (void)stage;
    }
  };
  // fetch: the next tile to fetch (its row offsets in slot `slot`); fetch2: the one after.
  int fetch = it.next_tile(0), fetch2 = it.next_tile(fetch + 1);
  if (tid < BN) {
    store_offsets(0, fetch, row_block(fetch));
    store_offsets(1, fetch2, row_block(fetch2));
  }
  fill_rotary_table<D>(mask, tid, NT);  // a rotary variant's table
  __syncthreads();
  fetch_tile(fetch, 0, 0);
  fetch = fetch2;
  fetch2 = it.next_tile(fetch2 + 1);
  int slot = 1;

  // ---- state ---------------------------------------------------------------------------------
  using mainloop = mma_rows<T, D, MT, BN>;
  mainloop st;
  st.init();
  item_scales<T, Codec> scales(p.kv.pool, kvh, p.scale_log2);  // the codec's (plan's scale for 2-byte pages)
  const int wr0 = row0 + warp * RPW;  // first packed row of this warp
  const bool has_rows = wr0 < rows;
  const int wt0 = wr0 / group, wt1 = has_rows ? (min_i(wr0 + RPW, rows) - 1) / group + 1 : wt0;

  q_operand<T, D, MT, C::q_in_registers> q;
  arch::cp_async_wait<2 * ST - 2>();  // Q landed (K/V groups may still fly)
  __syncthreads();
  if constexpr (has_rotary<Mask>) {
    // A rotary variant: Q rotated in place once, each row at its query token's position.
    rotate_tile_rows<T, D>(q_s, BM, mask, [&](int r) { return mask.query_position(min_i(row0 + r, rows - 1) / group); },
                           tid, NT);
    __syncthreads();
  }
  q.load(q_base, warp * RPW, lane);

  // ---- main loop -----------------------------------------------------------------------------
  int stage = 0, refill = ST - 1;
  for (int cur = it.next_tile(0); cur < n_tiles; cur = it.next_tile(cur + 1)) {
    // The tile's K (and V without split_wait) landed and is visible to every warp; every warp
    // is done with the stage refilled now.
    if constexpr (C::split_wait)
      arch::cp_async_wait<2 * ST - 3>();
    else
      arch::cp_async_wait<2 * ST - 4>();
    __syncthreads();
    fetch_tile(fetch, refill, slot);
    refill = refill + 1 == ST ? 0 : refill + 1;
    // Block ids of the tile after: loaded now, turned into offsets at the end of the iteration.
    const int pend_tile = fetch2, pend_blk = row_block(fetch2);
    fetch = fetch2;
    fetch2 = it.next_tile(fetch2 + 1);

    const int k0 = kv_begin + cur * BN, k1 = min_i(k0 + BN, kv_end);
    // The tile the mainloop reads: the stage, or the tiles its fp8 bytes are converted into.
    auto k_tile = [&] { return fp8 ? kt_base : k_base + stage * stage_bytes; };
    auto v_tile = [&] { return fp8 ? vt_base : v_base + stage * stage_bytes; };
    if constexpr (fp8) {
      convert_tile(stage);  // every warp is past the previous tile's reads (the barrier above)
      __syncthreads();
    }
    if constexpr (has_rotary<Mask>) {
      // A rotary variant: the tile's keys rotated in place at their positions, once for the
      // four warps (the stage is not refilled before the next iteration's barrier).
      rotate_tile_rows<T, D>(q_s + BM * P + (fp8 ? 0 : stage * BN * P), k1 - k0, mask, [&](int r) { return mask.key_position(k0 + r); },
                             tid, NT);
      __syncthreads();
    }
    tile_visibility vis = has_rows ? mask.classify(wt0, wt1, k0, k1) : tile_visibility::empty;
    if (vis == tile_visibility::full && k1 - k0 < BN) vis = tile_visibility::partial;

    typename mainloop::tile_scores s;
    if (vis != tile_visibility::empty) {
      mainloop::qk(s, q, smem_tile<T, padded_tile<D>>{k_tile()}, lane);
      KVTILE_PRAGMA_UNROLL
      for (int mt = 0; mt < MT; ++mt) scales.keys(s[mt], ksc_s + stage * BN, t);
      const float o_unit = scales.enter_values(s[0], vsc_s + stage * BN, t);
      st.probabilities(
          s, mask, scales.scale_log2, vis == tile_visibility::partial, lane,
          [&](int mt, int h, int key) {
            const int j = k0 + key;
            const int tk = (wr0 + mt * 16 + g + 8 * h) / group;  // the row's query token
            return j < k1 && mask.visible(tk, j);
          },
          o_unit);
      KVTILE_PRAGMA_UNROLL
      for (int mt = 0; mt < MT; ++mt) scales.values(s[mt], vsc_s + stage * BN, t);
    }

    if constexpr (C::split_wait) {
      arch::cp_async_wait<2 * ST - 2>();  // V of this tile
      __syncthreads();
    }
    if (vis != tile_visibility::empty) st.pv(s, smem_tile<T, padded_tile<D>>{v_tile()}, lane);
    // The slot read by the previous iteration's fetch: every warp is past it (the barrier above).
    if (tid < BN) store_offsets(slot ^ 1, pend_tile, pend_blk);
    slot ^= 1;
    stage = stage + 1 == ST ? 0 : stage + 1;
  }
  arch::cp_async_wait<0>();

  // ---- epilogue ------------------------------------------------------------------------------
  // Rows of this thread: (mt, h) -> packed row wr0 + mt * 16 + g + 8 h, columns 8 dt + 2 t.
  const bool whole = w.partial < 0;
  float lse[MT][2];
  scales.finish(st);  // per-head V scale, or the unit of fp16 P's per-token V scales
  st.finish(lse);
  KVTILE_PRAGMA_UNROLL
  for (int mt = 0; mt < MT; ++mt)
    KVTILE_PRAGMA_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int lr = warp * RPW + mt * 16 + g + 8 * h;  // row within the CTA tile
      const int pr = row0 + lr;
      if (whole) {
        if (t == 0 && p.lse != nullptr && pr < rows) {
          const int tk = pr / group, hq = kvh * group + pr % group;
          p.lse[p.q.layout.row(b, tk) * p.num_qo_heads + hq] = lse[mt][h];
        }
      } else if (pr < rows) {
        const std::int64_t prow = std::int64_t(w.partial) * BM + lr;
        float* dst = p.partial_o + prow * D + 2 * t;
        KVTILE_PRAGMA_UNROLL
        for (int dt = 0; dt < D / 8; ++dt)
          *reinterpret_cast<float2*>(dst + dt * 8) = make_float2(st.o[mt][dt][2 * h], st.o[mt][dt][2 * h + 1]);
        if (t == 0) p.partial_lse[prow] = lse[mt][h];
      }
    }
  if (whole) {
    // Stage the warp's rows through its own rows of the Q buffer (only this warp reads them),
    // then write 8-byte chunks.
    __syncwarp();
    st.store_o(q_s, warp * RPW, lane);
    __syncwarp();
    constexpr int OC = D / 4;  // 8-byte chunks per row (O strides are multiples of 4 elements)
    KVTILE_PRAGMA_UNROLL
    for (int id = lane; id < RPW * OC; id += 32) {
      const int lr = warp * RPW + id / OC, c = id % OC;
      const int pr = row0 + lr;
      if (pr < rows)
        *reinterpret_cast<uint2*>(p.o.at(b, pr / group, kvh * group + pr % group) + c * 4) =
            *reinterpret_cast<const uint2*>(q_s + lr * P + c * 4);
    }
  }
}

template <class T, int D, class Mask, class Table, class Codec = memory::identity>
KVTILE_KERNEL void __launch_bounds__(append_config<D>::threads, 2)
    paged_append_kernel(const kernel_params<T, Table, Mask, Codec> p) {
  if constexpr (merge_early != 0) arch::launch_dependents();  // the merge grid may start; it waits for this grid
  extern __shared__ __align__(16) unsigned char smem_raw[];
  paged_append_cta<T, D>(p, smem_raw);
}

}  // namespace attention::cuda::paged
KVTILE_NAMESPACE_END
