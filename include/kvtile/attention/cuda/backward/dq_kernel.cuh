// kvtile/attention/cuda/backward/dq_kernel.cuh: dQ of the attention backward without atomics,
// Q outer (the deterministic mode; mma.sync m16n8k16, sm_80+).
//
// A CTA owns 16 * Warps query rows of one (sequence, query head) and streams the keys its rows
// can see (mask.kv_begin / kv_end, empty tiles skipped) through a two-slot K / V ring, as the
// forward does. Per key tile, warp w (rows 16w .. 16w + 15) recomputes
//   S = Q K^T,  P = 2^(S scale log2(e) - lse2),  dP = dO V^T,  dS = P o (dP - Delta)
// (a logit transform as in the K/V-outer kernel)
// and adds dS K to its dQ rows in registers: every element is summed in one fixed order, so the
// result is bit-identical from run to run. It recomputes S and dP, which the K/V-outer kernel
// also computes: about 2 / 5 of the backward's matrix work again, the price of determinism.
#pragma once

#include <cstdint>
#include <limits>

#include <cuda_runtime.h>

#include "kvtile/attention/cuda/arch/cp_async.cuh"
#include "kvtile/attention/cuda/arch/mma.cuh"
#include "kvtile/attention/cuda/backward/kernel.cuh"
#include "kvtile/attention/cuda/backward/params.cuh"
#include "kvtile/attention/cuda/prefill/kernel.cuh"
#include "kvtile/attention/mask.hpp"
#include "kvtile/attention/softmax_state.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda::detail {

template <class T, int D, class Tile, class Mask>
struct backward_dq_kernel {
  using G = backward_dq_geometry<T, D, Tile>;
  using params = backward_params<T, Mask>;

  static KVTILE_DEVICE void run(const params& p, unsigned char* smem) {
    const int tid = int(threadIdx.x), warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, t = lane % 4;
    const int b = int(blockIdx.z), h = int(blockIdx.y);
    const int q_tile = int(gridDim.x) - 1 - int(blockIdx.x);  // heaviest (causal) tiles first
    const int q_len = p.q_layout.len_of(b);
    const int q0 = q_tile * G::block_q;
    if (q0 >= q_len) return;
    const int q1 = min_i(q0 + G::block_q, q_len);
    const int kv_len = p.kv_layout.len_of(b);
    const Mask mask(p.mask, q_len, kv_len);
    const int kv_lo = mask.kv_begin(q0, q1), kv_hi = mask.kv_end(q0, q1);
    const int n_tiles = kv_hi > kv_lo ? (kv_hi - kv_lo + G::block_kv - 1) / G::block_kv : 0;
    const int hk = h / p.group;
    const std::int64_t kv_stride = p.kv_layout.stride_token;
    const T* k_g = p.k + p.kv_layout.offset(b, 0, hk);
    const T* v_g = p.v + p.kv_layout.offset(b, 0, hk);

    // Shared memory: Q, dO [block_q][pitch]; K, V [2][block_kv][pitch].
    const std::uint32_t q_base = arch::smem_addr(smem);
    const std::uint32_t do_base = q_base + G::q_bytes;
    const std::uint32_t k_base = do_base + G::q_bytes;
    const std::uint32_t v_base = k_base + 2 * G::kv_slot_bytes;

    load_tile<T, G, G::block_q>(q_base, p.q + p.q_layout.offset(b, q0, h), p.q_layout.stride_token, q1 - q0, p.q, tid);
    load_tile<T, G, G::block_q>(do_base, p.d_o + p.do_layout.offset(b, q0, h), p.do_layout.stride_token, q1 - q0,
                                p.d_o, tid);
    arch::cp_async_commit();

    auto next_tile = [&](int i) {
      while (i < n_tiles && mask.classify(q0, q1, kv_lo + i * G::block_kv, kv_lo + (i + 1) * G::block_kv) ==
                                tile_visibility::empty)
        ++i;
      return i;
    };
    auto fetch = [&](int i, int slot) {
      if (i < n_tiles) {
        const int kk0 = kv_lo + i * G::block_kv;
        load_tile<T, G, G::block_kv>(k_base + slot * G::kv_slot_bytes, k_g + kk0 * kv_stride, kv_stride, kv_len - kk0,
                                     p.k, tid);
        load_tile<T, G, G::block_kv>(v_base + slot * G::kv_slot_bytes, v_g + kk0 * kv_stride, kv_stride, kv_len - kk0,
                                     p.v, tid);
      }
      arch::cp_async_commit();
    };

    // The thread's two rows (g and g + 8 of the warp's 16): lse2 (+inf past q_len: P = 0), Delta.
    const int wq0 = q0 + warp * 16, wq1 = min_i(wq0 + 16, q_len);
    float l2[2], dl[2];
    KVTILE_PRAGMA_UNROLL
    for (int half = 0; half < 2; ++half) {
      const int qi = wq0 + g + half * 8;
      l2[half] = std::numeric_limits<float>::infinity();
      dl[half] = 0.f;
      if (qi < q_len) {
        const std::int64_t at = std::int64_t(h) * p.ws_rows + p.q_layout.row(b, qi);
        l2[half] = p.lse2[at];
        dl[half] = p.delta[at];
      }
    }

    const int a_row = lane % 8 + ((lane / 8) % 2) * 8, a_col = (lane / 16) * 8;
    const int b_row = lane % 8 + (lane / 16) * 8, b_col = ((lane / 8) % 2) * 8;
    const std::uint32_t qa_lane = ((warp * 16 + a_row) * G::pitch + a_col) * sizeof(T);
    const std::uint32_t kb_lane = (b_row * G::pitch + b_col) * sizeof(T);
    const std::uint32_t kt_lane = (a_row * G::pitch + a_col) * sizeof(T);

    const float scale_log2 = softmax_scale_log2<Mask>(p.scale_log2);
    float acc[G::o_tiles][4];
    KVTILE_PRAGMA_UNROLL
    for (int n = 0; n < G::o_tiles; ++n)
      KVTILE_PRAGMA_UNROLL
      for (int c = 0; c < 4; ++c) acc[n][c] = 0.f;

    int cur = next_tile(0), slot = 0;
    fetch(cur, 0);
    while (cur < n_tiles) {
      const int nxt = next_tile(cur + 1);
      arch::cp_async_wait<0>();
      __syncthreads();
      fetch(nxt, slot ^ 1);

      const int kk0 = kv_lo + cur * G::block_kv;
      tile_visibility vis = wq0 < wq1 ? mask.classify(wq0, wq1, kk0, kk0 + G::block_kv) : tile_visibility::empty;
      if (vis == tile_visibility::full && kk0 + G::block_kv > kv_len) vis = tile_visibility::partial;
      const std::uint32_t k_slot = k_base + slot * G::kv_slot_bytes, v_slot = v_base + slot * G::kv_slot_bytes;
      if (vis != tile_visibility::empty) {
        float s[G::s_tiles][4], dp[G::s_tiles][4];
        KVTILE_PRAGMA_UNROLL
        for (int n = 0; n < G::s_tiles; ++n)
          KVTILE_PRAGMA_UNROLL
          for (int c = 0; c < 4; ++c) s[n][c] = dp[n][c] = 0.f;
        KVTILE_PRAGMA_UNROLL
        for (int kd = 0; kd < D / 16; ++kd) {
          std::uint32_t qa[4], oa[4];
          arch::ldmatrix_x4(qa, q_base + qa_lane + kd * 16 * sizeof(T));
          arch::ldmatrix_x4(oa, do_base + qa_lane + kd * 16 * sizeof(T));
          KVTILE_PRAGMA_UNROLL
          for (int np = 0; np < G::s_tiles / 2; ++np) {
            std::uint32_t kb[4], vb[4];
            const std::uint32_t off = kb_lane + (np * 16 * G::pitch + kd * 16) * sizeof(T);
            arch::ldmatrix_x4(kb, k_slot + off);
            arch::ldmatrix_x4(vb, v_slot + off);
            const std::uint32_t k0b[2] = {kb[0], kb[1]}, k1b[2] = {kb[2], kb[3]};
            const std::uint32_t v0b[2] = {vb[0], vb[1]}, v1b[2] = {vb[2], vb[3]};
            arch::mma_16816<T>(s[2 * np], qa, k0b);
            arch::mma_16816<T>(s[2 * np + 1], qa, k1b);
            arch::mma_16816<T>(dp[2 * np], oa, v0b);
            arch::mma_16816<T>(dp[2 * np + 1], oa, v1b);
          }
        }
        KVTILE_PRAGMA_UNROLL
        for (int n = 0; n < G::s_tiles; ++n)
          KVTILE_PRAGMA_UNROLL
          for (int c = 0; c < 4; ++c) {
            float x = s[n][c], grad = 1.f;
            logit_and_derivative(mask, x, grad, p.scale);
            if (vis == tile_visibility::partial) {
              const int qi = wq0 + g + (c / 2) * 8, key = kk0 + n * 8 + 2 * t + (c % 2);
              if (!(key < kv_len && qi < q_len && mask.visible(qi, key))) x = neg_inf;
            }
            const float pv = arch::fast_exp2(fmaf(x, scale_log2, -l2[c / 2]));
            dp[n][c] = pv * (dp[n][c] - dl[c / 2]);
            if constexpr (has_logit_transform<Mask>) dp[n][c] *= grad;
          }
        // dQ += dS K: two adjacent 8-key tiles of dS are the A fragment of one 16-key step.
        KVTILE_PRAGMA_UNROLL
        for (int j = 0; j < G::block_kv / 16; ++j) {
          std::uint32_t da[4];
          da[0] = arch::pack2<T>(dp[2 * j][0], dp[2 * j][1]);
          da[1] = arch::pack2<T>(dp[2 * j][2], dp[2 * j][3]);
          da[2] = arch::pack2<T>(dp[2 * j + 1][0], dp[2 * j + 1][1]);
          da[3] = arch::pack2<T>(dp[2 * j + 1][2], dp[2 * j + 1][3]);
          KVTILE_PRAGMA_UNROLL
          for (int np = 0; np < G::o_tiles / 2; ++np) {
            std::uint32_t kb[4];
            arch::ldmatrix_x4_trans(kb, k_slot + kt_lane + (j * 16 * G::pitch + np * 16) * sizeof(T));
            const std::uint32_t k0b[2] = {kb[0], kb[1]}, k1b[2] = {kb[2], kb[3]};
            arch::mma_16816<T>(acc[2 * np], da, k0b);
            arch::mma_16816<T>(acc[2 * np + 1], da, k1b);
          }
        }
      }
      slot ^= 1;
      cur = nxt;
    }
    arch::cp_async_wait<0>();

    KVTILE_PRAGMA_UNROLL
    for (int half = 0; half < 2; ++half) {
      const int qi = wq0 + g + half * 8;
      if (qi >= q_len) continue;
      T* dq_row = p.dq + p.dq_layout.offset(b, qi, h) + 2 * t;
      KVTILE_PRAGMA_UNROLL
      for (int n = 0; n < G::o_tiles; ++n)
        *reinterpret_cast<std::uint32_t*>(dq_row + n * 8) =
            arch::pack2<T>(acc[n][2 * half] * p.scale, acc[n][2 * half + 1] * p.scale);
    }
  }
};

template <class Kernel>
KVTILE_KERNEL void __launch_bounds__(Kernel::G::threads) backward_dq_entry(const typename Kernel::params p) {
  extern __shared__ __align__(16) unsigned char backward_dq_smem[];
  Kernel::run(p, backward_dq_smem);
}

}  // namespace attention::cuda::detail
KVTILE_NAMESPACE_END
