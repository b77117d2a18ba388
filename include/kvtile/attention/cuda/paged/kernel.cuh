// kvtile/attention/cuda/paged/kernel.cuh: the paged attention kernel behind decode (and append
// at head dims above 128; append at D <= 128 runs append_kernel.cuh's 32-rows-per-warp kernel).
//
// One CTA runs one work item of a paged_plan: a tile of BM packed query rows (GQA packing:
// the query tokens x query heads of one KV head) against the keys [kv_begin, kv_end) of its
// request, read page by page through the page table. Per key tile:
//
//   cp.async K, V tile (16-byte chunks, one page lookup per row)  -- ST-stage pipeline
//   S = Q K^T, mask, online softmax, O += P V                      -- decode_warp.cuh
//
// Warps: WM along rows (16 rows each) x WN along the keys of a tile. The WN partial states of a
// row are merged at the end (finish_rows), then the row is normalised and written to O (+ LSE),
// or, for a split item, to the fp32 partial buffers that merge_partials_kernel folds with
// merge_state_step.
#pragma once

#include <cstdint>
#include <type_traits>

#include "kvtile/attention/cuda/arch/cp_async.cuh"
#include "kvtile/attention/cuda/arch/tma.cuh"
#include "kvtile/attention/cuda/paged/decode_warp.cuh"
#include "kvtile/core/fast_divmod.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda::paged {

template <paged_kernel_kind Kind, int D>
struct kernel_config {
  static constexpr paged_kernel_shape shape = paged_shape_for(Kind, D);
  static constexpr int bm = shape.block_m, bn = shape.block_n, wm = shape.warps_m, wn = shape.warps_n;
  static constexpr int stages = shape.stages;
  static constexpr int threads = 32 * wm * wn;
  // Registers: decode CTAs are small and several must share an SM to keep loads in flight.
  static constexpr int min_blocks = D > 128 ? 1 : (Kind == paged_kernel_kind::decode ? 3 : 2);
  static_assert(bm == 16 * wm, "paged kernel: each warp owns 16 rows");
  static_assert(bn % (16 * wn) == 0, "paged kernel: each warp's keys per tile must be a multiple of 16");
  static_assert(D % 16 == 0 && D <= 256, "paged kernel: head_dim must be a multiple of 16 up to 256");
};

// The CTA's work (the kernel below is it over the dynamic shared memory): one work item,
// blockIdx.x, in smem_raw.
template <class T, int D, paged_kernel_kind Kind, class Mask, class Table>
KVTILE_DEVICE KVTILE_FORCEINLINE void paged_attention_cta(const kernel_params<T, Table, Mask>& p, unsigned char* smem_raw) {
  using C = kernel_config<Kind, D>;
  constexpr int BM = C::bm, BN = C::bn, WN = C::wn, ST = C::stages, NT = C::threads;
  constexpr int LD = D + 8;     // shared-memory row stride (elements): 16-byte pad, no bank conflicts
  constexpr int CPR = D / 8;    // 16-byte chunks per row
  constexpr int TPW = BN / WN;  // keys per warp per tile

  T* q_s = reinterpret_cast<T*>(smem_raw);
  T* k_s = q_s + BM * LD;
  T* v_s = k_s + ST * BN * LD;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wm = warp / WN, wn = warp % WN;
  const int g = lane / 4;

  const item_tiles<BM, BN, Mask> it(p, blockIdx.x);
  const paged_work_item& w = it.w;
  const int kvh = w.kv_head, row0 = w.row0, group = p.group, rows = it.rows;
  const int kv_begin = w.kv_begin, kv_end = w.kv_end, n_tiles = it.n_tiles;
  const Mask& mask = it.mask;

  const T* kbase = p.kv.k_base();
  const T* vbase = p.kv.v_base();

  // ---- loads -------------------------------------------------------------------------------
  it.template q_chunks<D>(p, tid, NT, [&](int r, int c, const T* src, bool valid) {
    arch::cp_async_16(q_s + r * LD + c * 8, src, valid);
  });
  arch::cp_async_commit();

  // The request's row of physical block ids, looked up once (CSR and padded tables); block ids
  // of the next tile are prefetched into registers one tile ahead, so the page-table lookup
  // never sits between a tile's wait and the next tile's loads.
  const std::int32_t* pages = page_row(p.kv.table, w);
  const fast_divmod page(p.kv.pool.page_size);  // no integer division per key row
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
  auto load_kv = [&](int stage, int tile) {
    const int k0 = kv_begin + tile * BN, k1 = min_i(k0 + BN, kv_end);
    T* ks = k_s + stage * BN * LD;
    T* vs = v_s + stage * BN * LD;
    if constexpr (fast_map) {
      // Each thread owns one chunk column and RPT rows.
      const int c = tid % CPR;
      KVTILE_PRAGMA_UNROLL
      for (int i = 0; i < RPT; ++i) {
        const int r = tid / CPR + i * RPP;
        const int tok = k0 + r;
        const bool valid = tok < k1;
        const std::int64_t off = valid ? p.kv.pool.offset(blk[i], page.mod(tok), kvh) + c * 8 : 0;
        arch::cp_async_16(ks + r * LD + c * 8, kbase + off, valid);
        arch::cp_async_16(vs + r * LD + c * 8, vbase + off, valid);
      }
    } else {
      for (int idx = tid; idx < BN * CPR; idx += NT) {
        const int r = idx / CPR, c = idx % CPR;
        const int tok = k0 + r;
        const bool valid = tok < k1;
        const std::int64_t off = valid ? p.kv.pool.offset(pages[page.div(tok)], page.mod(tok), kvh) + c * 8 : 0;
        arch::cp_async_16(ks + r * LD + c * 8, kbase + off, valid);
        arch::cp_async_16(vs + r * LD + c * 8, vbase + off, valid);
      }
    }
  };

  // ---- state ---------------------------------------------------------------------------------
  warp_rows<T, D, TPW> st;
  st.init();
  // Query token of this thread's two rows (for the mask).
  int t_row[2];
  KVTILE_PRAGMA_UNROLL
  for (int i = 0; i < 2; ++i) t_row[i] = (row0 + 16 * wm + g + 8 * i) / group;
  item_scales<T, memory::identity> scales(p.kv.pool, kvh, p.scale_log2);

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

  st.load_q(q_s, 16 * wm, lane);
  st.rotate_q(mask, t_row, lane);

  // ---- main loop -----------------------------------------------------------------------------
  while (cur < n_tiles) {
    issue_next();
    arch::cp_async_wait<ST - 1>();
    __syncthreads();

    const T* ks = k_s + stage_r * BN * LD;
    const T* vs = v_s + stage_r * BN * LD;
    typename warp_rows<T, D, TPW>::tile_scores s;
    const int k0 = kv_begin + cur * BN, k1 = min_i(k0 + BN, kv_end);
    st.template scores<padded_tile<D>>(s, ks, wn * TPW, lane, mask, k0);
    const bool partial = k1 - k0 < BN || it.visibility(cur) != tile_visibility::full;
    st.tile_softmax(s, scales, nullptr, nullptr, partial, k0 + wn * TPW, k1, mask, t_row, lane);
    st.template accumulate<padded_tile<D>>(s, vs, wn * TPW, lane);
    __syncthreads();  // this stage is refilled next
    stage_r = (stage_r + 1) % ST;
    cur = it.next_tile(cur + 1);
  }

  // ---- epilogue: merge the WN warps of each row, normalise, write ----------------------------
  arch::cp_async_wait<0>();
  __syncthreads();
  if constexpr (merge_early == 2) arch::launch_dependents();
  finish_rows<BM, NT, WN>(p, w, rows, st, smem_raw);
}

template <class T, int D, paged_kernel_kind Kind, class Mask, class Table>
KVTILE_KERNEL void __launch_bounds__(kernel_config<Kind, D>::threads, kernel_config<Kind, D>::min_blocks)
    paged_attention_kernel(const kernel_params<T, Table, Mask> p) {
  if constexpr (merge_early == 1) arch::launch_dependents();  // the merge grid may start; it waits for this grid
  extern __shared__ __align__(16) unsigned char smem_raw[];
  paged_attention_cta<T, D, Kind>(p, smem_raw);
}

// Folds the split partial states of one row tile into O and LSE. Grid: (merge items, row
// chunks); one thread per (row, 4 values). Partials are loaded in batches of 8 independent
// loads before they are folded, so a long split is not a chain of dependent memory latencies
// (batches of 16 cost the portable append's 2-way merge 14% of its run and gained decode
// nothing: docs/perf-log/decode.md v13).
// On sm_90 the kernel is launched while the attention grid runs (programmatic dependent
// launch) and waits for it here, so the launch's latency is hidden.
inline constexpr int merge_threads = 128;

template <class T, int D, int BM, class Table, class Mask, class Codec = memory::identity>
KVTILE_KERNEL void __launch_bounds__(merge_threads) merge_partials_kernel(const kernel_params<T, Table, Mask, Codec> p) {
  constexpr int batch = 8;
  arch::wait_primary_grid();
  arch::launch_dependents();  // an early-launched attention grid after this one may be placed now
  const paged_merge_item mi = p.merges[blockIdx.x];
  const int idx = blockIdx.y * merge_threads + threadIdx.x;
  if (idx >= BM * (D / 4)) return;
  const int b = mi.batch, group = p.group;
  const int rows = p.q.layout.len_of(b) * group;
  const int r = idx / (D / 4), c = (idx % (D / 4)) * 4;
  const int pr = mi.row0 + r;
  if (pr >= rows) return;
  const std::int64_t row0 = std::int64_t(mi.first) * BM + r;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  float lse = neg_inf;
  for (int i0 = 0; i0 < mi.count; i0 += batch) {
    float ob[batch][4], lb[batch];
    KVTILE_PRAGMA_UNROLL
    for (int i = 0; i < batch; ++i) {
      const std::int64_t prow = row0 + std::int64_t(i0 + i) * BM;
      if (i0 + i < mi.count) {
        cuda::detail::load4(ob[i], p.partial_o + prow * D + c);
        lb[i] = p.partial_lse[prow];
      } else {
        ob[i][0] = ob[i][1] = ob[i][2] = ob[i][3] = 0.f;
        lb[i] = neg_inf;  // an empty state: merging it changes nothing
      }
    }
    KVTILE_PRAGMA_UNROLL
    for (int i = 0; i < batch; ++i) merge_state_step(acc, lse, ob[i], lb[i]);
  }
  const int t = pr / group, h = mi.kv_head * group + pr % group;
  cuda::detail::store4(p.o.at(b, t, h) + c, acc);
  if (c == 0 && p.lse) p.lse[p.q.layout.row(b, t) * p.num_qo_heads + h] = lse;
}

}  // namespace attention::cuda::paged
KVTILE_NAMESPACE_END
