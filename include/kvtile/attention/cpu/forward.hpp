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
// Split-KV (decode): when there are fewer items than pool threads, each item's visible key range
// is cut into chunks of whole key tiles (the same tiles the unsplit walk visits), one work unit
// per chunk; every unit leaves a partial softmax_state per row, and a second pass folds the
// chunks of a row in chunk order with softmax_state::merge. A chunk that sees no key is an empty
// state, so fully masked rows still give zeros and LSE -inf. Split and unsplit results differ
// only by the fp32 rounding of the merge; the chunking depends on the pool's size and on
// split_kv_settings() (min_chunk_keys = 0 turns splitting off).
//
//   attention_forward<tile_shape<BQ, BKV>, HeadDim, Mask>(q, kv, num_kv_heads, mask_params,
//                                                        scale, o, lse, pool)
//   q, o  dense_tensor [batch, q_len(b), num_qo_heads, HeadDim] (fixed or varlen), fp32/fp16/bf16
//   kv    any kv_source (dense fixed/varlen, paged CSR or padded, NHD or HND) of the same type
//   lse   [rows, num_qo_heads] natural-log LSE (row = q.layout.row(b, t)), or null; -inf and
//         o = 0 for a row that sees no key
// Scores are s = (q . k) * scale; masks follow attention/mask.hpp (bottom-right aligned).
// Mask may be a variant (attention/variant.hpp): with rotary, each query row is rotated once
// as its item loads it and each key as its tile is loaded; with a logit transform, every score
// of a visited tile goes through it before the mask. Without transforms none of that is compiled.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "kvtile/attention/cpu/checks.hpp"
#include "kvtile/attention/cpu/thread_pool.hpp"
#include "kvtile/attention/cpu/tile_math.hpp"
#include "kvtile/attention/dense_view.hpp"
#include "kvtile/attention/kv_source.hpp"
#include "kvtile/attention/mask.hpp"
#include "kvtile/attention/softmax_state.hpp"
#include "kvtile/attention/tile_shape.hpp"
#include "kvtile/attention/variant.hpp"
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

// Split-KV tuning, read at each call (like cpu_isa_choice(), not synchronised: set it before
// kernels run). A chunk holds at least min_chunk_keys keys (rounded up to whole key tiles).
struct split_kv_config {
  int min_chunk_keys = 512;  // 0: never split
};
inline split_kv_config& split_kv_settings() {
  static split_kv_config config;
  return config;
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
  // Split-KV unit: keys [k0, k1) only (whole key tiles of the item's visible range), the rows'
  // unnormalised states left in `partial` (one per row) instead of written out. Null: the whole
  // range, written out.
  std::int32_t k0 = 0, k1 = 0;
  void* partial = nullptr;
};

// Writes a finished row i of item w: normalises the state, stores o and the LSE.
template <int D, class QT, class Src, class OT, class Mask>
KVTILE_FORCEINLINE void write_row(const forward_params<QT, Src, OT, Mask>& p, const work_item& w, int i,
                                  softmax_state<D>& st) {
  const int t = (w.r0 + i) / p.group, h = w.hk * p.group + (w.r0 + i) % p.group;
  st.normalize();
  OT* out = p.o.at(w.b, t, h);
  for (int x = 0; x < D; ++x) out[x] = from_float<OT>(st.o[x]);
  if (p.lse) p.lse[p.q.layout.row(w.b, t) * p.num_qo_heads + h] = st.lse();
}

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

  const Mask mask(p.mask, q_len, kv_len);

  // Rotary variants: the pairs' frequencies, once per item (they do not depend on position).
  [[maybe_unused]] int rot_dims = 0;
  [[maybe_unused]] float inv_freq[D / 2];
  if constexpr (has_rotary<Mask>) {
    rot_dims = mask.rotary_dims(D);
    for (int k = 0; k < rot_dims / 2; ++k) inv_freq[k] = rotary_inv_freq(k, rot_dims, mask.rotary_theta());
  }

  for (int i = 0; i < mr; ++i) {
    if (i < nr) {
      convert_row<Isa>(p.q.at(w.b, token(i), head(i)), D, p.scale_log2, sc.q[i]);
      // Rotation is linear, so rotating q * scale * log2(e) equals scaling the rotated q.
      if constexpr (has_rotary<Mask>)
        rotary_rotate_row<Mask::rotary_layout_v>(sc.q[i], rot_dims, mask.query_position(token(i)), inv_freq);
    } else {
      std::fill_n(sc.q[i], D, 0.f);
    }
    sc.row[i].init();
  }

  const int t0 = token(0), t1 = token(nr - 1) + 1;
  int kv_begin = mask.kv_begin(t0, t1), kv_end = mask.kv_end(t0, t1);
  if (w.partial) {  // a split-KV chunk: its tiles start on the unsplit walk's tile boundaries
    kv_begin = std::max(kv_begin, w.k0);
    kv_end = std::min(kv_end, w.k1);
  }
  for (int k0 = kv_begin; k0 < kv_end; k0 += BKV) {
    const int k1 = std::min(k0 + BKV, kv_end), nk = k1 - k0;
    const int nkp = (nk + micro_n - 1) / micro_n * micro_n;
    const tile_visibility vis = mask.classify(t0, t1, k0, k1);
    if (vis == tile_visibility::empty) continue;

    // K (transposed, or as is for few rows) and V of keys [k0, k1), zero-padded to nkp (a
    // padded P column must meet a zero V row).
    for (int j = 0; j < nkp; ++j) {
      if (j < nk) {
        const std::int64_t off = p.kv.token_offset(w.b, k0 + j, w.hk);
        // K is stored before rotation: a rotary variant rotates each key as it is loaded.
        if (few_rows) {
          convert_row<Isa>(kbase + off, D, 1.f, sc.k[j]);
          if constexpr (has_rotary<Mask>)
            rotary_rotate_row<Mask::rotary_layout_v>(sc.k[j], rot_dims, mask.key_position(k0 + j), inv_freq);
        } else {
          convert_row<Isa>(kbase + off, D, 1.f, sc.key_row);
          if constexpr (has_rotary<Mask>)
            rotary_rotate_row<Mask::rotary_layout_v>(sc.key_row, rot_dims, mask.key_position(k0 + j), inv_freq);
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
      if constexpr (has_logit_transform<Mask>)
        for (int j = 0; j < nk; ++j) sc.s[i][j] = apply_logit_base2(mask, sc.s[i][j]);
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

  if (w.partial) {
    std::copy_n(sc.row, nr, static_cast<softmax_state<D>*>(w.partial));
    return;
  }
  for (int i = 0; i < nr; ++i) write_row<D>(p, w, i, sc.row[i]);
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

// Split-KV plan: the units to run, and per split item the chunks to merge.
template <int D>
struct split_plan {
  struct merge_job {
    work_item w;
    std::int32_t rows, chunks;
    softmax_state<D>* states;  // chunks x rows, chunk-major
  };
  std::vector<work_item> units;
  std::vector<merge_job> merges;
  std::vector<softmax_state<D>> states;
};

// Cuts items into key chunks when there are fewer items than threads: each item into
// threads / gcd(items, threads) chunks (so the units fill the threads evenly), fewer where its
// visible range is short. Returns false (plan untouched) when nothing is split.
template <int BQ, int BKV, int D, class Mask, class QT, class Src, class OT>
bool plan_split(const forward_params<QT, Src, OT, Mask>& p, const std::vector<work_item>& items, int threads,
                split_plan<D>& plan) {
  const int min_keys = split_kv_settings().min_chunk_keys;
  const std::int64_t n = std::int64_t(items.size());
  if (min_keys <= 0 || threads <= 1 || n == 0 || n >= threads) return false;
  std::int64_t a = n, b = threads;
  while (b) a = std::exchange(b, a % b);
  const std::int64_t want = threads / a;
  const int min_tiles = (min_keys + BKV - 1) / BKV;

  struct cut {
    std::int32_t begin, chunk_keys, chunks, rows;
  };
  std::vector<cut> cuts(items.size());
  std::size_t states = 0;
  bool any = false;
  for (std::size_t i = 0; i < items.size(); ++i) {
    const work_item& w = items[i];
    const int q_len = p.q.layout.len_of(w.b);
    const int rows = std::min(BQ, q_len * p.group - w.r0);
    const Mask mask(p.mask, q_len, p.kv.kv_len(w.b));
    const int t0 = w.r0 / p.group, t1 = (w.r0 + rows - 1) / p.group + 1;
    const int kb = mask.kv_begin(t0, t1), ke = mask.kv_end(t0, t1);
    const std::int64_t tiles = ke > kb ? (std::int64_t(ke) - kb + BKV - 1) / BKV : 0;
    const std::int64_t chunks = std::min<std::int64_t>(want, tiles / min_tiles);
    if (chunks < 2) {
      cuts[i] = {0, 0, 1, rows};
      continue;
    }
    const std::int64_t per = (tiles + chunks - 1) / chunks;  // tiles per chunk
    cuts[i] = {kb, std::int32_t(per * BKV), std::int32_t((tiles + per - 1) / per), rows};
    states += std::size_t(cuts[i].chunks) * rows;
    any = true;
  }
  if (!any) return false;

  plan.states.resize(states);
  softmax_state<D>* next = plan.states.data();
  for (std::size_t i = 0; i < items.size(); ++i) {
    const cut& c = cuts[i];
    if (c.chunks == 1) {
      plan.units.push_back(items[i]);
      continue;
    }
    plan.merges.push_back({items[i], c.rows, c.chunks, next});
    for (int j = 0; j < c.chunks; ++j) {
      work_item u = items[i];
      u.k0 = c.begin + j * c.chunk_keys;
      u.k1 = u.k0 + c.chunk_keys;
      u.partial = next + std::size_t(j) * c.rows;
      plan.units.push_back(u);
    }
    next += std::size_t(c.chunks) * c.rows;
  }
  return true;
}

// Folds the chunks of every split item, in chunk order, and writes the rows out.
template <int D, class QT, class Src, class OT, class Mask>
void merge_split(const forward_params<QT, Src, OT, Mask>& p, const split_plan<D>& plan, thread_pool& pool) {
  pool.parallel_for(std::int64_t(plan.merges.size()), [&](std::int64_t m) {
    const auto& job = plan.merges[m];
    for (int i = 0; i < job.rows; ++i) {
      softmax_state<D> st = job.states[i];
      for (int c = 1; c < job.chunks; ++c) st.merge(job.states[std::size_t(c) * job.rows + i]);
      write_row<D>(p, job.w, i, st);
    }
  });
}

}  // namespace detail

template <tile_shape_type Tile, int HeadDim, attention_variant Mask, class QT, kv_source Src, class OT>
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
  check_variant<Mask>(mask_params, HeadDim);

  const detail::forward_params<QT, Src, OT, Mask> params{q, kv, o, lse, mask_params, scale * log2e, q.layout.heads, group};
  auto items = detail::plan_items(q.layout, num_kv_heads, group, Tile::block_q);
  constexpr int BQ = Tile::block_q, BKV = Tile::block_kv;
  detail::split_plan<HeadDim> split;
  const bool is_split = detail::plan_split<BQ, BKV, HeadDim>(params, items, pool.size(), split);
  if (is_split) items = std::move(split.units);
  const bool avx2 = use_avx2_path();
  pool.parallel_for(std::int64_t(items.size()), [&](std::int64_t i) {
    if (avx2) detail::forward_item_avx2<BQ, BKV, HeadDim, Mask>(params, items[i]);
    else detail::forward_item_generic<BQ, BKV, HeadDim, Mask>(params, items[i]);
  });
  if (is_split) detail::merge_split<HeadDim>(params, split, pool);
}

}  // namespace attention::cpu
KVTILE_NAMESPACE_END
