// kvtile/attention/cuda/paged/decode_warp.cuh: what the 16-row paged kernels add to the mma.sync
// mainloop part (mma_warp.cuh), shared by the cp.async kernel (kernel.cuh, sm_80+), the fp8
// cp.async kernel (decode_fp8_kernel.cuh) and the TMA kernel (decode_sm90_kernel.cuh).
//
// One warp owns 16 packed query rows (mma_rows with one row tile) and TPW keys of each key tile:
//   scores        S = Q K^T: the mainloop's qk, or K rotated in registers first (a rotary
//                 variant), or K's fp8 bytes converted in registers (scores_fp8)
//   tile_softmax  the codec's per-token K scales, the mainloop's logits, mask and online
//                 softmax, the codec's per-token V scales
//   accumulate    O += P V: the mainloop's pv, or from fp8 bytes (accumulate_fp8)
// and the CTA's epilogue merges the WN warps that share rows, normalises and writes O and LSE
// (or a split item's fp32 partial state). Shared-memory tiles are read through a layout policy
// (smem_tile.cuh): padded rows (cp.async) or 128-byte swizzled column panels (TMA).
#pragma once

#include <cstdint>
#include <type_traits>

#include "kvtile/attention/cuda/arch/mma.cuh"
#include "kvtile/attention/cuda/merge_step.cuh"
#include "kvtile/attention/cuda/mma_warp.cuh"
#include "kvtile/attention/cuda/plan.hpp"
#include "kvtile/attention/cuda/scores.cuh"
#include "kvtile/attention/cuda/tuning.hpp"
#include "kvtile/attention/dense_view.hpp"
#include "kvtile/attention/mask.hpp"
#include "kvtile/attention/softmax_state.hpp"
#include "kvtile/attention/variant.hpp"
#include "kvtile/memory/cuda/fp8_convert.cuh"
#include "kvtile/paging/paged_view.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda::paged {

inline constexpr int merge_early = tuning::paged_merge_early;

// Codec: how the pools' elements decode (memory/kv_codec.hpp); identity for fp16 / bf16 pools.
template <class T, class Table, class Mask, class Codec = memory::identity>
struct kernel_params {
  dense_tensor<T> q;                // [batch, q_len(b), num_qo_heads, D]
  dense_tensor<T> o;                // same shape as q
  paging::paged_kv<T, Table, Codec> kv;  // num_kv_heads heads
  float* lse;                       // [rows, num_qo_heads] natural log, or null
  typename Mask::params mask;
  float scale_log2;                 // softmax scale * log2(e)
  std::int32_t group;               // query heads per KV head
  std::int32_t num_qo_heads;
  const paged_work_item* work;
  const std::int32_t* cta_items;    // TMA decode: CTA c runs items [cta_items[c], cta_items[c + 1])
  const paged_merge_item* merges;
  float* partial_o;                 // [num_partials, BM, D]
  float* partial_lse;               // [num_partials, BM]
  std::int32_t early = 0;           // launched early (programmatic serialisation): may work before its wait
};

// The physical block ids of a work item's request, in logical order (CSR: from the offset the
// planner stored in the item, so no read of indptr sits before the first page lookup).
KVTILE_HOST_DEVICE KVTILE_FORCEINLINE const std::int32_t* page_row(const paging::csr_page_table& t, const paged_work_item& w) {
  return t.indices + w.page_base;
}
KVTILE_HOST_DEVICE KVTILE_FORCEINLINE const std::int32_t* page_row(const paging::padded_page_table& t, const paged_work_item& w) {
  return t.block_table + std::int64_t(w.batch) * t.max_blocks;
}

// A CTA's view of a work item: the request's lengths as planned, the packed query rows, the
// mask, and the key tiles [kv_begin, kv_end) in steps of BN (tiles the mask hides are skipped).
template <int BM, int BN, class Mask>
struct item_tiles {
  paged_work_item w;
  int rows;        // packed query rows of the request (q_len x group)
  int t_lo, t_hi;  // the query tokens of this CTA's rows: [t_lo, t_hi)
  int n_tiles;
  Mask mask;

  template <class T, class Table, class Codec>
  KVTILE_DEVICE item_tiles(const kernel_params<T, Table, Mask, Codec>& p, int item)
      : w(p.work[item]),
        rows(w.q_len * p.group),
        t_lo(w.row0 / p.group),
        t_hi((min_i(w.row0 + BM, rows) - 1) / p.group + 1),
        n_tiles((w.kv_end - w.kv_begin + BN - 1) / BN),
        mask(p.mask, w.q_len, w.kv_len) {}

  KVTILE_DEVICE KVTILE_FORCEINLINE int key0(int tile) const { return w.kv_begin + tile * BN; }
  KVTILE_DEVICE KVTILE_FORCEINLINE int key1(int tile) const { return min_i(key0(tile) + BN, w.kv_end); }
  KVTILE_DEVICE KVTILE_FORCEINLINE tile_visibility visibility(int tile) const {
    return mask.classify(t_lo, t_hi, key0(tile), key1(tile));
  }
  // The first tile at or after `tile` that the mask does not hide entirely (n_tiles: none).
  KVTILE_DEVICE KVTILE_FORCEINLINE int next_tile(int tile) const {
    while (tile < n_tiles && visibility(tile) == tile_visibility::empty) ++tile;
    return tile;
  }
  // The BM packed query rows as 16-byte chunks, one call copy(r, c, src, valid) per chunk c of
  // row r (valid false past the request's rows, src then a harmless address), over NT threads.
  template <int D, class T, class Table, class Codec, class Copy>
  KVTILE_DEVICE KVTILE_FORCEINLINE void q_chunks(const kernel_params<T, Table, Mask, Codec>& p, int tid, int nt,
                                                 Copy&& copy) const {
    constexpr int CPR = D / 8;
    for (int idx = tid; idx < BM * CPR; idx += nt) {
      const int r = idx / CPR, c = idx % CPR;
      const int pr = w.row0 + r;
      const bool valid = pr < rows;
      copy(r, c, valid ? p.q.at(w.batch, pr / p.group, w.kv_head * p.group + pr % p.group) + c * 8 : p.q.data, valid);
    }
  }
};

// The state of one warp's 16 packed rows (two per thread: g and g + 8) against TPW keys per
// tile: the mainloop's rows (O, the row statistics) and Q's fragments in registers.
template <class T, int D, int TPW>
struct warp_rows : mma_rows<T, D, 1, TPW> {
  static_assert(TPW % 16 == 0, "warp_rows: keys per warp per tile must be a multiple of 16");
  using base = mma_rows<T, D, 1, TPW>;
  using typename base::tile_scores;
  using base::o;
  q_operand<T, D, 1> q;

  // Q fragments of rows [row0, row0 + 16) of a padded tile.
  KVTILE_DEVICE KVTILE_FORCEINLINE void load_q(const T* q_s, int row0, int lane) { q.load(arch::smem_addr(q_s), row0, lane); }

  // A rotary variant: rotate the Q fragments (rows g and g + 8: query tokens t_row[0], t_row[1])
  // at the variant's query positions, once per work item, after a barrier that made
  // fill_rotary_table's entries visible. Nothing for other variants.
  template <class Variant>
  KVTILE_DEVICE KVTILE_FORCEINLINE void rotate_q(const Variant& v, const int (&t_row)[2], int lane) {
    if constexpr (has_rotary<Variant>) {
      const int pos[2] = {v.query_position(t_row[0]), v.query_position(t_row[1])};
      with_rotary_steps<D>(v.rotary_dims(D), [&](auto hs) {
        rotate_q_fragments<T, D, hs.value, Variant::rotary_layout_v>(q.f[0], pos, lane % 4);
      });
    } else {
      (void)v, (void)t_row, (void)lane;
    }
  }

  // s = Q K^T over keys [key0, key0 + TPW) of the tile at ks, whose first key is key k_tile of
  // the sequence. A rotary variant's keys are rotated in registers at their positions first.
  template <class Layout, class Variant>
  KVTILE_DEVICE KVTILE_FORCEINLINE void scores(tile_scores& s, const T* ks, int key0, int lane, const Variant& v,
                                               int k_tile) const {
    if constexpr (has_rotary<Variant>) {
      KVTILE_PRAGMA_UNROLL
      for (int i = 0; i < TPW / 8; ++i) s[0][i][0] = s[0][i][1] = s[0][i][2] = s[0][i][3] = 0.f;
      with_rotary_steps<D>(v.rotary_dims(D), [&](auto hs) { rotated_scores<Layout, hs.value>(s, ks, key0, lane, v, k_tile); });
    } else {
      (void)v, (void)k_tile;
      base::qk(s, q, smem_tile<T, Layout>{arch::smem_addr(ks), key0}, lane);
    }
  }

  // scores() of a rotary variant over R = 32 HS dims, s zeroed: one K fragment (interleaved) or
  // a half-split pair of them (k-steps kk and kk + HS) at a time is loaded, rotated and
  // multiplied, so only those registers are live beside Q and O; k-steps past the rotary dims
  // are multiplied as they are. The keys of a B fragment: k0 / k1 key g, k2 / k3 key g + 8.
  template <class Layout, int HS, class Variant>
  KVTILE_DEVICE KVTILE_FORCEINLINE void rotated_scores(tile_scores& s, const T* ks, int key0, int lane, const Variant& v,
                                                       int k_tile) const {
    constexpr bool consecutive = rotary_keys_consecutive<Variant>;
    constexpr bool interleaved = Variant::rotary_layout_v == rotary_layout::interleaved;
    const rotary_pair_entry* table = rotary_table<D>();
    const int tq = lane % 4, mi = lane / 8;
    KVTILE_PRAGMA_UNROLL
    for (int np = 0; np < TPW / 16; ++np) {
      const int j = k_tile + key0 + np * 16 + lane / 4;
      const float pos_g = float(v.key_position(j)), pos_g8 = consecutive ? 0.f : float(v.key_position(j + 8));
      auto load = [&](std::uint32_t(&kf)[4], int kk) {
        arch::ldmatrix_x4(kf, arch::smem_addr(ks + Layout::at(key0 + np * 16 + (mi / 2) * 8 + lane % 8, kk * 16 + (mi % 2) * 8)));
      };
      auto multiply = [&](const std::uint32_t(&kf)[4], int kk) {
        const std::uint32_t b0[2] = {kf[0], kf[1]}, b1[2] = {kf[2], kf[3]};
        arch::mma_16816<T>(s[0][2 * np], q.f[0][kk], b0);
        arch::mma_16816<T>(s[0][2 * np + 1], q.f[0][kk], b1);
      };
      if constexpr (interleaved) {
        KVTILE_PRAGMA_UNROLL
        for (int kk = 0; kk < 2 * HS; ++kk) {
          std::uint32_t kf[4];
          load(kf, kk);
          rotate_k_interleaved<T, consecutive>(kf, table, kk * 8 + tq, pos_g, pos_g8);
          multiply(kf, kk);
        }
      } else {
        KVTILE_PRAGMA_UNROLL
        for (int kk = 0; kk < HS; ++kk) {
          std::uint32_t lo[4], hi[4];
          load(lo, kk);
          load(hi, kk + HS);
          rotate_k_half_split<T, consecutive>(lo, hi, table, kk * 16 + 2 * tq, pos_g, pos_g8);
          multiply(lo, kk);
          multiply(hi, kk + HS);
        }
      }
      KVTILE_PRAGMA_UNROLL
      for (int kk = 2 * HS; kk < D / 16; ++kk) {
        std::uint32_t kf[4];
        load(kf, kk);
        multiply(kf, kk);
      }
    }
  }

  // ---- fp8 pages, fragments straight from the byte tile (decode_fp8_kernel.cuh, registers) ----
  // These warps compute in fp16 (T = half, fp8_compute_t): e4m3 -> fp16 is one cvt per two
  // codes, where bf16 takes three more instructions per pair, and the consumers are bound by
  // issue (decode.md v18). Q comes from a tile of Tq; a bf16 Q is converted as described at
  // load_q_fp8_order.
  // A dot product does not change when the head-dim axis of both Q and K is permuted. ldmatrix
  // (b16) over byte rows gives lane (g, tq) bytes 4tq .. 4tq + 3 of a key row's 16-byte chunk;
  // converted, they are taken as the B fragment's k-pairs (2tq, 2tq + 1) and (2tq + 8, 2tq + 9),
  // i.e. logical k index 2tq + j <-> head dim 4tq + j, 2tq + 8 + j <-> 4tq + 2 + j (j = 0, 1).
  // Q's A fragments are loaded with the same permutation: a0 / a1 = dims 4tq, 4tq + 1 of rows
  // g / g + 8, a2 / a3 = dims 4tq + 2, 4tq + 3.
  // A Q of another type than T (bf16 into fp16 fragments) is taken times 2^e, one e for the
  // warp's 16 rows (arch::bf16_to_fp16_scaled); returns 2^-e, which the caller folds into the
  // softmax scale.
  template <class Tq>
  KVTILE_DEVICE KVTILE_FORCEINLINE float load_q_fp8_order(const Tq* q_s, int row0, int lane) {
    const int g = lane / 4, tq = lane % 4;
    KVTILE_PRAGMA_UNROLL
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint2 a = *reinterpret_cast<const uint2*>(q_s + padded_tile<D>::at(row0 + g, kk * 16 + 4 * tq));
      const uint2 b = *reinterpret_cast<const uint2*>(q_s + padded_tile<D>::at(row0 + g + 8, kk * 16 + 4 * tq));
      q.f[0][kk][0] = a.x, q.f[0][kk][1] = b.x, q.f[0][kk][2] = a.y, q.f[0][kk][3] = b.y;
    }
    if constexpr (std::is_same_v<Tq, T>) {
      return 1.f;
    } else {
      static_assert(std::is_same_v<T, kvtile::half> && std::is_same_v<Tq, kvtile::bfloat16>,
                    "load_q_fp8_order: a bf16 Q into fp16 fragments, or Q of the fragments' type");
      using cv = arch::bf16_to_fp16_scaled;
      std::uint32_t mx = 0;
      KVTILE_PRAGMA_UNROLL
      for (int kk = 0; kk < D / 16; ++kk)
        KVTILE_PRAGMA_UNROLL
        for (int x = 0; x < 4; ++x) mx = cv::max_abs(mx, q.f[0][kk][x]);
      const int e = cv::exponent(mx);
      const float up = cv::up(e);
      KVTILE_PRAGMA_UNROLL
      for (int kk = 0; kk < D / 16; ++kk)
        KVTILE_PRAGMA_UNROLL
        for (int x = 0; x < 4; ++x) q.f[0][kk][x] = cv::pair(q.f[0][kk][x], up);
      return cv::down(e);
    }
  }
  // s = Q K^T over keys [key0, key0 + TPW) of the e4m3 tile at ks (byte offsets: Layout, a
  // padded_byte_rows or swizzled_byte_tile). One ldmatrix_x4 reads 16 keys x 32 dims: matrices
  // (keys +0, dims +0), (keys +8, dims +0), (keys +0, dims +16), (keys +8, dims +16).
  template <class Layout>
  KVTILE_DEVICE KVTILE_FORCEINLINE void scores_fp8(tile_scores& s, const std::uint8_t* ks, int key0, int lane) const {
    static_assert(D % 32 == 0, "scores_fp8: head_dim must be a multiple of 32");
    KVTILE_PRAGMA_UNROLL
    for (int i = 0; i < TPW / 8; ++i) s[0][i][0] = s[0][i][1] = s[0][i][2] = s[0][i][3] = 0.f;
    const int mi = lane / 8;
    KVTILE_PRAGMA_UNROLL
    for (int k2 = 0; k2 < D / 32; ++k2)
      KVTILE_PRAGMA_UNROLL
      for (int np = 0; np < TPW / 16; ++np) {
        std::uint32_t r[4];
        arch::ldmatrix_x4(r, arch::smem_addr(ks + Layout::at(key0 + np * 16 + (mi % 2) * 8 + lane % 8, k2 * 32 + (mi / 2) * 16)));
        KVTILE_PRAGMA_UNROLL
        for (int m = 0; m < 4; ++m) {
          std::uint32_t b[2];
          memory::cuda::e4m3x4_to<T>(r[m], b[0], b[1]);
          arch::mma_16816<T>(s[0][2 * np + m % 2], q.f[0][2 * k2 + m / 2], b);
        }
      }
  }
  // O += P V over keys [key0, key0 + TPW) of the e4m3 tile at vs, as scores_fp8. ldmatrix_x4.trans (b16) over byte rows
  // gives lane (g, tq) keys 2tq, 2tq + 1 x dims 2g, 2g + 1 of a 16-dim chunk (bytes k0d0, k0d1,
  // k1d0, k1d1); a byte permute makes (k0d0, k1d0) the B fragment of dim 2g and (k0d1, k1d1)
  // that of dim 2g + 1. So o[2dp] holds the chunk's even dims and o[2dp + 1] its odd ones: lane
  // (g, tq) ends with dims 16dp + 4tq .. 4tq + 3 as o[2dp][0], o[2dp + 1][0], o[2dp][1],
  // o[2dp + 1][1] (rows g; [2], [3] for g + 8), which finish_rows<..., true> writes back in order.
  template <class Layout>
  KVTILE_DEVICE KVTILE_FORCEINLINE void accumulate_fp8(const tile_scores& s, const std::uint8_t* vs, int key0, int lane) {
    static_assert(D % 32 == 0, "accumulate_fp8: head_dim must be a multiple of 32");
    const int mi = lane / 8;
    KVTILE_PRAGMA_UNROLL
    for (int kj = 0; kj < TPW / 16; ++kj) {
      std::uint32_t pa[4];
      base::p_fragment(s, 0, kj, pa);
      KVTILE_PRAGMA_UNROLL
      for (int d2 = 0; d2 < D / 32; ++d2) {
        std::uint32_t r[4];
        arch::ldmatrix_x4_trans(
            r, arch::smem_addr(vs + Layout::at(key0 + kj * 16 + (mi % 2) * 8 + lane % 8, d2 * 32 + (mi / 2) * 16)));
        KVTILE_PRAGMA_UNROLL
        for (int h = 0; h < 2; ++h) {
          std::uint32_t even[2], odd[2];  // [0]: keys +0..7, [1]: keys +8..15
          memory::cuda::e4m3x4_to<T>(__byte_perm(r[2 * h], 0u, 0x3120u), even[0], odd[0]);
          memory::cuda::e4m3x4_to<T>(__byte_perm(r[2 * h + 1], 0u, 0x3120u), even[1], odd[1]);
          const int dp = 2 * d2 + h;
          arch::mma_16816<T>(o[0][2 * dp], pa, even);
          arch::mma_16816<T>(o[0][2 * dp + 1], pa, odd);
        }
      }
    }
  }

  // One tile's scores to probabilities, the same in every 16-row kernel: the codec's K scales
  // (item_scales; nothing for 2-byte pages), the mainloop's logits, mask (this warp's keys from
  // j0; `partial`: some are past k1 or hidden from the row's query token t_row) and online
  // softmax, the codec's V scales. ksc / vsc: the stage's scales of this warp's keys (read only
  // with per-token scales).
  template <class Scales, class Mask>
  KVTILE_DEVICE KVTILE_FORCEINLINE void tile_softmax(tile_scores& s, Scales& scales, const float* ksc, const float* vsc,
                                                     bool partial, int j0, int k1, const Mask& mask, const int (&t_row)[2],
                                                     int lane) {
    scales.keys(s[0], ksc, lane % 4);
    const float o_unit = scales.enter_values(s[0], vsc, lane % 4);
    this->probabilities(
        s, mask, scales.scale_log2, partial, lane,
        [&](int, int h, int key) {
          const int j = j0 + key;
          return j < k1 && mask.visible(t_row[h], j);
        },
        o_unit);
    scales.values(s[0], vsc, lane % 4);
  }

  // O += P V over keys [key0, key0 + TPW) of the tile at vs.
  template <class Layout>
  KVTILE_DEVICE KVTILE_FORCEINLINE void accumulate(const tile_scores& s, const T* vs, int key0, int lane) {
    this->pv(s, smem_tile<T, Layout>{arch::smem_addr(vs), key0}, lane);
  }
};

// The type the fp8 register paths compute in (warp_rows::load_q_fp8_order).
using fp8_compute_t = kvtile::half;

// How a work item's scores and probabilities take the codec's scales, the same in every paged
// kernel that reads fp8 pages (scales multiply scores and probabilities, never elements). P: the
// type P is packed to for P V.
//   per_head        the K scale joins the softmax scale, the V scale multiplies O at the end:
//                   nothing per tile;
//   per_token_head  S column j times k_scale[j] before the softmax (keys()), P column j times
//                   v_scale[j] after it (values()). fp16 P times a V scale (amax / 448) would
//                   overflow past amax ~ 2.9e7 and fall into fp16's subnormals for small V, so
//                   with fp16 P the tile's largest V scale r of the warp's keys is O's unit:
//                   P column j takes v_scale[j] / r (in [0, 1]), O moves from the previous
//                   tile's unit to r in the softmax's rescale (enter_values()), and takes the
//                   last unit at the end (finish()). bf16 has fp32's range and needs no unit.
// For the identity codec every step is nothing and scale_log2 is the plan's.
template <class P, class Codec>
struct item_scales {
  static constexpr bool token = memory::per_token_scales<Codec>;
  static constexpr bool unit = token && std::is_same_v<P, kvtile::half>;
  float scale_log2;      // softmax scale * log2(e), times the K scale of per_head pools
  float o_factor = 1.f;  // what O takes before the epilogue (per_head: the V scale)
  float v_unit = 1.f;    // `unit`: the V scale O is counted in, and its inverse
  float v_unit_inv = 1.f;

  template <class Pool>
  KVTILE_DEVICE KVTILE_FORCEINLINE item_scales(const Pool& pool, int kv_head, float plan_scale_log2) : scale_log2(plan_scale_log2) {
    if constexpr (memory::per_head_scales<Codec>) {
      // The softmax folds its scale into the exp2 (mma_warp.cuh), which needs it positive: a
      // zero K scale (a head of zeros) is taken as the smallest normal float, the same weights.
      scale_log2 *= max_f(pool.k_scale[kv_head], 1.17549435e-38f);
      o_factor = pool.v_scale[kv_head];
    } else {
      (void)pool, (void)kv_head;
    }
  }
  // ksc / vsc: the scales of this warp's keys of the tile (N groups of 8 columns).
  template <int N>
  KVTILE_DEVICE KVTILE_FORCEINLINE void keys(float (&s)[N][4], const float* ksc, int tq) const {
    if constexpr (token) scale_columns(s, ksc, 1.f, tq);
    else (void)s, (void)ksc, (void)tq;
  }
  // Before the tile's softmax: with a V-scale unit, the largest V scale of the warp's keys
  // becomes O's unit; returns what O takes for it (1 otherwise). Every lane of a quad calls it.
  // A tile whose scales are all zero (keys past the end) keeps the unit.
  template <int N>
  KVTILE_DEVICE KVTILE_FORCEINLINE float enter_values(const float (&s)[N][4], const float* vsc, int tq) {
    (void)s;
    if constexpr (unit) {
      float r = 0.f;
      KVTILE_PRAGMA_UNROLL
      for (int nt = 0; nt < N; ++nt) {
        const float2 f = *reinterpret_cast<const float2*>(vsc + nt * 8 + 2 * tq);
        r = max_f(r, max_f(f.x, f.y));
      }
      r = max_f(r, __shfl_xor_sync(0xffffffffu, r, 1));
      r = max_f(r, __shfl_xor_sync(0xffffffffu, r, 2));
      if (!(r >= 1.17549435e-38f)) return 1.f;
      const float to_new = v_unit / r;
      v_unit = r;
      v_unit_inv = 1.f / r;
      return to_new;
    } else {
      (void)vsc, (void)tq;
      return 1.f;
    }
  }
  template <int N>
  KVTILE_DEVICE KVTILE_FORCEINLINE void values(float (&s)[N][4], const float* vsc, int tq) const {
    if constexpr (token) scale_columns(s, vsc, v_unit_inv, tq);
    else (void)s, (void)vsc, (void)tq;
  }
  template <class Rows>
  KVTILE_DEVICE KVTILE_FORCEINLINE void finish(Rows& st) const {
    const float f = o_factor * v_unit;
    if (f != 1.f) st.scale_o(f);
  }

 private:
  // Each key's column of s times that key's factor times u (sc: the factors of the warp's keys).
  template <int N>
  KVTILE_DEVICE KVTILE_FORCEINLINE static void scale_columns(float (&s)[N][4], const float* sc, float u, int tq) {
    KVTILE_PRAGMA_UNROLL
    for (int nt = 0; nt < N; ++nt) {
      const float2 f = *reinterpret_cast<const float2*>(sc + nt * 8 + 2 * tq);
      const float x = f.x * u, y = f.y * u;
      s[nt][0] *= x;
      s[nt][1] *= y;
      s[nt][2] *= x;
      s[nt][3] *= y;
    }
  }
};

// The epilogue of a 16-row-per-warp CTA of NT threads, WN warps per row group: the warps'
// partial states meet in shared memory (smem: WN * 16 * ((D + 4) * 4 + 8) bytes that no copy in
// flight writes), are merged with softmax_state::merge, normalised and written
// to O and LSE, or for a split item to the fp32 partial buffers that merge_partials_kernel folds.
// `sync` joins the NT threads (__syncthreads by default; a named barrier where other warps of the
// CTA do other work).
struct cta_sync {
  KVTILE_DEVICE KVTILE_FORCEINLINE void operator()() const { __syncthreads(); }
};
// FP8Order: O is in accumulate_fp8's order (each lane's four consecutive dims per 16-dim chunk).
// The warps' fragments may be of another type than T (fp8_compute_t).
template <int BM, int NT, int WN, bool FP8Order = false, class T, class F, int D, int TPW, class Table, class Mask, class Codec,
          class Sync = cta_sync>
KVTILE_DEVICE KVTILE_FORCEINLINE void finish_rows(const kernel_params<T, Table, Mask, Codec>& p, const paged_work_item& w, int rows,
                                                  warp_rows<F, D, TPW>& st, unsigned char* smem, Sync sync = {}) {
  constexpr int RLD = D + 4;  // fp32 reduction row stride
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, tq = lane % 4;
  float* red_o = reinterpret_cast<float*>(smem);  // [warps][16][RLD]
  float* red_ml = red_o + (NT / 32) * 16 * RLD;   // [warps][16][2]
  st.sum_quads();
  if constexpr (FP8Order) {
    KVTILE_PRAGMA_UNROLL
    for (int dp = 0; dp < D / 16; ++dp)
      KVTILE_PRAGMA_UNROLL
      for (int i = 0; i < 2; ++i)
        *reinterpret_cast<float4*>(red_o + (warp * 16 + g + 8 * i) * RLD + dp * 16 + 4 * tq) =
            make_float4(st.o[0][2 * dp][2 * i], st.o[0][2 * dp + 1][2 * i], st.o[0][2 * dp][2 * i + 1], st.o[0][2 * dp + 1][2 * i + 1]);
  } else {
    KVTILE_PRAGMA_UNROLL
    for (int dt = 0; dt < D / 8; ++dt)
      KVTILE_PRAGMA_UNROLL
      for (int i = 0; i < 2; ++i)
        *reinterpret_cast<float2*>(red_o + (warp * 16 + g + 8 * i) * RLD + dt * 8 + 2 * tq) =
            make_float2(st.o[0][dt][2 * i], st.o[0][dt][2 * i + 1]);
  }
  if (tq == 0)
    KVTILE_PRAGMA_UNROLL
    for (int i = 0; i < 2; ++i) {
      red_ml[(warp * 16 + g + 8 * i) * 2] = st.row[0][i].m;
      red_ml[(warp * 16 + g + 8 * i) * 2 + 1] = st.row[0][i].l;
    }
  sync();

  const int b = w.batch, kvh = w.kv_head, row0 = w.row0, group = p.group;
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

}  // namespace attention::cuda::paged
KVTILE_NAMESPACE_END
