// kvtile/attention/cuda/paged/kernel.cuh: the paged attention kernel behind decode (and append
// at head dims above 128; append at D <= 128 runs append_kernel.cuh's 32-rows-per-warp kernel).
//
// One CTA runs one work item of a paged_plan: a tile of BM packed query rows (GQA packing:
// the query tokens x query heads of one KV head) against the keys [kv_begin, kv_end) of its
// request, read page by page through the page table. Per key tile:
//
//   cp.async K, V tile (16-byte chunks, one page lookup per row)  -- ST-stage pipeline
//   S = Q K^T          mma.m16n8k16, Q fragments held in registers for the whole item
//   mask               only on tiles the mask policy classifies as partial, and the last tile
//   online softmax     running max / sum per row (softmax_state's rescale_factor, exp_base)
//   O += P V           P re-packed from the S accumulators, V through ldmatrix.trans
//
// Warps: WM along rows (16 rows each) x WN along the keys of a tile. The WN partial states of a
// row are merged at the end through shared memory with softmax_state::merge, then the row is
// normalised and written to O (+ LSE), or, for a split item, to the fp32 partial buffers that
// merge_partials_kernel folds with merge_state_step.
#pragma once

#include <cstdint>
#include <type_traits>

#include "kvtile/attention/cuda/arch/cp_async.cuh"
#include "kvtile/attention/cuda/arch/mma.cuh"
#include "kvtile/attention/cuda/merge.cuh"
#include "kvtile/attention/cuda/plan.hpp"
#include "kvtile/attention/dense_view.hpp"
#include "kvtile/attention/mask.hpp"
#include "kvtile/attention/softmax_state.hpp"
#include "kvtile/core/fast_divmod.hpp"
#include "kvtile/paging/paged_view.hpp"

// 1: the 16-row kernel waits once per key tile (see one_barrier below). Measured in
// docs/perf-log/decode.md v5.
#ifndef KVTILE_PAGED_ONE_BARRIER
#define KVTILE_PAGED_ONE_BARRIER 0
#endif

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda::paged {

template <class T, class Table, class Mask>
struct kernel_params {
  dense_tensor<T> q;                // [batch, q_len(b), num_qo_heads, D]
  dense_tensor<T> o;                // same shape as q
  paging::paged_kv<T, Table> kv;    // num_kv_heads heads
  float* lse;                       // [rows, num_qo_heads] natural log, or null
  typename Mask::params mask;
  float scale_log2;                 // softmax scale * log2(e)
  std::int32_t group;               // query heads per KV head
  std::int32_t num_qo_heads;
  const paged_work_item* work;
  const paged_merge_item* merges;
  float* partial_o;                 // [num_partials, BM, D]
  float* partial_lse;               // [num_partials, BM]
};

// The physical block ids of request b, in logical order.
KVTILE_HOST_DEVICE KVTILE_FORCEINLINE const std::int32_t* page_row(const paging::csr_page_table& t, std::int32_t b) {
  return t.indices + t.indptr[b];
}
KVTILE_HOST_DEVICE KVTILE_FORCEINLINE const std::int32_t* page_row(const paging::padded_page_table& t, std::int32_t b) {
  return t.block_table + std::int64_t(b) * t.max_blocks;
}

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

template <class T, int D, paged_kernel_kind Kind, class Mask, class Table>
KVTILE_KERNEL void __launch_bounds__(kernel_config<Kind, D>::threads, kernel_config<Kind, D>::min_blocks)
    paged_attention_kernel(const kernel_params<T, Table, Mask> p) {
  using C = kernel_config<Kind, D>;
  constexpr int BM = C::bm, BN = C::bn, WN = C::wn, ST = C::stages, NT = C::threads;
  constexpr int LD = D + 8;     // shared-memory row stride (elements): 16-byte pad, no bank conflicts
  constexpr int CPR = D / 8;    // 16-byte chunks per row
  constexpr int TPW = BN / WN;  // keys per warp per tile
  constexpr int RLD = D + 4;    // fp32 reduction row stride

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);
  T* k_s = q_s + BM * LD;
  T* v_s = k_s + ST * BN * LD;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wm = warp / WN, wn = warp % WN;
  const int g = lane / 4, tq = lane % 4;

  const paged_work_item w = p.work[blockIdx.x];
  const int b = w.batch, kvh = w.kv_head, row0 = w.row0;
  const int q_len = p.q.layout.len_of(b), kv_len = p.kv.kv_len(b);
  const int group = p.group;
  const int rows = q_len * group;
  const int t_lo = row0 / group, t_hi = (min_i(row0 + BM, rows) - 1) / group + 1;
  const Mask mask(p.mask, q_len, kv_len);
  const int kv_begin = w.kv_begin, kv_end = w.kv_end;
  const int n_tiles = (kv_end - kv_begin + BN - 1) / BN;
  // One barrier per tile (wait, barrier, then refill the stage freed by the previous tile)
  // instead of two (refill, wait, barrier, compute, barrier); an experiment for decode.
  constexpr bool one_barrier = KVTILE_PAGED_ONE_BARRIER != 0 && ST >= 3;

  const T* kbase = p.kv.k_base();
  const T* vbase = p.kv.v_base();

  // ---- loads -------------------------------------------------------------------------------
  for (int idx = tid; idx < BM * CPR; idx += NT) {
    const int r = idx / CPR, c = idx % CPR;
    const int pr = row0 + r;
    const bool valid = pr < rows;
    const T* src = valid ? p.q.at(b, pr / group, kvh * group + pr % group) + c * 8 : p.q.data;
    arch::cp_async_16(q_s + r * LD + c * 8, src, valid);
  }
  arch::cp_async_commit();

  // The request's row of physical block ids, looked up once (CSR and padded tables); block ids
  // of the next tile are prefetched into registers one tile ahead, so the page-table lookup
  // never sits between a tile's wait and the next tile's loads.
  const std::int32_t* pages = page_row(p.kv.table, b);
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
  auto visibility = [&](int tile) {
    const int k0 = kv_begin + tile * BN;
    return mask.classify(t_lo, t_hi, k0, min_i(k0 + BN, kv_end));
  };
  auto next_tile = [&](int tile) {
    while (tile < n_tiles && visibility(tile) == tile_visibility::empty) ++tile;
    return tile;
  };

  // ---- state ---------------------------------------------------------------------------------
  float o_acc[D / 8][4];
  KVTILE_PRAGMA_UNROLL
  for (int i = 0; i < D / 8; ++i) o_acc[i][0] = o_acc[i][1] = o_acc[i][2] = o_acc[i][3] = 0.f;
  float m_row[2] = {neg_inf, neg_inf}, l_row[2] = {0.f, 0.f};
  // Query token of this thread's two rows (for the mask).
  int t_row[2];
  KVTILE_PRAGMA_UNROLL
  for (int i = 0; i < 2; ++i) t_row[i] = (row0 + 16 * wm + g + 8 * i) / group;

  int cur = next_tile(0);
  int fetch = cur, stage_w = 0, stage_r = 0;
  fetch_blocks(fetch);
  KVTILE_PRAGMA_UNROLL
  for (int s = 0; s < ST - 1; ++s) {
    if (fetch < n_tiles) {
      load_kv(stage_w, fetch);
      fetch = next_tile(fetch + 1);
      fetch_blocks(fetch);
    }
    arch::cp_async_commit();
    stage_w = (stage_w + 1) % ST;
  }
  arch::cp_async_wait<ST - 1>();  // the Q group has landed
  __syncthreads();

  std::uint32_t q_frag[D / 16][4];
  KVTILE_PRAGMA_UNROLL
  for (int kk = 0; kk < D / 16; ++kk)
    arch::ldmatrix_x4(q_frag[kk], arch::smem_addr(q_s + (16 * wm + lane % 16) * LD + kk * 16 + (lane / 16) * 8));

  // ---- main loop -----------------------------------------------------------------------------
  while (cur < n_tiles) {
    if constexpr (one_barrier) {
      // Tile cur landed and every warp is done with the stage refilled below.
      arch::cp_async_wait<ST - 2>();
      __syncthreads();
    }
    if (fetch < n_tiles) {
      load_kv(stage_w, fetch);
      fetch = next_tile(fetch + 1);
      fetch_blocks(fetch);
    }
    arch::cp_async_commit();
    stage_w = (stage_w + 1) % ST;
    if constexpr (!one_barrier) {
      arch::cp_async_wait<ST - 1>();
      __syncthreads();
    }

    const T* ks = k_s + stage_r * BN * LD + wn * TPW * LD;
    const T* vs = v_s + stage_r * BN * LD + wn * TPW * LD;
    float s[TPW / 8][4];
    KVTILE_PRAGMA_UNROLL
    for (int i = 0; i < TPW / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
    KVTILE_PRAGMA_UNROLL
    for (int kk = 0; kk < D / 16; ++kk) {
      KVTILE_PRAGMA_UNROLL
      for (int np = 0; np < TPW / 16; ++np) {
        std::uint32_t kf[4];
        const int mi = lane / 8;
        arch::ldmatrix_x4(kf, arch::smem_addr(ks + (np * 16 + (mi / 2) * 8 + lane % 8) * LD + kk * 16 + (mi % 2) * 8));
        const std::uint32_t b0[2] = {kf[0], kf[1]}, b1[2] = {kf[2], kf[3]};
        arch::mma_16816<T>(s[2 * np], q_frag[kk], b0);
        arch::mma_16816<T>(s[2 * np + 1], q_frag[kk], b1);
      }
    }

    const int k0 = kv_begin + cur * BN, k1 = min_i(k0 + BN, kv_end);
    const bool partial = k1 - k0 < BN || visibility(cur) != tile_visibility::full;
    KVTILE_PRAGMA_UNROLL
    for (int nt = 0; nt < TPW / 8; ++nt)
      KVTILE_PRAGMA_UNROLL
      for (int e = 0; e < 4; ++e) {
        float x = s[nt][e] * p.scale_log2;
        if (partial) {
          const int j = k0 + wn * TPW + nt * 8 + 2 * tq + (e & 1);
          if (j >= k1 || !mask.visible(t_row[e / 2], j)) x = neg_inf;
        }
        s[nt][e] = x;
      }

    // Online softmax, two rows per thread (g and g + 8), four lanes per row.
    KVTILE_PRAGMA_UNROLL
    for (int i = 0; i < 2; ++i) {
      float mx = neg_inf;
      KVTILE_PRAGMA_UNROLL
      for (int nt = 0; nt < TPW / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * i], s[nt][2 * i + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_row[i], mx);
      const float a = rescale_factor(m_row[i], m_new);
      const float base = exp_base(m_new);
      m_row[i] = m_new;
      float sum = 0.f;
      KVTILE_PRAGMA_UNROLL
      for (int nt = 0; nt < TPW / 8; ++nt) {
        s[nt][2 * i] = arch::fast_exp2(s[nt][2 * i] - base);
        s[nt][2 * i + 1] = arch::fast_exp2(s[nt][2 * i + 1] - base);
        sum += s[nt][2 * i] + s[nt][2 * i + 1];
      }
      l_row[i] = l_row[i] * a + sum;
      KVTILE_PRAGMA_UNROLL
      for (int dt = 0; dt < D / 8; ++dt) {
        o_acc[dt][2 * i] *= a;
        o_acc[dt][2 * i + 1] *= a;
      }
    }

    // O += P V.
    KVTILE_PRAGMA_UNROLL
    for (int kj = 0; kj < TPW / 16; ++kj) {
      const std::uint32_t pa[4] = {arch::pack2<T>(s[2 * kj][0], s[2 * kj][1]), arch::pack2<T>(s[2 * kj][2], s[2 * kj][3]),
                                   arch::pack2<T>(s[2 * kj + 1][0], s[2 * kj + 1][1]),
                                   arch::pack2<T>(s[2 * kj + 1][2], s[2 * kj + 1][3])};
      KVTILE_PRAGMA_UNROLL
      for (int dp = 0; dp < D / 16; ++dp) {
        std::uint32_t vf[4];
        const int mi = lane / 8;
        arch::ldmatrix_x4_trans(vf, arch::smem_addr(vs + (kj * 16 + (mi % 2) * 8 + lane % 8) * LD + dp * 16 + (mi / 2) * 8));
        const std::uint32_t b0[2] = {vf[0], vf[1]}, b1[2] = {vf[2], vf[3]};
        arch::mma_16816<T>(o_acc[2 * dp], pa, b0);
        arch::mma_16816<T>(o_acc[2 * dp + 1], pa, b1);
      }
    }
    if constexpr (!one_barrier) __syncthreads();  // this stage is refilled next
    stage_r = (stage_r + 1) % ST;
    cur = next_tile(cur + 1);
  }

  // ---- epilogue: merge the WN warps of each row, normalise, write ----------------------------
  arch::cp_async_wait<0>();
  __syncthreads();
  float* red_o = reinterpret_cast<float*>(smem_raw);  // [warps][16][RLD]
  float* red_ml = red_o + (NT / 32) * 16 * RLD;       // [warps][16][2]
  KVTILE_PRAGMA_UNROLL
  for (int i = 0; i < 2; ++i) {
    l_row[i] += __shfl_xor_sync(0xffffffffu, l_row[i], 1);
    l_row[i] += __shfl_xor_sync(0xffffffffu, l_row[i], 2);
  }
  KVTILE_PRAGMA_UNROLL
  for (int dt = 0; dt < D / 8; ++dt)
    KVTILE_PRAGMA_UNROLL
    for (int i = 0; i < 2; ++i)
      *reinterpret_cast<float2*>(red_o + (warp * 16 + g + 8 * i) * RLD + dt * 8 + 2 * tq) =
          make_float2(o_acc[dt][2 * i], o_acc[dt][2 * i + 1]);
  if (tq == 0)
    KVTILE_PRAGMA_UNROLL
    for (int i = 0; i < 2; ++i) {
      red_ml[(warp * 16 + g + 8 * i) * 2] = m_row[i];
      red_ml[(warp * 16 + g + 8 * i) * 2 + 1] = l_row[i];
    }
  __syncthreads();

  for (int idx = tid; idx < BM * (D / 4); idx += NT) {
    const int r = idx / (D / 4), c = (idx % (D / 4)) * 4;
    const int pr = row0 + r;
    if (pr >= rows) continue;
    softmax_state<4> acc;
    acc.init();
    KVTILE_PRAGMA_UNROLL
    for (int j = 0; j < WN; ++j) {
      const int src = ((r / 16) * WN + j) * 16 + r % 16;
      const float4 v = *reinterpret_cast<const float4*>(red_o + src * RLD + c);
      softmax_state<4> x;
      x.o[0] = v.x, x.o[1] = v.y, x.o[2] = v.z, x.o[3] = v.w;
      x.m = red_ml[src * 2];
      x.l = red_ml[src * 2 + 1];
      acc.merge(x);
    }
    const float lse = acc.lse();
    acc.normalize();
    if (w.partial < 0) {
      const int t = pr / group, h = kvh * group + pr % group;
      cuda::detail::store4(p.o.at(b, t, h) + c, acc.o);
      if (c == 0 && p.lse) p.lse[p.q.layout.row(b, t) * p.num_qo_heads + h] = lse;
    } else {
      const std::int64_t prow = std::int64_t(w.partial) * BM + r;
      *reinterpret_cast<float4*>(p.partial_o + prow * D + c) = make_float4(acc.o[0], acc.o[1], acc.o[2], acc.o[3]);
      if (c == 0) p.partial_lse[prow] = lse;
    }
  }
}

// Folds the split partial states of one row tile into O and LSE. Grid: (merge items, row
// chunks); one thread per (row, 4 values). Partials are loaded in batches of 8 independent
// loads before they are folded, so a long split is not a chain of dependent memory latencies.
inline constexpr int merge_threads = 128;

template <class T, int D, int BM, class Table, class Mask>
KVTILE_KERNEL void __launch_bounds__(merge_threads) merge_partials_kernel(const kernel_params<T, Table, Mask> p) {
  constexpr int batch = 8;
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
