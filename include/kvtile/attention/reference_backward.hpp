// kvtile/attention/reference_backward.hpp: naive fp64 attention backward, the yardstick for
// every backward kernel.
//
// For one query row with scores s_j = scale * q.k_j over its visible keys, P = softmax(s),
// O = sum_j P_j v_j and upstream gradient dO:
//   dV_j += P_j dO                    dP_j = dO . v_j
//   D     = sum_j P_j dP_j (= dO . O)  dS_j = P_j (dP_j - D)
//   dQ    = scale sum_j dS_j k_j      dK_j += scale dS_j q
// GQA: query head h reads KV head h / group, so dK and dV sum over the group's query heads.
// A variant's logit transform (softcap) enters as s_j = logit(scale q.k_j) and dS_j times
// logit'(scale q.k_j) (its logit_derivative hook). A rotary variant scores the rotated rows,
// R(m) q . R(n) k_j (query position m, key position n), so the gradients above are those of the
// rotated rows and are rotated back: dQ = R(m)^T dQ', dK_j = R(n)^T dK'_j (R(p)^T = R(-p)).
// Shapes: q, d_o, dq [batch, q_len(b), num_qo_heads, head_dim]; kv any kv_source; dk, dv
// [batch, kv_len(b), num_kv_heads, head_dim]. A fully masked row contributes nothing and gets
// dQ = 0. Everything is computed in double from the inputs converted exactly.
//
// naive_attention_backward_lowp is the same algorithm in the storage precision T, as a
// framework computes it: scores, P, dP and dS rounded to T, fp32 sums, gradients rounded to T
// (rotary: Q and K rotated in fp32 and stored in T, dQ' and dK' rotated back likewise).
// FlashAttention's rule for a backward kernel: max|kernel - exact| <= 2 * max|naive_lowp -
// exact| + slack, per gradient.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "kvtile/attention/kv_source.hpp"
#include "kvtile/attention/mask.hpp"
#include "kvtile/attention/variant.hpp"
#include "kvtile/core/error.hpp"
#include "kvtile/core/numeric.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention {

template <mask_policy Mask, class TQ, kv_source Src, class TD>
void reference_attention_backward(const dense_tensor<TQ>& q, const Src& kv, std::int32_t num_kv_heads,
                                  typename Mask::params mask_params, double scale, const dense_tensor<TD>& d_o,
                                  const dense_tensor<double>& dq, const dense_tensor<double>& dk,
                                  const dense_tensor<double>& dv) {
  static_assert(!has_logit_transform<Mask> || has_logit_derivative<Mask>,
                "reference_attention_backward: the variant's logit transform needs a logit_derivative hook "
                "(attention/variant.hpp)");
  const std::int32_t hq = q.layout.heads, d = q.layout.head_dim;
  KVTILE_REQUIRE(num_kv_heads > 0 && hq % num_kv_heads == 0, errc::invalid_argument, "query heads (", hq,
                 ") must be a multiple of KV heads (", num_kv_heads, ")");
  KVTILE_REQUIRE(q.layout.batch == kv.batch(), errc::invalid_argument, "query batch ", q.layout.batch,
                 " differs from KV batch ", kv.batch());
  const std::int32_t group = hq / num_kv_heads;
  const auto* kb = kv.k_base();
  const auto* vb = kv.v_base();
  // The sequence's keys [kv_len, num_kv_heads, d] in double, rotated for a rotary variant.
  std::vector<double> keys, q_row(static_cast<std::size_t>(d));
  auto key = [&](std::int32_t j, std::int32_t h, std::int32_t x) {
    return keys[(std::size_t(j) * num_kv_heads + h) * d + x];
  };
  auto val = [&](std::int32_t b, std::int32_t j, std::int32_t h, std::int32_t x) {
    return to_double(vb[kv.token_offset(b, j, h) + x]);
  };

  for (std::int32_t b = 0; b < q.layout.batch; ++b)
    for (std::int32_t j = 0; j < kv.kv_len(b); ++j)
      for (std::int32_t h = 0; h < num_kv_heads; ++h) {
        std::fill_n(dk.at(b, j, h), d, 0.0);
        std::fill_n(dv.at(b, j, h), d, 0.0);
      }

  std::vector<double> p, dp, grad;
  for (std::int32_t b = 0; b < q.layout.batch; ++b) {
    const std::int32_t q_len = q.layout.len_of(b), kv_len = kv.kv_len(b);
    const Mask mask(mask_params, q_len, kv_len);
    p.assign(std::size_t(kv_len), 0.0);
    dp.assign(std::size_t(kv_len), 0.0);
    grad.assign(std::size_t(kv_len), 1.0);
    // Rotates x[0, d) at position pos (rotary variants; pos < 0 rotates back).
    [[maybe_unused]] auto rotate = [&](double* x, int pos) {
      if constexpr (has_rotary<Mask>)
        rotary_rotate_row_f64<Mask::rotary_layout_v>(x, mask.rotary_dims(d), pos, double(mask.rotary_theta()));
    };
    keys.assign(std::size_t(kv_len) * num_kv_heads * d, 0.0);
    for (std::int32_t j = 0; j < kv_len; ++j)
      for (std::int32_t h = 0; h < num_kv_heads; ++h) {
        double* kr = &keys[(std::size_t(j) * num_kv_heads + h) * d];
        for (std::int32_t x = 0; x < d; ++x) kr[x] = to_double(kb[kv.token_offset(b, j, h) + x]);
        if constexpr (has_rotary<Mask>) rotate(kr, mask.key_position(j));
      }
    for (std::int32_t t = 0; t < q_len; ++t)
      for (std::int32_t h = 0; h < hq; ++h) {
        const std::int32_t hk = h / group;
        const TQ* qs = q.at(b, t, h);
        double* qr = q_row.data();
        for (std::int32_t x = 0; x < d; ++x) qr[x] = to_double(qs[x]);
        if constexpr (has_rotary<Mask>) rotate(qr, mask.query_position(t));
        const TD* gr = d_o.at(b, t, h);
        double* dqr = dq.at(b, t, h);
        std::fill_n(dqr, d, 0.0);
        double mx = -std::numeric_limits<double>::infinity();
        for (std::int32_t j = 0; j < kv_len; ++j) {
          p[j] = -std::numeric_limits<double>::infinity();
          if (!mask.visible(t, j)) continue;
          double dot = 0;
          for (std::int32_t x = 0; x < d; ++x) dot += qr[x] * key(j, hk, x);
          p[j] = dot * scale;
          if constexpr (has_logit_transform<Mask>) {  // s -> logit(s); dS is carried back by logit'(s)
            if constexpr (has_logit_derivative_f64<Mask>) {
              grad[j] = mask.logit_derivative(p[j]);
              p[j] = mask.logit(p[j]);
            } else {
              grad[j] = double(mask.logit_derivative(float(p[j])));
              p[j] = double(mask.logit(float(p[j])));
            }
          }
          mx = std::max(mx, p[j]);
        }
        if (mx == -std::numeric_limits<double>::infinity()) continue;  // fully masked row
        double sum = 0;
        for (std::int32_t j = 0; j < kv_len; ++j) sum += (p[j] = std::exp(p[j] - mx));
        double dsum = 0;
        for (std::int32_t j = 0; j < kv_len; ++j) {
          p[j] /= sum;
          dp[j] = 0;
          if (p[j] == 0) continue;
          for (std::int32_t x = 0; x < d; ++x) dp[j] += to_double(gr[x]) * val(b, j, hk, x);
          dsum += p[j] * dp[j];
        }
        for (std::int32_t j = 0; j < kv_len; ++j) {
          if (p[j] == 0) continue;
          const double ds = p[j] * (dp[j] - dsum) * grad[j];
          double* dkr = dk.at(b, j, hk);
          double* dvr = dv.at(b, j, hk);
          for (std::int32_t x = 0; x < d; ++x) {
            dqr[x] += scale * ds * key(j, hk, x);
            dkr[x] += scale * ds * qr[x];
            dvr[x] += p[j] * to_double(gr[x]);
          }
        }
        if constexpr (has_rotary<Mask>) rotate(dqr, -mask.query_position(t));
      }
    if constexpr (has_rotary<Mask>)
      for (std::int32_t j = 0; j < kv_len; ++j)
        for (std::int32_t h = 0; h < num_kv_heads; ++h) rotate(dk.at(b, j, h), -mask.key_position(j));
  }
}


template <mask_policy Mask, class T, kv_source Src>
void naive_attention_backward_lowp(const dense_tensor<const T>& q, const Src& kv, std::int32_t num_kv_heads,
                                   typename Mask::params mask_params, double scale, const dense_tensor<const T>& d_o,
                                   const dense_tensor<T>& dq, const dense_tensor<T>& dk, const dense_tensor<T>& dv) {
  const std::int32_t hq = q.layout.heads, d = q.layout.head_dim;
  KVTILE_REQUIRE(num_kv_heads > 0 && hq % num_kv_heads == 0, errc::invalid_argument, "query heads (", hq,
                 ") must be a multiple of KV heads (", num_kv_heads, ")");
  const std::int32_t group = hq / num_kv_heads;
  const float sc = float(scale);
  auto rt = [](float x) { return to_float(from_float<T>(x)); };
  const auto* kb = kv.k_base();
  const auto* vb = kv.v_base();
  std::vector<float> s, pr, dp, grad, dk_acc, dv_acc, kf, vf;
  std::vector<float> qf(static_cast<std::size_t>(d)), gf(static_cast<std::size_t>(d)), dqf(static_cast<std::size_t>(d));
  for (std::int32_t b = 0; b < q.layout.batch; ++b) {
    const std::int32_t q_len = q.layout.len_of(b), kv_len = kv.kv_len(b);
    const Mask mask(mask_params, q_len, kv_len);
    s.assign(std::size_t(kv_len), 0.f);
    pr.assign(std::size_t(kv_len), 0.f);
    dp.assign(std::size_t(kv_len), 0.f);
    grad.assign(std::size_t(kv_len), 1.f);
    // Rotates x[0, d) at position pos in fp32 and rounds it to T (rotary variants; pos < 0
    // rotates back).
    [[maybe_unused]] std::vector<float> inv_freq;
    [[maybe_unused]] int r_dims = 0;
    if constexpr (has_rotary<Mask>) {
      r_dims = mask.rotary_dims(d);
      inv_freq.resize(std::size_t(r_dims / 2));
      for (int k = 0; k < r_dims / 2; ++k) inv_freq[k] = rotary_inv_freq(k, r_dims, mask.rotary_theta());
    }
    [[maybe_unused]] auto rotate = [&](float* x, int pos) {
      if constexpr (has_rotary<Mask>) {
        rotary_rotate_row<Mask::rotary_layout_v>(x, r_dims, pos, inv_freq.data());
        for (std::int32_t i = 0; i < d; ++i) x[i] = rt(x[i]);
      }
    };
    for (std::int32_t hk = 0; hk < num_kv_heads; ++hk) {
      kf.assign(std::size_t(kv_len) * d, 0.f);
      vf.assign(std::size_t(kv_len) * d, 0.f);
      for (std::int32_t j = 0; j < kv_len; ++j)
        for (std::int32_t x = 0; x < d; ++x) {
          kf[std::size_t(j) * d + x] = to_float(kb[kv.token_offset(b, j, hk) + x]);
          vf[std::size_t(j) * d + x] = to_float(vb[kv.token_offset(b, j, hk) + x]);
        }
      if constexpr (has_rotary<Mask>)
        for (std::int32_t j = 0; j < kv_len; ++j) rotate(&kf[std::size_t(j) * d], mask.key_position(j));
      dk_acc.assign(std::size_t(kv_len) * d, 0.f);
      dv_acc.assign(std::size_t(kv_len) * d, 0.f);
      for (std::int32_t t = 0; t < q_len; ++t)
        for (std::int32_t h = hk * group; h < (hk + 1) * group; ++h) {
          const T* qr = q.at(b, t, h);
          const T* gr = d_o.at(b, t, h);
          for (std::int32_t x = 0; x < d; ++x) {
            qf[x] = to_float(qr[x]);
            gf[x] = to_float(gr[x]);
            dqf[x] = 0.f;
          }
          if constexpr (has_rotary<Mask>) rotate(qf.data(), mask.query_position(t));
          float mx = -std::numeric_limits<float>::infinity();
          for (std::int32_t j = 0; j < kv_len; ++j) {
            s[j] = -std::numeric_limits<float>::infinity();
            if (!mask.visible(t, j)) continue;
            float dot = 0.f;
            for (std::int32_t x = 0; x < d; ++x) dot += qf[x] * kf[std::size_t(j) * d + x];
            s[j] = rt(dot * sc);
            if constexpr (has_logit_transform<Mask>) {
              grad[j] = rt(mask.logit_derivative(s[j]));
              s[j] = rt(mask.logit(s[j]));
            }
            mx = std::max(mx, s[j]);
          }
          if (mx != -std::numeric_limits<float>::infinity()) {
            float sum = 0.f;
            for (std::int32_t j = 0; j < kv_len; ++j) sum += (pr[j] = std::exp(s[j] - mx));
            float delta = 0.f;
            for (std::int32_t j = 0; j < kv_len; ++j) {
              pr[j] = rt(pr[j] / sum);
              dp[j] = 0.f;
              if (pr[j] == 0.f) continue;
              float dot = 0.f;
              for (std::int32_t x = 0; x < d; ++x) dot += gf[x] * vf[std::size_t(j) * d + x];
              dp[j] = rt(dot);
              delta += pr[j] * dp[j];
            }
            for (std::int32_t j = 0; j < kv_len; ++j) {
              if (pr[j] == 0.f) continue;
              float ds = rt(pr[j] * (dp[j] - delta));
              if constexpr (has_logit_transform<Mask>) ds = rt(ds * grad[j]);
              for (std::int32_t x = 0; x < d; ++x) {
                dqf[x] += ds * kf[std::size_t(j) * d + x];
                dk_acc[std::size_t(j) * d + x] += ds * qf[x];
                dv_acc[std::size_t(j) * d + x] += pr[j] * gf[x];
              }
            }
          }
          T* out = dq.at(b, t, h);
          for (std::int32_t x = 0; x < d; ++x) dqf[x] = rt(dqf[x] * sc);
          if constexpr (has_rotary<Mask>) rotate(dqf.data(), -mask.query_position(t));
          for (std::int32_t x = 0; x < d; ++x) out[x] = from_float<T>(dqf[x]);
        }
      for (std::int32_t j = 0; j < kv_len; ++j) {
        T* ko = dk.at(b, j, hk);
        T* vo = dv.at(b, j, hk);
        float* dkr = &dk_acc[std::size_t(j) * d];
        for (std::int32_t x = 0; x < d; ++x) dkr[x] = rt(dkr[x] * sc);
        if constexpr (has_rotary<Mask>) rotate(dkr, -mask.key_position(j));
        for (std::int32_t x = 0; x < d; ++x) {
          ko[x] = from_float<T>(dkr[x]);
          vo[x] = from_float<T>(dv_acc[std::size_t(j) * d + x]);
        }
      }
    }
  }
}

}  // namespace attention
KVTILE_NAMESPACE_END
