// kvtile/attention/cpu/backward.hpp: attention backward on the CPU, recomputing the scores
// tile by tile from the forward's saved LSE (FlashAttention-2's backward).
//
// With P = 2^(S - lse2) rebuilt per [BlockQ x BlockKV] tile (S in the base-2 domain, lse2 the
// saved natural-log LSE times log2(e)) and D_i = dO_i . O_i precomputed per row:
//   dV += P^T dO      dP = dO V^T      dS = P o (dP - D)      dQ += scale dS K      dK += scale dS^T Q
// A work item is one (sequence, KV head): its K/V tiles are the outer loop (dK, dV stay in the
// tile's fp32 accumulators) and the GQA-packed query rows of all the group's heads the inner
// loop, so dK/dV sum over the group without atomics; dQ accumulates in an fp32 buffer of the
// item's rows. Parallelism is batch x num_kv_heads.
//
// Variants (attention/variant.hpp) run with their transforms, as the forward applies them: a
// rotary variant rotates each query row and each key as they are loaded (at their positions),
// so dQ and dK come out in the rotated frame and are rotated back before they are written
// (R(p)^T = R(-p)); a logit transform (softcap) rebuilds P from the transformed score and
// multiplies dS by its logit_derivative hook.
//
//   attention_backward<tile_shape<BQ, BKV>, HeadDim, Mask>(q, kv, num_kv_heads, mask_params,
//       scale, o, lse, d_o, dq, dk, dv, pool)
//   q, o, d_o  [batch, q_len(b), num_qo_heads, HeadDim], the forward's element type T
//   lse        [rows, num_qo_heads] from the forward (natural log, -inf for masked rows)
//   kv         any kv_source of T (dense or paged)
//   dq         [batch, q_len(b), num_qo_heads, HeadDim]; dk, dv [batch, kv_len(b), num_kv_heads,
//              HeadDim]; element type float or T
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "kvtile/attention/cpu/forward.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cpu {
namespace detail {

template <class QT, class Src, class GT, class Mask>
struct backward_params {
  dense_tensor<QT> q;
  Src kv;
  dense_tensor<QT> o, d_o;
  const float* lse;
  dense_tensor<GT> dq, dk, dv;
  typename Mask::params mask;
  float scale, scale_log2;
  std::int32_t num_qo_heads, group;
};

template <int BQ, int BKV, int D>
struct backward_scratch {
  float k[BKV][D], kt[D][BKV], vt[D][BKV];  // this K/V tile; padding keys are zero
  float v_row[D];                           // one converted value on its way into vt
  float dk[BKV][D], dv[BKV][D];             // its gradients (fp32 accumulators)
  float q[BQ][D], d_o[BQ][D];               // a query tile (q * scale * log2 e) and its dO
  float p[BQ][BKV], dp[BQ][BKV];            // P, then dP and dS
  float pt[BKV][BQ], dst[BKV][BQ];          // P^T and dS^T
  float grad[BQ][BKV];                      // a logit transform's derivative per score
};

template <class Isa, int BQ, int BKV, int D, class Mask, class QT, class Src, class GT>
KVTILE_FORCEINLINE void backward_item(const backward_params<QT, Src, GT, Mask>& p, std::int32_t b, std::int32_t hk) {
  using scratch_t = backward_scratch<BQ, BKV, D>;
  thread_local std::unique_ptr<scratch_t> scratch(new scratch_t);
  scratch_t& sc = *scratch;
  const auto* kbase = p.kv.k_base();
  const auto* vbase = p.kv.v_base();

  const int group = p.group, q_len = p.q.layout.len_of(b), kv_len = p.kv.kv_len(b);
  const int rows = q_len * group, rows_pad = (rows + BQ - 1) / BQ * BQ;
  auto token = [&](int r) { return r / group; };
  auto head = [&](int r) { return hk * group + r % group; };

  // Per row: D = dO . O and the base-2 LSE (+inf for a masked row, so its P is 0).
  std::vector<float> delta(rows_pad, 0.f), lse2(rows_pad, 0.f), dq_acc(std::size_t(rows_pad) * D, 0.f);
  for (int r = 0; r < rows; ++r) {
    const auto* o = p.o.at(b, token(r), head(r));
    const auto* g = p.d_o.at(b, token(r), head(r));
    float acc = 0.f;
    for (int x = 0; x < D; ++x) acc += to_float(o[x]) * to_float(g[x]);
    delta[r] = acc;
    const float l = p.lse[p.q.layout.row(b, token(r)) * p.num_qo_heads + head(r)];
    lse2[r] = l == neg_inf ? -neg_inf : l * log2e;
  }

  const Mask mask(p.mask, q_len, kv_len);
  // Rotary variants: the pairs' frequencies; rotate(x, pos) rotates a row at pos (pos < 0: back).
  [[maybe_unused]] int rot_dims = 0;
  [[maybe_unused]] float inv_freq[D / 2];
  if constexpr (has_rotary<Mask>) {
    rot_dims = mask.rotary_dims(D);
    for (int k = 0; k < rot_dims / 2; ++k) inv_freq[k] = rotary_inv_freq(k, rot_dims, mask.rotary_theta());
  }
  [[maybe_unused]] auto rotate = [&](float* x, int pos) {
    if constexpr (has_rotary<Mask>) rotary_rotate_row<Mask::rotary_layout_v>(x, rot_dims, pos, inv_freq);
  };
  for (int k0 = 0; k0 < kv_len; k0 += BKV) {
    const int nk = std::min(BKV, kv_len - k0), nkp = (nk + micro_n - 1) / micro_n * micro_n;
    for (int j = 0; j < nkp; ++j) {
      if (j < nk) {
        const std::int64_t off = p.kv.token_offset(b, k0 + j, hk);
        convert_row<Isa>(kbase + off, D, 1.f, sc.k[j]);
        if constexpr (has_rotary<Mask>) rotate(sc.k[j], mask.key_position(k0 + j));
        convert_row<Isa>(vbase + off, D, 1.f, sc.v_row);
      } else {
        std::fill_n(sc.k[j], D, 0.f);
        std::fill_n(sc.v_row, D, 0.f);
      }
      for (int x = 0; x < D; ++x) {
        sc.kt[x][j] = sc.k[j][x];
        sc.vt[x][j] = sc.v_row[x];
      }
      std::fill_n(sc.dk[j], D, 0.f);
      std::fill_n(sc.dv[j], D, 0.f);
    }

    for (int r0 = 0; r0 < rows; r0 += BQ) {
      const int nr = std::min(BQ, rows - r0), mr = (nr + micro_m - 1) / micro_m * micro_m;
      const int t0 = token(r0), t1 = token(r0 + nr - 1) + 1;
      const tile_visibility vis = mask.classify(t0, t1, k0, k0 + nk);
      if (vis == tile_visibility::empty) continue;
      for (int i = 0; i < mr; ++i) {
        if (i < nr) {
          convert_row<Isa>(p.q.at(b, token(r0 + i), head(r0 + i)), D, p.scale_log2, sc.q[i]);
          // Rotation is linear: rotating q * scale * log2(e) equals scaling the rotated q.
          if constexpr (has_rotary<Mask>) rotate(sc.q[i], mask.query_position(token(r0 + i)));
          convert_row<Isa>(p.d_o.at(b, token(r0 + i), head(r0 + i)), D, 1.f, sc.d_o[i]);
        } else {
          std::fill_n(sc.q[i], D, 0.f);
          std::fill_n(sc.d_o[i], D, 0.f);
        }
        std::fill_n(sc.p[i], nkp, 0.f);
        std::fill_n(sc.dp[i], nkp, 0.f);
      }

      // P = 2^(S - lse2), masked and padding entries 0; rows past nr stay 0.
      gemm_acc<Isa>(mr, nkp, D, &sc.q[0][0], D, &sc.kt[0][0], BKV, &sc.p[0][0], BKV);
      for (int i = 0; i < mr; ++i) {
        if (i >= nr) {
          std::fill_n(sc.p[i], nkp, 0.f);
          continue;
        }
        if constexpr (has_logit_transform<Mask>)  // the score in natural units: s = p ln 2
          for (int j = 0; j < nk; ++j) {
            sc.grad[i][j] = mask.logit_derivative(sc.p[i][j] * ln2);
            sc.p[i][j] = apply_logit_base2(mask, sc.p[i][j]);
          }
        for (int j = nk; j < nkp; ++j) sc.p[i][j] = neg_inf;
        if (vis == tile_visibility::partial)
          for (int j = 0; j < nk; ++j)
            if (!mask.visible(token(r0 + i), k0 + j)) sc.p[i][j] = neg_inf;
        exp2_row<Isa>(sc.p[i], nkp, lse2[r0 + i], sc.p[i]);
      }

      // dP = dO V^T, then dS = P o (dP - D) in place.
      gemm_acc<Isa>(mr, nkp, D, &sc.d_o[0][0], D, &sc.vt[0][0], BKV, &sc.dp[0][0], BKV);
      for (int i = 0; i < mr; ++i)
        for (int j = 0; j < nkp; ++j) sc.dp[i][j] = sc.p[i][j] * (sc.dp[i][j] - delta[r0 + i]);
      if constexpr (has_logit_transform<Mask>)
        for (int i = 0; i < nr; ++i)
          for (int j = 0; j < nk; ++j) sc.dp[i][j] *= sc.grad[i][j];
      for (int i = 0; i < mr; ++i)
        for (int j = 0; j < nkp; ++j) {
          sc.pt[j][i] = sc.p[i][j];
          sc.dst[j][i] = sc.dp[i][j];
        }

      gemm_acc<Isa>(nkp, D, mr, &sc.pt[0][0], BQ, &sc.d_o[0][0], D, &sc.dv[0][0], D);        // dV += P^T dO
      gemm_acc<Isa>(nkp, D, mr, &sc.dst[0][0], BQ, &sc.q[0][0], D, &sc.dk[0][0], D);         // dK += dS^T Q'
      gemm_acc<Isa>(mr, D, nkp, &sc.dp[0][0], BKV, &sc.k[0][0], D, &dq_acc[std::size_t(r0) * D], D);  // dQ += dS K
    }

    // Q' = q * scale * log2(e), so dK = scale dS^T q = ln(2) dS^T Q' (rotated back: K was
    // rotated as it was loaded).
    for (int j = 0; j < nk; ++j) {
      GT* dk = p.dk.at(b, k0 + j, hk);
      GT* dv = p.dv.at(b, k0 + j, hk);
      for (int x = 0; x < D; ++x) sc.dk[j][x] *= ln2;
      if constexpr (has_rotary<Mask>) rotate(sc.dk[j], -mask.key_position(k0 + j));
      for (int x = 0; x < D; ++x) {
        dk[x] = from_float<GT>(sc.dk[j][x]);
        dv[x] = from_float<GT>(sc.dv[j][x]);
      }
    }
  }

  for (int r = 0; r < rows; ++r) {
    GT* dq = p.dq.at(b, token(r), head(r));
    float* acc = &dq_acc[std::size_t(r) * D];
    for (int x = 0; x < D; ++x) acc[x] *= p.scale;
    if constexpr (has_rotary<Mask>) rotate(acc, -mask.query_position(token(r)));
    for (int x = 0; x < D; ++x) dq[x] = from_float<GT>(acc[x]);
  }
}

template <int BQ, int BKV, int D, class Mask, class QT, class Src, class GT>
void backward_item_generic(const backward_params<QT, Src, GT, Mask>& p, std::int32_t b, std::int32_t hk) {
  backward_item<isa_generic, BQ, BKV, D, Mask>(p, b, hk);
}
template <int BQ, int BKV, int D, class Mask, class QT, class Src, class GT>
KVTILE_CPU_TARGET_AVX2 void backward_item_avx2(const backward_params<QT, Src, GT, Mask>& p, std::int32_t b,
                                               std::int32_t hk) {
  backward_item<isa_avx2, BQ, BKV, D, Mask>(p, b, hk);
}

}  // namespace detail

template <tile_shape_type Tile, int HeadDim, mask_policy Mask, class QT, kv_source Src, class GT>
void attention_backward(const dense_tensor<QT>& q, const Src& kv, std::int32_t num_kv_heads,
                        typename Mask::params mask_params, float scale, const dense_tensor<QT>& o, const float* lse,
                        const dense_tensor<QT>& d_o, const dense_tensor<GT>& dq, const dense_tensor<GT>& dk,
                        const dense_tensor<GT>& dv, thread_pool& pool = thread_pool::global()) {
  check_cpu_config<Tile, HeadDim>();
  static_assert(!has_logit_transform<Mask> || has_logit_derivative<Mask>,
                "attention_backward: the variant's logit transform needs `float logit_derivative(float s) const` "
                "(d logit / d s, by which dS is multiplied; softcap<> has it), see attention/variant.hpp");
  using T = std::remove_cv_t<QT>;
  static_assert(element_type<T>, "queries must be float, kvtile::half or kvtile::bfloat16");
  static_assert(std::is_same_v<kv_element_t<Src>, T>, "K/V must have the queries' element type");
  static_assert(std::is_same_v<GT, float> || std::is_same_v<GT, T>, "gradients are float or the inputs' type");

  detail::check_problem(q, kv, num_kv_heads, scale, HeadDim);
  check_variant<Mask>(mask_params, HeadDim);
  const std::int32_t hq = q.layout.heads;
  detail::check_like(o, q, hq, HeadDim, "output O");
  detail::check_like(d_o, q, hq, HeadDim, "dO");
  detail::check_like(dq, q, hq, HeadDim, "dQ");
  KVTILE_REQUIRE(lse != nullptr || q.layout.rows() == 0, errc::invalid_argument, "backward needs the forward's LSE");
  for (const auto* g : {&dk, &dv}) {
    const char* what = g == &dk ? "dK" : "dV";
    detail::check_ragged(g->layout, what);
    KVTILE_REQUIRE(g->layout.heads == num_kv_heads && g->layout.head_dim == HeadDim, errc::invalid_argument, what,
                   ": [", g->layout.heads, " heads, ", g->layout.head_dim, " dims], expected [", num_kv_heads, ", ",
                   HeadDim, "]");
    KVTILE_REQUIRE(g->layout.batch == kv.batch(), errc::invalid_argument, what, ": batch ", g->layout.batch,
                   " differs from the KV batch ", kv.batch());
    for (std::int32_t b = 0; b < kv.batch(); ++b)
      KVTILE_REQUIRE(g->layout.len_of(b) == kv.kv_len(b), errc::invalid_argument, what, ": sequence ", b, " has ",
                     g->layout.len_of(b), " tokens, K/V has ", kv.kv_len(b));
  }
  const std::int32_t group = hq / num_kv_heads;
  detail::check_packed_rows(q.layout, group);

  const detail::backward_params<QT, Src, GT, Mask> params{q, kv, o, d_o, lse, dq, dk, dv, mask_params,
                                                          scale, scale * log2e, hq, group};
  constexpr int BQ = Tile::block_q, BKV = Tile::block_kv;
  const bool avx2 = use_avx2_path();
  pool.parallel_for(std::int64_t(q.layout.batch) * num_kv_heads, [&](std::int64_t i) {
    const auto b = std::int32_t(i / num_kv_heads), hk = std::int32_t(i % num_kv_heads);
    if (avx2) detail::backward_item_avx2<BQ, BKV, HeadDim, Mask>(params, b, hk);
    else detail::backward_item_generic<BQ, BKV, HeadDim, Mask>(params, b, hk);
  });
}

}  // namespace attention::cpu
KVTILE_NAMESPACE_END
