// kvtile/attention/cuda/backward/kernel.cuh: the main kernel of the attention backward,
// FlashAttention-2 class, K/V outer (mma.sync m16n8k16, sm_80+).
//
// A CTA owns BlockKV keys of one (sequence, KV head) and, for D > 128, one slice of the dK / dV
// columns. K and V stay in shared memory; the CTA walks every query tile of every query head
// of the KV head's GQA group (so dK and dV sum over the group in registers, no atomics) through
// a double-buffered Q / dO ring, skipping tiles the mask hides entirely. Per step, warp w (keys
// 16w .. 16w + 15 of the block) recomputes, with r the packed row of query i:
//   S^T = K Q^T                      (fp32, keys on the MMA rows)
//   P^T = 2^(S^T scale log2(e) - lse2_i)   (lse2 = LSE log2(e), +inf for a row that sees nothing)
//   dP^T = V dO^T,  dS^T = P^T o (dP^T - Delta_i)   (times logit'(s) for a logit transform)
//   dV += P^T dO,   dK += dS^T Q     (A operands straight from the accumulators)
// and, unless dQ comes from the Q-outer kernel (deterministic mode), writes dS^T to shared
// memory so that the CTA computes dQ += dS K for the step and adds it to the fp32 workspace with
// atomics. dK is scaled by the softmax scale at the end, dQ by the post-pass.
#pragma once

#include <cstdint>
#include <limits>

#include <cuda_runtime.h>

#include "kvtile/attention/cuda/arch/cp_async.cuh"
#include "kvtile/attention/cuda/arch/cp_async_shared.cuh"
#include "kvtile/attention/cuda/arch/mma.cuh"
#include "kvtile/attention/cuda/backward/params.cuh"
#include "kvtile/attention/cuda/prefill/kernel.cuh"
#include "kvtile/attention/cuda/scores.cuh"
#include "kvtile/attention/mask.hpp"
#include "kvtile/attention/softmax_state.hpp"
#include "kvtile/attention/variant.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda::detail {

// (key blocks, kv_heads x column slices, batch).
template <class G>
dim3 backward_grid(const ragged_layout& kv, std::int32_t max_kv_len) {
  return dim3(unsigned((max_kv_len + G::block_kv - 1) / G::block_kv), unsigned(kv.heads * G::col_splits),
              unsigned(kv.batch));
}

// A variant's logit transform on a raw score x = q.k, as the backward needs it: x becomes the
// transformed score in the base-2 domain (the mainloop then exponentiates with scale 1,
// softmax_scale_log2) and grad the transform's derivative, by which dS is multiplied. For a
// plain mask nothing happens (x stays raw, the scale is folded into exp2).
template <class Mask>
KVTILE_DEVICE KVTILE_FORCEINLINE void logit_and_derivative(const Mask& mask, float& x, float& grad, float scale) {
  if constexpr (has_logit_transform<Mask>) {
    const float s = x * scale;
    grad = mask.logit_derivative(s);
    x = mask.logit(s) * log2e;
  } else {
    (void)mask, (void)x, (void)grad, (void)scale;
  }
}

// Adds (a, b) to p[0], p[1] (8-byte aligned): one vector reduction on sm_90, two below.
KVTILE_DEVICE KVTILE_FORCEINLINE void atomic_add2(float* p, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(p), make_float2(a, b));
#else
  atomicAdd(p, a);
  atomicAdd(p + 1, b);
#endif
}

// The epilogue of a K/V-outer kernel for one key: dK (times the softmax scale) and dV of key
// `key`, head hk, from column `col` on: tile n of 8 columns holds the pairs dk(n, 0..1) and
// dv(n, 0..1) at columns col + 8n, col + 8n + 1.
template <class T, int Tiles, class Params, class DK, class DV>
KVTILE_DEVICE KVTILE_FORCEINLINE void store_dkv_row(const Params& p, int b, int key, int hk, int col, DK&& dk, DV&& dv) {
  T* dk_row = p.dk + p.dk_layout.offset(b, key, hk) + col;
  T* dv_row = p.dv + p.dv_layout.offset(b, key, hk) + col;
  KVTILE_PRAGMA_UNROLL
  for (int n = 0; n < Tiles; ++n) {
    *reinterpret_cast<std::uint32_t*>(dk_row + n * 8) = arch::pack2<T>(dk(n, 0) * p.scale, dk(n, 1) * p.scale);
    *reinterpret_cast<std::uint32_t*>(dv_row + n * 8) = arch::pack2<T>(dv(n, 0), dv(n, 1));
  }
}

template <class T, int D, class Tile, class Mask>
struct backward_kernel {
  using G = backward_geometry<T, D, Tile>;
  using params = backward_params<T, Mask>;

  static KVTILE_DEVICE void run(const params& p, unsigned char* smem) {
    const int tid = int(threadIdx.x), warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, t = lane % 4;
    const int b = int(blockIdx.z);
    const int hk = int(blockIdx.y) / G::col_splits, split = int(blockIdx.y) % G::col_splits;
    const int kv_len = p.kv_layout.len_of(b);
    const int k0 = int(blockIdx.x) * G::block_kv;
    if (k0 >= kv_len) return;
    const int k1 = min_i(k0 + G::block_kv, kv_len);
    const int q_len = p.q_layout.len_of(b);
    const Mask mask(p.mask, q_len, kv_len);
    const int col0 = split * G::dkv_cols;
    const bool with_dq = p.dq_acc != nullptr && split == 0;
    const std::int32_t heads = p.q_layout.heads;

    // Shared memory (32-bit shared-window byte addresses): K, V [block_kv][pitch]; Q, dO
    // [2][block_q][pitch]; dS^T [block_kv][ds_pitch]; lse2, Delta [2][block_q] fp32.
    const std::uint32_t k_base = arch::smem_addr(smem);
    const std::uint32_t v_base = k_base + G::kv_bytes;
    const std::uint32_t q_base = v_base + G::kv_bytes;
    const std::uint32_t do_base = q_base + 2 * G::q_slot_bytes;
    const std::uint32_t ds_base = do_base + 2 * G::q_slot_bytes;
    float* s_lse = reinterpret_cast<float*>(smem + 2 * G::kv_bytes + 4 * G::q_slot_bytes + G::ds_bytes);
    float* s_delta = s_lse + 2 * G::block_q;

    const std::int64_t kv_stride = p.kv_layout.stride_token;
    load_tile<T, G, G::block_kv>(k_base, p.k + p.kv_layout.offset(b, k0, hk), kv_stride, kv_len - k0, p.k, tid);
    load_tile<T, G, G::block_kv>(v_base, p.v + p.kv_layout.offset(b, k0, hk), kv_stride, kv_len - k0, p.v, tid);
    arch::cp_async_commit();

    // Steps: (query head of the group, query tile), the empty ones skipped.
    const int n_qt = (q_len + G::block_q - 1) / G::block_q, total = p.group * n_qt;
    auto next_step = [&](int i) {
      for (; i < total; ++i) {
        const int q0 = (i % n_qt) * G::block_q;
        if (mask.classify(q0, min_i(q0 + G::block_q, q_len), k0, k1) != tile_visibility::empty) break;
      }
      return i;
    };
    // The row statistics of a step are read into registers when its loads are issued and
    // stored to shared memory after the current step's work, so their latency hides behind it.
    constexpr int stat_regs = (G::block_q + G::threads - 1) / G::threads;
    float pend_l2[stat_regs], pend_dl[stat_regs];
    auto fetch = [&](int i, int slot) {
      if (i < total) {
        const int h = hk * p.group + i / n_qt, q0 = (i % n_qt) * G::block_q, rows = q_len - q0;
        load_tile<T, G, G::block_q>(q_base + slot * G::q_slot_bytes, p.q + p.q_layout.offset(b, q0, h),
                                    p.q_layout.stride_token, rows, p.q, tid);
        load_tile<T, G, G::block_q>(do_base + slot * G::q_slot_bytes, p.d_o + p.do_layout.offset(b, q0, h),
                                    p.do_layout.stride_token, rows, p.d_o, tid);
        KVTILE_PRAGMA_UNROLL
        for (int x = 0; x < stat_regs; ++x) {
          const int r = tid + x * G::threads;
          pend_l2[x] = std::numeric_limits<float>::infinity();  // padding rows: P = 0
          pend_dl[x] = 0.f;
          if (r < rows && r < G::block_q) {
            const std::int64_t at = std::int64_t(h) * p.ws_rows + p.q_layout.row(b, q0 + r);
            pend_l2[x] = p.lse2[at];
            pend_dl[x] = p.delta[at];
          }
        }
      }
      arch::cp_async_commit();
    };
    auto store_stats = [&](int slot) {
      KVTILE_PRAGMA_UNROLL
      for (int x = 0; x < stat_regs; ++x) {
        const int r = tid + x * G::threads;
        if (r < G::block_q) {
          s_lse[slot * G::block_q + r] = pend_l2[x];
          s_delta[slot * G::block_q + r] = pend_dl[x];
        }
      }
    };

    // Per-lane ldmatrix offsets (elements), as in the forward: A operands and .trans B operands
    // (matrix i = lane / 8: rows +8 for odd i, columns +8 for i >= 2) and plain B operands (rows
    // +8 for i >= 2, columns +8 for odd i). The dS A operand of dQ reads dS^T through .trans,
    // whose matrices run like the plain B operand's.
    const int a_row = lane % 8 + ((lane / 8) % 2) * 8, a_col = (lane / 16) * 8;
    const int b_row = lane % 8 + (lane / 16) * 8, b_col = ((lane / 8) % 2) * 8;
    const std::uint32_t kv_lane = ((warp * 16 + a_row) * G::pitch + a_col) * sizeof(T);
    const std::uint32_t qb_lane = (b_row * G::pitch + b_col) * sizeof(T);
    const std::uint32_t qt_lane = (a_row * G::pitch + a_col) * sizeof(T);

    float dv[G::c_tiles][4], dk[G::c_tiles][4];
    KVTILE_PRAGMA_UNROLL
    for (int n = 0; n < G::c_tiles; ++n)
      KVTILE_PRAGMA_UNROLL
      for (int c = 0; c < 4; ++c) dv[n][c] = dk[n][c] = 0.f;

    const int wk0 = k0 + warp * 16;  // this warp's first key
    const float scale_log2 = softmax_scale_log2<Mask>(p.scale_log2);
    int cur = next_step(0), slot = 0;
    fetch(cur, 0);
    store_stats(0);
    while (cur < total) {
      const int nxt = next_step(cur + 1);
      // Barrier: this step's Q / dO (and K / V) landed, and every warp is done with the previous
      // step (its slot and dS^T), so the next step's loads go into the other slot right away.
      arch::cp_async_wait<0>();
      __syncthreads();
      fetch(nxt, slot ^ 1);

      const int h = hk * p.group + cur / n_qt, q0 = (cur % n_qt) * G::block_q;
      const int q1 = min_i(q0 + G::block_q, q_len);
      tile_visibility vis = wk0 < kv_len ? mask.classify(q0, q1, wk0, wk0 + 16) : tile_visibility::empty;
      if (vis == tile_visibility::full && wk0 + 16 > kv_len) vis = tile_visibility::partial;
      const std::uint32_t q_slot = q_base + slot * G::q_slot_bytes, do_slot = do_base + slot * G::q_slot_bytes;

      if (vis != tile_visibility::empty) {
        // S^T = K Q^T and dP^T = V dO^T, raw fp32 dot products.
        float s[G::q_tiles][4], dp[G::q_tiles][4];
        KVTILE_PRAGMA_UNROLL
        for (int n = 0; n < G::q_tiles; ++n)
          KVTILE_PRAGMA_UNROLL
          for (int c = 0; c < 4; ++c) s[n][c] = dp[n][c] = 0.f;
        KVTILE_PRAGMA_UNROLL
        for (int kd = 0; kd < D / 16; ++kd) {
          std::uint32_t ka[4], va[4];
          arch::ldmatrix_x4(ka, k_base + kv_lane + kd * 16 * sizeof(T));
          arch::ldmatrix_x4(va, v_base + kv_lane + kd * 16 * sizeof(T));
          KVTILE_PRAGMA_UNROLL
          for (int np = 0; np < G::q_tiles / 2; ++np) {
            std::uint32_t qb[4], ob[4];
            const std::uint32_t off = qb_lane + (np * 16 * G::pitch + kd * 16) * sizeof(T);
            arch::ldmatrix_x4(qb, q_slot + off);
            arch::ldmatrix_x4(ob, do_slot + off);
            const std::uint32_t q0b[2] = {qb[0], qb[1]}, q1b[2] = {qb[2], qb[3]};
            const std::uint32_t o0b[2] = {ob[0], ob[1]}, o1b[2] = {ob[2], ob[3]};
            arch::mma_16816<T>(s[2 * np], ka, q0b);
            arch::mma_16816<T>(s[2 * np + 1], ka, q1b);
            arch::mma_16816<T>(dp[2 * np], va, o0b);
            arch::mma_16816<T>(dp[2 * np + 1], va, o1b);
          }
        }

        // P^T and dS^T in place (s, dp). Masked elements and keys past kv_len get P = 0; padding
        // query rows have lse2 = +inf, so P = 0 there too.
        const float* lse_slot = s_lse + slot * G::block_q;
        const float* delta_slot = s_delta + slot * G::block_q;
        KVTILE_PRAGMA_UNROLL
        for (int n = 0; n < G::q_tiles; ++n) {
          const float2 l2 = *reinterpret_cast<const float2*>(lse_slot + n * 8 + 2 * t);
          const float2 dl = *reinterpret_cast<const float2*>(delta_slot + n * 8 + 2 * t);
          KVTILE_PRAGMA_UNROLL
          for (int c = 0; c < 4; ++c) {
            float x = s[n][c], grad = 1.f;
            logit_and_derivative(mask, x, grad, p.scale);
            if (vis == tile_visibility::partial) {
              const int key = wk0 + g + (c / 2) * 8, qi = q0 + n * 8 + 2 * t + (c % 2);
              if (!(key < kv_len && qi < q_len && mask.visible(qi, key))) x = neg_inf;
            }
            const float pv = arch::fast_exp2(fmaf(x, scale_log2, -(c % 2 ? l2.y : l2.x)));
            s[n][c] = pv;
            dp[n][c] = pv * (dp[n][c] - (c % 2 ? dl.y : dl.x));
            if constexpr (has_logit_transform<Mask>) dp[n][c] *= grad;
          }
        }

        // dV += P^T dO and dK += dS^T Q over this CTA's columns: two adjacent 8-query tiles of
        // the accumulators are the A fragment of one 16-query k-step.
        KVTILE_PRAGMA_UNROLL
        for (int j = 0; j < G::block_q / 16; ++j) {
          std::uint32_t pa[4], da[4];
          pa[0] = arch::pack2<T>(s[2 * j][0], s[2 * j][1]);
          pa[1] = arch::pack2<T>(s[2 * j][2], s[2 * j][3]);
          pa[2] = arch::pack2<T>(s[2 * j + 1][0], s[2 * j + 1][1]);
          pa[3] = arch::pack2<T>(s[2 * j + 1][2], s[2 * j + 1][3]);
          da[0] = arch::pack2<T>(dp[2 * j][0], dp[2 * j][1]);
          da[1] = arch::pack2<T>(dp[2 * j][2], dp[2 * j][3]);
          da[2] = arch::pack2<T>(dp[2 * j + 1][0], dp[2 * j + 1][1]);
          da[3] = arch::pack2<T>(dp[2 * j + 1][2], dp[2 * j + 1][3]);
          KVTILE_PRAGMA_UNROLL
          for (int np = 0; np < G::c_tiles / 2; ++np) {
            std::uint32_t ob[4], qb[4];
            const std::uint32_t off = qt_lane + (j * 16 * G::pitch + col0 + np * 16) * sizeof(T);
            arch::ldmatrix_x4_trans(ob, do_slot + off);
            arch::ldmatrix_x4_trans(qb, q_slot + off);
            const std::uint32_t o0b[2] = {ob[0], ob[1]}, o1b[2] = {ob[2], ob[3]};
            const std::uint32_t q0b[2] = {qb[0], qb[1]}, q1b[2] = {qb[2], qb[3]};
            arch::mma_16816<T>(dv[2 * np], pa, o0b);
            arch::mma_16816<T>(dv[2 * np + 1], pa, o1b);
            arch::mma_16816<T>(dk[2 * np], da, q0b);
            arch::mma_16816<T>(dk[2 * np + 1], da, q1b);
          }
          if (with_dq) {  // dS^T rows g and g + 8 of this warp's keys, queries 16j + ...
            T* ds = reinterpret_cast<T*>(smem + (ds_base - k_base));
            T* r0 = ds + (warp * 16 + g) * G::ds_pitch + j * 16 + 2 * t;
            T* r1 = r0 + 8 * G::ds_pitch;
            *reinterpret_cast<std::uint32_t*>(r0) = da[0];
            *reinterpret_cast<std::uint32_t*>(r1) = da[1];
            *reinterpret_cast<std::uint32_t*>(r0 + 8) = da[2];
            *reinterpret_cast<std::uint32_t*>(r1 + 8) = da[3];
          }
        }
      } else if (with_dq) {  // no key of this warp is visible: its dS^T rows are 0
        T* ds = reinterpret_cast<T*>(smem + (ds_base - k_base));
        constexpr int row_chunks = G::block_q / 8;
        for (int id = lane; id < 16 * row_chunks; id += 32)
          *reinterpret_cast<uint4*>(ds + (warp * 16 + id / row_chunks) * G::ds_pitch + (id % row_chunks) * 8) =
              make_uint4(0u, 0u, 0u, 0u);
      }

      if (with_dq) {
        __syncthreads();  // dS^T complete
        // dQ += dS K for the step: units of 16 query rows x dq_unit_cols columns over the warps,
        // added to the fp32 workspace (red.global.add).
        for (int u = warp; u < G::dq_units; u += G::warps) {
          const int rt = u % (G::block_q / 16), cu = u / (G::block_q / 16);
          float acc[G::dq_unit_cols / 8][4];
          KVTILE_PRAGMA_UNROLL
          for (int n = 0; n < G::dq_unit_cols / 8; ++n)
            KVTILE_PRAGMA_UNROLL
            for (int c = 0; c < 4; ++c) acc[n][c] = 0.f;
          KVTILE_PRAGMA_UNROLL
          for (int ks = 0; ks < G::block_kv / 16; ++ks) {
            std::uint32_t a[4];
            arch::ldmatrix_x4_trans(a, ds_base + ((ks * 16 + b_row) * G::ds_pitch + rt * 16 + b_col) * sizeof(T));
            KVTILE_PRAGMA_UNROLL
            for (int np = 0; np < G::dq_unit_cols / 16; ++np) {
              std::uint32_t kb[4];
              arch::ldmatrix_x4_trans(
                  kb, k_base + ((ks * 16 + a_row) * G::pitch + cu * G::dq_unit_cols + np * 16 + a_col) * sizeof(T));
              const std::uint32_t k0b[2] = {kb[0], kb[1]}, k1b[2] = {kb[2], kb[3]};
              arch::mma_16816<T>(acc[2 * np], a, k0b);
              arch::mma_16816<T>(acc[2 * np + 1], a, k1b);
            }
          }
          KVTILE_PRAGMA_UNROLL
          for (int half = 0; half < 2; ++half) {
            const int qi = q0 + rt * 16 + g + half * 8;
            if (qi >= q_len) continue;
            float* dst = p.dq_acc + (p.q_layout.row(b, qi) * heads + h) * D + cu * G::dq_unit_cols + 2 * t;
            KVTILE_PRAGMA_UNROLL
            for (int n = 0; n < G::dq_unit_cols / 8; ++n) atomic_add2(dst + n * 8, acc[n][2 * half], acc[n][2 * half + 1]);
          }
        }
      }
      // The next step's statistics; its slot was last read before this step's first barrier.
      if (nxt < total) store_stats(slot ^ 1);
      slot ^= 1;
      cur = nxt;
    }
    arch::cp_async_wait<0>();

    // Epilogue: this warp's 16 keys, rows g and g + 8; dK = scale * dS^T Q.
    KVTILE_PRAGMA_UNROLL
    for (int half = 0; half < 2; ++half) {
      const int key = wk0 + g + half * 8;
      if (key < kv_len)
        store_dkv_row<T, G::c_tiles>(
            p, b, key, hk, col0 + 2 * t, [&](int n, int c) { return dk[n][2 * half + c]; },
            [&](int n, int c) { return dv[n][2 * half + c]; });
    }
  }
};

template <class Kernel>
KVTILE_KERNEL void __launch_bounds__(Kernel::G::threads) backward_entry(const typename Kernel::params p) {
  extern __shared__ __align__(16) unsigned char backward_smem[];
  Kernel::run(p, backward_smem);
}

}  // namespace attention::cuda::detail
KVTILE_NAMESPACE_END
