// kvtile/attention/cpu/forward.hpp: the tiled online-softmax attention forward on the CPU.
//
// FlashAttention's algorithm: for a tile of query rows, walk the visible K/V tiles once,
// keeping per row the online-softmax state (running max m, running sum l, fp32 accumulator o;
// attention::softmax_state). The score matrix exists only one [BlockQ x BlockKV] tile at a time.
//
// Rows of a work item are GQA-packed: the `group` query heads that share KV head hk are stacked,
// row r = t * group + g (token t, query head hk * group + g), so every K/V tile loaded is used
// by all heads of its group (decode with group 8 is an 8-row GEMM, not eight 1-row ones).
// Work items are (sequence, KV head, row tile), handed out by the thread pool.
//
//   attention_forward<tile_shape<BQ, BKV>, HeadDim, Mask>(q, kv, num_kv_heads, mask_params,
//                                                        scale, o, lse, pool)
//   q, o  dense_tensor [batch, q_len(b), num_qo_heads, HeadDim] (fixed or varlen), fp32/fp16/bf16
//   kv    any kv_source (dense fixed/varlen, paged CSR or padded, NHD or HND) of the same type
//   lse   [rows, num_qo_heads] natural-log LSE (row = q.layout.row(b, t)), or null; -inf and
//         o = 0 for a row that sees no key
// Scores are s = (q . k) * scale; masks follow attention/mask.hpp (bottom-right aligned).
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "kvtile/attention/cpu/checks.hpp"
#include "kvtile/attention/cpu/thread_pool.hpp"
#include "kvtile/attention/cpu/tile_math.hpp"
#include "kvtile/attention/dense_view.hpp"
#include "kvtile/attention/kv_source.hpp"
#include "kvtile/attention/mask.hpp"
#include "kvtile/attention/softmax_state.hpp"
#include "kvtile/attention/tile_shape.hpp"
#include "kvtile/core/numeric.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cpu {

// The element type a kv_source stores.
template <kv_source Src>
using kv_element_t = std::remove_cv_t<std::remove_pointer_t<decltype(std::declval<const Src&>().k_base())>>;

// Compile-time requirements of a CPU kernel configuration, with readable messages.
template <class Tile, int HeadDim>
constexpr void check_cpu_config() {
  static_assert(tile_shape_type<Tile>, "the CPU kernels take an attention::tile_shape<BlockQ, BlockKV>");
  static_assert(is_supported_head_dim<HeadDim>, "HeadDim must be a multiple of 16 in [16, 256]");
  static_assert(Tile::block_q % 8 == 0 && Tile::block_q <= 256,
                "CPU kernels: BlockQ must be a multiple of 8, at most 256");
  static_assert(Tile::block_kv % micro_n == 0 && Tile::block_kv <= 512,
                "CPU kernels: BlockKV must be a multiple of 8, at most 512");
}

namespace detail {

// Everything an item needs, by value; the kernel's arguments after the checks.
template <class QT, class Src, class OT, class Mask>
struct forward_params {
  dense_tensor<QT> q;
  Src kv;
  dense_tensor<OT> o;
  float* lse;
  typename Mask::params mask;
  float scale_log2;  // scale * log2(e): scores go straight to the base-2 domain
  std::int32_t num_qo_heads, group;
};

struct work_item {
  std::int32_t b, hk, r0;  // sequence, KV head, first packed row
};

// Per-thread tiles: query rows, K^T and V of one tile, scores, and the rows' softmax states.
template <int BQ, int BKV, int D>
struct forward_scratch {
  float q[BQ][D];    // queries * scale * log2(e); rows past the item's end are zero
  float kt[D][BKV];  // keys, transposed; columns past the tile's end are zero
  float k[BKV][D];   // keys as they are, for items of few rows (S by dot products)
  float key_row[D];  // one converted key on its way into kt
  float v[BKV][D];   // values; rows past the tile's end are zero
  float s[BQ][BKV];  // scores (base 2), then probabilities in place
  softmax_state<D> row[BQ];
  static_assert(sizeof(softmax_state<D>) == sizeof(float) * (D + 2), "accumulators are addressed with a row stride");
  static constexpr std::int64_t acc_stride = D + 2;  // floats from row[i].o to row[i + 1].o
};

// Items with at most this many rows (decode, short chunks) compute S by dot products instead of
// transposing K, whose cost there outweighs the few rows of arithmetic it feeds.
inline constexpr int few_rows_max = 8;

template <class Isa, int BQ, int BKV, int D, class Mask, class QT, class Src, class OT>
KVTILE_FORCEINLINE void forward_item(const forward_params<QT, Src, OT, Mask>& p, work_item w) {
  using scratch_t = forward_scratch<BQ, BKV, D>;
  thread_local std::unique_ptr<scratch_t> scratch(new scratch_t);
  scratch_t& sc = *scratch;
  const auto* kbase = p.kv.k_base();
  const auto* vbase = p.kv.v_base();

  const int group = p.group, q_len = p.q.layout.len_of(w.b), kv_len = p.kv.kv_len(w.b);
  const int nr = std::min(BQ, q_len * group - w.r0);  // rows of this item
  const int mr = (nr + micro_m - 1) / micro_m * micro_m;
  const bool few_rows = mr <= few_rows_max;
  auto token = [&](int i) { return (w.r0 + i) / group; };
  auto head = [&](int i) { return w.hk * group + (w.r0 + i) % group; };

  for (int i = 0; i < mr; ++i) {
    if (i < nr) convert_row<Isa>(p.q.at(w.b, token(i), head(i)), D, p.scale_log2, sc.q[i]);
    else std::fill_n(sc.q[i], D, 0.f);
    sc.row[i].init();
  }

  const Mask mask(p.mask, q_len, kv_len);
  const int t0 = token(0), t1 = token(nr - 1) + 1;
  const int kv_end = mask.kv_end(t0, t1);
  for (int k0 = mask.kv_begin(t0, t1); k0 < kv_end; k0 += BKV) {
    const int k1 = std::min(k0 + BKV, kv_end), nk = k1 - k0;
    const int nkp = (nk + micro_n - 1) / micro_n * micro_n;
    const tile_visibility vis = mask.classify(t0, t1, k0, k1);
    if (vis == tile_visibility::empty) continue;

    // K (transposed, or as is for few rows) and V of keys [k0, k1), zero-padded to nkp (a
    // padded P column must meet a zero V row).
    for (int j = 0; j < nkp; ++j) {
      if (j < nk) {
        const std::int64_t off = p.kv.token_offset(w.b, k0 + j, w.hk);
        if (few_rows) {
          convert_row<Isa>(kbase + off, D, 1.f, sc.k[j]);
        } else {
          convert_row<Isa>(kbase + off, D, 1.f, sc.key_row);
          for (int x = 0; x < D; ++x) sc.kt[x][j] = sc.key_row[x];
        }
        convert_row<Isa>(vbase + off, D, 1.f, sc.v[j]);
      } else {
        if (few_rows) std::fill_n(sc.k[j], D, 0.f);
        else
          for (int x = 0; x < D; ++x) sc.kt[x][j] = 0.f;
        std::fill_n(sc.v[j], D, 0.f);
      }
    }

    // S = Q K^T (base-2 scores), then the mask: padding columns and, in partial tiles, per element.
    if (few_rows) {
      gemm_nt<Isa>(mr, nkp, D, &sc.q[0][0], D, &sc.k[0][0], D, &sc.s[0][0], BKV);
    } else {
      for (int i = 0; i < mr; ++i) std::fill_n(sc.s[i], nkp, 0.f);
      gemm_acc<Isa>(mr, nkp, D, &sc.q[0][0], D, &sc.kt[0][0], BKV, &sc.s[0][0], BKV);
    }
    for (int i = 0; i < nr; ++i) {
      for (int j = nk; j < nkp; ++j) sc.s[i][j] = neg_inf;
      if (vis == tile_visibility::partial)
        for (int j = 0; j < nk; ++j)
          if (!mask.visible(token(i), k0 + j)) sc.s[i][j] = neg_inf;
    }

    // Online softmax: move each row onto its new max, P = 2^(S - m), l += rowsum(P).
    for (int i = 0; i < nr; ++i) {
      const float base = sc.row[i].enter_tile(row_max<Isa>(sc.s[i], nkp));
      sc.row[i].l += exp2_row<Isa>(sc.s[i], nkp, base, sc.s[i]);
    }
    // O += P V (rows past nr have P = 0: zero queries give zero scores, never exponentiated).
    for (int i = nr; i < mr; ++i) std::fill_n(sc.s[i], nkp, 0.f);
    gemm_acc<Isa>(mr, D, nkp, &sc.s[0][0], BKV, &sc.v[0][0], D, sc.row[0].o, scratch_t::acc_stride);
  }

  for (int i = 0; i < nr; ++i) {
    sc.row[i].normalize();
    OT* out = p.o.at(w.b, token(i), head(i));
    for (int x = 0; x < D; ++x) out[x] = from_float<OT>(sc.row[i].o[x]);
    if (p.lse) p.lse[p.q.layout.row(w.b, token(i)) * p.num_qo_heads + head(i)] = sc.row[i].lse();
  }
}

// The two compiled copies of the item: the build's baseline ISA and AVX2 + FMA.
template <int BQ, int BKV, int D, class Mask, class QT, class Src, class OT>
void forward_item_generic(const forward_params<QT, Src, OT, Mask>& p, work_item w) {
  forward_item<isa_generic, BQ, BKV, D, Mask>(p, w);
}
template <int BQ, int BKV, int D, class Mask, class QT, class Src, class OT>
KVTILE_CPU_TARGET_AVX2 void forward_item_avx2(const forward_params<QT, Src, OT, Mask>& p, work_item w) {
  forward_item<isa_avx2, BQ, BKV, D, Mask>(p, w);
}

// Host-side plan: one item per (sequence, KV head, row tile), longest rows first within a head
// (under a causal mask the last row tiles see the most keys).
inline std::vector<work_item> plan_items(const ragged_layout& q, std::int32_t num_kv_heads, std::int32_t group,
                                         int block_rows) {
  std::vector<work_item> items;
  for (std::int32_t b = 0; b < q.batch; ++b) {
    const std::int64_t rows = std::int64_t(q.len_of(b)) * group;
    const std::int64_t tiles = (rows + block_rows - 1) / block_rows;
    for (std::int32_t hk = 0; hk < num_kv_heads; ++hk)
      for (std::int64_t t = tiles - 1; t >= 0; --t) items.push_back({b, hk, std::int32_t(t * block_rows)});
  }
  return items;
}

}  // namespace detail

template <tile_shape_type Tile, int HeadDim, mask_policy Mask, class QT, kv_source Src, class OT>
void attention_forward(const dense_tensor<QT>& q, const Src& kv, std::int32_t num_kv_heads,
                       typename Mask::params mask_params, float scale, const dense_tensor<OT>& o, float* lse = nullptr,
                       thread_pool& pool = thread_pool::global()) {
  check_cpu_config<Tile, HeadDim>();
  using T = std::remove_cv_t<QT>;
  static_assert(element_type<T>, "queries must be float, kvtile::half or kvtile::bfloat16");
  static_assert(std::is_same_v<kv_element_t<Src>, T>, "K/V must have the queries' element type");
  static_assert(std::is_same_v<OT, T>, "the output must have the queries' element type (and not be const)");

  detail::check_problem(q, kv, num_kv_heads, scale, HeadDim);
  detail::check_like(o, q, q.layout.heads, HeadDim, "output");
  const std::int32_t group = q.layout.heads / num_kv_heads;
  detail::check_packed_rows(q.layout, group);

  const detail::forward_params<QT, Src, OT, Mask> params{q, kv, o, lse, mask_params, scale * log2e, q.layout.heads, group};
  const auto items = detail::plan_items(q.layout, num_kv_heads, group, Tile::block_q);
  constexpr int BQ = Tile::block_q, BKV = Tile::block_kv;
  const bool avx2 = use_avx2_path();
  pool.parallel_for(std::int64_t(items.size()), [&](std::int64_t i) {
    if (avx2) detail::forward_item_avx2<BQ, BKV, HeadDim, Mask>(params, items[i]);
    else detail::forward_item_generic<BQ, BKV, HeadDim, Mask>(params, items[i]);
  });
}

}  // namespace attention::cpu
KVTILE_NAMESPACE_END
