// kvtile/attention/cuda/mma_warp.cuh: the mma.sync mainloop (sm_80+) as one warp's part of it:
// MT 16-row tiles of query rows against `Keys` keys of a K/V tile in shared memory. Every
// mma.sync attention kernel is this part between its own loads and its own epilogue:
//   prefill/kernel.cuh        MT = BlockQ / (16 Warps) row tiles, all the tile's keys
//   paged/append_kernel.cuh   MT = 2 (32 packed rows per warp), all the tile's keys
//   paged/decode_warp.cuh     MT = 1 (16 packed rows), a slice of the tile's keys per warp
//
// Per key tile:
//   qk             S = Q K^T (raw dot products, fp32). Q's A fragments from registers or by
//                  ldmatrix from shared memory (q_operand), K's B fragments by ldmatrix.
//   probabilities  the variant's logit transform (scores.cuh), the kernel's mask (-inf where it
//                  says a key is hidden; asked only on partial tiles), then the online softmax:
//                  per row the tile's max (a quad of lanes shares a row), the row statistics
//                  (softmax_row_stats) moved onto the new max, O rescaled, and S becomes
//                  P = exp2(s * scale * log2(e) - base), one FFMA and one ex2 per score.
//   pv             O += P V: P repacked from the S accumulators as A fragments, V's B fragments
//                  by ldmatrix.trans.
// and after the last tile `finish` sums l over the quad, normalises O and gives each row's LSE.
//
// Fragments (PTX ISA, mma.m16n8k16): lane = 4g + t holds rows g and g + 8 of each 16-row tile
// and columns 2t, 2t + 1 of each 8-column tile. s[mt][nt][e] is row g + 8 (e / 2) of row tile
// mt, key 8 nt + 2 t + e % 2 of the warp's keys; o[mt][dt][e] the same rows, head-dim column
// 8 dt + 2 t + e % 2.
#pragma once

#include <cstdint>

#include "kvtile/attention/cuda/arch/mma.cuh"
#include "kvtile/attention/cuda/scores.cuh"
#include "kvtile/attention/cuda/smem_tile.cuh"
#include "kvtile/attention/softmax_state.hpp"
#include "kvtile/core/config.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda {

// ---- Q, the A operand of S = Q K^T -------------------------------------------------------------
// MT row tiles of a padded Q tile: held as fragments in registers (InRegisters), or re-read by
// ldmatrix at every k-step (where registers are short: Q, S and O of 32 rows per warp past
// 192 registers).
template <class T, int D, int MT, bool InRegisters = true>
struct q_operand {
  std::uint32_t f[InRegisters ? MT : 1][InRegisters ? D / 16 : 1][4];
  std::uint32_t lane_addr;  // this lane's ldmatrix row of row tile 0, k-step 0

  // Rows [row0, row0 + 16 MT) of the padded tile at shared-window address `tile`; with
  // InRegisters the tile must have landed.
  KVTILE_DEVICE KVTILE_FORCEINLINE void load(std::uint32_t tile, int row0, int lane) {
    lane_addr = tile + std::uint32_t(padded_tile<D>::at(row0 + lane % 16, (lane / 16) * 8) * sizeof(T));
    if constexpr (InRegisters) {
      KVTILE_PRAGMA_UNROLL
      for (int mt = 0; mt < MT; ++mt)
        KVTILE_PRAGMA_UNROLL
        for (int kd = 0; kd < D / 16; ++kd) arch::ldmatrix_x4(f[mt][kd], at(mt, kd));
    }
  }
  // The A fragment of row tile mt, k-step kd.
  KVTILE_DEVICE KVTILE_FORCEINLINE void get(int mt, int kd, std::uint32_t (&a)[4]) const {
    if constexpr (InRegisters) {
      KVTILE_PRAGMA_UNROLL
      for (int x = 0; x < 4; ++x) a[x] = f[mt][kd][x];
    } else {
      arch::ldmatrix_x4(a, at(mt, kd));
    }
  }

 private:
  KVTILE_DEVICE KVTILE_FORCEINLINE std::uint32_t at(int mt, int kd) const {
    return lane_addr + std::uint32_t(padded_tile<D>::at(mt * 16, kd * 16) * sizeof(T));
  }
};

// ---- the warp's rows -------------------------------------------------------------------------
template <class T, int D, int MT, int Keys>
struct mma_rows {
  static_assert(D % 16 == 0 && MT >= 1 && Keys % 16 == 0, "mma_rows: head dim and keys in 16s, at least one row tile");
  using tile_scores = float[MT][Keys / 8][4];

  float o[MT][D / 8][4];
  softmax_row_stats row[MT][2];

  KVTILE_DEVICE KVTILE_FORCEINLINE void init() {
    KVTILE_PRAGMA_UNROLL
    for (int mt = 0; mt < MT; ++mt) {
      KVTILE_PRAGMA_UNROLL
      for (int i = 0; i < D / 8; ++i) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.f;
      row[mt][0].init();
      row[mt][1].init();
    }
  }

  // s = Q K^T over keys [0, Keys) of the tile k. Unroll: of the k-steps (with Q in shared
  // memory a partial unroll lets ldmatrix run ahead of the MMAs without indexing registers).
  template <int Unroll = D / 16, class Q, class KTile>
  KVTILE_DEVICE KVTILE_FORCEINLINE static void qk(tile_scores& s, const Q& q, const KTile& k, int lane) {
    KVTILE_PRAGMA_UNROLL
    for (int mt = 0; mt < MT; ++mt)
      KVTILE_PRAGMA_UNROLL
      for (int nt = 0; nt < Keys / 8; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
    // B operand: matrix i = lane / 8 covers keys +8 for i >= 2, columns +8 for odd i.
    const auto kl = k.lane(lane % 8 + (lane / 16) * 8, ((lane / 8) % 2) * 8);
#pragma unroll(Unroll)
    for (int kd = 0; kd < D / 16; ++kd) {
      std::uint32_t qa[MT][4];
      KVTILE_PRAGMA_UNROLL
      for (int mt = 0; mt < MT; ++mt) q.get(mt, kd, qa[mt]);
      KVTILE_PRAGMA_UNROLL
      for (int np = 0; np < Keys / 16; ++np) {
        std::uint32_t kb[4];
        arch::ldmatrix_x4(kb, kl.addr(np * 16, kd * 16));
        const std::uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
        KVTILE_PRAGMA_UNROLL
        for (int mt = 0; mt < MT; ++mt) {
          arch::mma_16816<T>(s[mt][2 * np], qa[mt], b0);
          arch::mma_16816<T>(s[mt][2 * np + 1], qa[mt], b1);
        }
      }
    }
  }

  // Scores the kernel hides become -inf: visible(mt, h, key) for row g + 8h of row tile mt and
  // key `key` of the warp's keys [0, Keys).
  template <class Visible>
  KVTILE_DEVICE KVTILE_FORCEINLINE static void mask(tile_scores& s, int lane, Visible&& visible) {
    const int t = lane % 4;
    KVTILE_PRAGMA_UNROLL
    for (int mt = 0; mt < MT; ++mt)
      KVTILE_PRAGMA_UNROLL
      for (int nt = 0; nt < Keys / 8; ++nt)
        KVTILE_PRAGMA_UNROLL
        for (int e = 0; e < 4; ++e)
          if (!visible(mt, e / 2, nt * 8 + 2 * t + (e % 2))) s[mt][nt][e] = neg_inf;
  }

  // Online softmax over the tile's raw scores (masked ones -inf): s becomes P, O and the row
  // statistics move onto the new running max. scale_log2 > 0: the softmax scale times log2(e)
  // (1 after a logit transform). l keeps this lane's columns only; finish() sums the quad.
  // o_factor: what O takes besides the rescale onto the new max, in the same multiply (a
  // codec's change of O's unit, decode_warp.cuh item_scales; 1 compiles away).
  KVTILE_DEVICE KVTILE_FORCEINLINE void softmax(tile_scores& s, float scale_log2, float o_factor = 1.f) {
    KVTILE_PRAGMA_UNROLL
    for (int mt = 0; mt < MT; ++mt)
      KVTILE_PRAGMA_UNROLL
      for (int h = 0; h < 2; ++h) {
        float mx = neg_inf;
        KVTILE_PRAGMA_UNROLL
        for (int nt = 0; nt < Keys / 8; ++nt) mx = max_f(mx, max_f(s[mt][nt][2 * h], s[mt][nt][2 * h + 1]));
        mx = max_f(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = max_f(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        float base;
        const float a = row[mt][h].enter_tile(mx * scale_log2, base) * o_factor;
        KVTILE_PRAGMA_UNROLL
        for (int dt = 0; dt < D / 8; ++dt) {
          o[mt][dt][2 * h] *= a;
          o[mt][dt][2 * h + 1] *= a;
        }
        float sum = 0.f;
        KVTILE_PRAGMA_UNROLL
        for (int nt = 0; nt < Keys / 8; ++nt)
          KVTILE_PRAGMA_UNROLL
          for (int c = 0; c < 2; ++c) {
            float& x = s[mt][nt][2 * h + c];
            x = arch::fast_exp2(fmaf(x, scale_log2, -base));
            sum += x;
          }
        row[mt][h].l += sum;
      }
  }

  // One tile's S -> P: the variant's logit transform (scores.cuh; nothing for a plain mask),
  // the mask where `partial` (visible as for mask()), the online softmax. scale_log2: the
  // softmax scale times log2(e), positive. o_factor: as for softmax().
  template <class Variant, class Visible>
  KVTILE_DEVICE KVTILE_FORCEINLINE void probabilities(tile_scores& s, const Variant& v, float scale_log2, bool partial, int lane,
                                                      Visible&& visible, float o_factor = 1.f) {
    apply_logits(v, s, scale_log2);
    if (partial) mask(s, lane, visible);
    softmax(s, softmax_scale_log2<Variant>(scale_log2), o_factor);
  }

  // P of keys [16 j, 16 j + 16) of row tile mt, repacked from the S accumulators as the A
  // fragment of P V.
  KVTILE_DEVICE KVTILE_FORCEINLINE static void p_fragment(const tile_scores& s, int mt, int j, std::uint32_t (&pa)[4]) {
    pa[0] = arch::pack2<T>(s[mt][2 * j][0], s[mt][2 * j][1]);
    pa[1] = arch::pack2<T>(s[mt][2 * j][2], s[mt][2 * j][3]);
    pa[2] = arch::pack2<T>(s[mt][2 * j + 1][0], s[mt][2 * j + 1][1]);
    pa[3] = arch::pack2<T>(s[mt][2 * j + 1][2], s[mt][2 * j + 1][3]);
  }

  // O += P V over keys [0, Keys) of the tile v; each V fragment feeds every row tile.
  template <class VTile>
  KVTILE_DEVICE KVTILE_FORCEINLINE void pv(const tile_scores& s, const VTile& v, int lane) {
    // ldmatrix.trans: matrix i = lane / 8 covers keys +8 for odd i, columns +8 for i >= 2.
    const auto vl = v.lane(lane % 8 + ((lane / 8) % 2) * 8, (lane / 16) * 8);
    KVTILE_PRAGMA_UNROLL
    for (int j = 0; j < Keys / 16; ++j) {
      std::uint32_t pa[MT][4];
      KVTILE_PRAGMA_UNROLL
      for (int mt = 0; mt < MT; ++mt) p_fragment(s, mt, j, pa[mt]);
      KVTILE_PRAGMA_UNROLL
      for (int dp = 0; dp < D / 16; ++dp) {
        std::uint32_t vb[4];
        arch::ldmatrix_x4_trans(vb, vl.addr(j * 16, dp * 16));
        const std::uint32_t b0[2] = {vb[0], vb[1]}, b1[2] = {vb[2], vb[3]};
        KVTILE_PRAGMA_UNROLL
        for (int mt = 0; mt < MT; ++mt) {
          arch::mma_16816<T>(o[mt][2 * dp], pa[mt], b0);
          arch::mma_16816<T>(o[mt][2 * dp + 1], pa[mt], b1);
        }
      }
    }
  }

  // O times f (a codec's per-item V scale), before the epilogue.
  KVTILE_DEVICE KVTILE_FORCEINLINE void scale_o(float f) {
    KVTILE_PRAGMA_UNROLL
    for (int mt = 0; mt < MT; ++mt)
      KVTILE_PRAGMA_UNROLL
      for (int i = 0; i < D / 8; ++i) o[mt][i][0] *= f, o[mt][i][1] *= f, o[mt][i][2] *= f, o[mt][i][3] *= f;
  }

  // l summed over each row's quad of lanes (before a merge of warps that share rows, or finish).
  KVTILE_DEVICE KVTILE_FORCEINLINE void sum_quads() {
    KVTILE_PRAGMA_UNROLL
    for (int mt = 0; mt < MT; ++mt)
      KVTILE_PRAGMA_UNROLL
      for (int h = 0; h < 2; ++h) {
        row[mt][h].l += __shfl_xor_sync(0xffffffffu, row[mt][h].l, 1);
        row[mt][h].l += __shfl_xor_sync(0xffffffffu, row[mt][h].l, 2);
      }
  }

  // After the last tile, for warps that own their rows' every key: O normalised (a row that saw
  // no key: zeros, not NaN) and lse[mt][h] the natural-log LSE of row g + 8h of tile mt.
  KVTILE_DEVICE KVTILE_FORCEINLINE void finish(float (&lse)[MT][2]) {
    sum_quads();
    KVTILE_PRAGMA_UNROLL
    for (int mt = 0; mt < MT; ++mt)
      KVTILE_PRAGMA_UNROLL
      for (int h = 0; h < 2; ++h) {
        lse[mt][h] = row[mt][h].lse();
        const float inv = row[mt][h].inv_l();
        KVTILE_PRAGMA_UNROLL
        for (int dt = 0; dt < D / 8; ++dt) {
          o[mt][dt][2 * h] *= inv;
          o[mt][dt][2 * h + 1] *= inv;
        }
      }
  }

  // O as T into rows [row0, row0 + 16 MT) of a padded tile (an epilogue's staging area).
  KVTILE_DEVICE KVTILE_FORCEINLINE void store_o(T* tile, int row0, int lane) const {
    const int g = lane / 4, t = lane % 4;
    KVTILE_PRAGMA_UNROLL
    for (int mt = 0; mt < MT; ++mt)
      KVTILE_PRAGMA_UNROLL
      for (int h = 0; h < 2; ++h) {
        T* dst = tile + padded_tile<D>::at(row0 + mt * 16 + g + 8 * h, 2 * t);
        KVTILE_PRAGMA_UNROLL
        for (int dt = 0; dt < D / 8; ++dt)
          *reinterpret_cast<std::uint32_t*>(dst + dt * 8) = arch::pack2<T>(o[mt][dt][2 * h], o[mt][dt][2 * h + 1]);
      }
  }
};

}  // namespace attention::cuda
KVTILE_NAMESPACE_END
