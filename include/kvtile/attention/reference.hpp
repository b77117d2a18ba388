// kvtile/attention/reference.hpp: naive attention, the yardstick every kernel is tested against.
//
// reference_attention     fp64 throughout: the "exact" answer.
// naive_attention_lowp    the naive algorithm in the storage precision T (scores and
//                         probabilities rounded to T, fp32 sums, output rounded to T), as a
//                         framework would compute it. FlashAttention's rule for a kernel:
//                         max|kernel - exact| <= 2 * max|naive_lowp - exact| + slack.
// Both materialise one row of scores at a time; they are for tests, not for speed (the rows of a
// large sequence run on cpu::thread_pool::global(), which leaves every value as it is).
// Both apply a variant's transforms (attention/variant.hpp): Q and K rotated at their positions
// (fp64: the rotary formula in double; low precision: in fp32 as kernels do, the rotated
// values then rounded to T as a framework stores them), the logit transform on each scaled
// score before the mask and softmax (in double where the variant offers it).
//
// K/V sources whose elements carry scales (paging::paged_kv over an fp8 pool: k_scale(b, t, h),
// v_scale(b, t, h)) are read through them: scores of key j times its K scale, probabilities
// times its V scale, in the accumulation type (so fp8 pools are read exactly, not dequantised).
// Shapes: q, o are dense_tensor views [batch, q_len(b), num_qo_heads, head_dim];
// kv is any kv_source with num_kv_heads heads; num_qo_heads % num_kv_heads == 0 (GQA: query
// head h reads KV head h / (num_qo_heads / num_kv_heads)); lse is [rows, num_qo_heads] in
// natural log (row = q.layout.row(b, t)), -inf for a row that sees no key (its o is zeros).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "kvtile/attention/cpu/thread_pool.hpp"
#include "kvtile/attention/kv_source.hpp"
#include "kvtile/attention/mask.hpp"
#include "kvtile/attention/variant.hpp"
#include "kvtile/core/error.hpp"
#include "kvtile/core/numeric.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention {

namespace detail {

// The scales of key j's K and V (1 for sources without them).
template <class Src>
double kv_k_scale(const Src& kv, std::int32_t b, std::int32_t j, std::int32_t h) {
  if constexpr (requires { kv.k_scale(b, j, h); }) return double(kv.k_scale(b, j, h));
  else return (void)kv, (void)b, (void)j, (void)h, 1.0;
}
template <class Src>
double kv_v_scale(const Src& kv, std::int32_t b, std::int32_t j, std::int32_t h) {
  if constexpr (requires { kv.v_scale(b, j, h); }) return double(kv.v_scale(b, j, h));
  else return (void)kv, (void)b, (void)j, (void)h, 1.0;
}

template <class TQ, class TO, class Src, class Mask, class Acc, class RoundScore, class RoundOut>
void naive_attention(const dense_tensor<TQ>& q, const Src& kv, std::int32_t num_kv_heads,
                     typename Mask::params mask_params, double scale, const dense_tensor<TO>& o, Acc* lse,
                     RoundScore round_score, RoundOut round_out) {
  const std::int32_t hq = q.layout.heads, d = q.layout.head_dim;
  KVTILE_REQUIRE(num_kv_heads > 0 && hq % num_kv_heads == 0, errc::invalid_argument,
                 "query heads (", hq, ") must be a multiple of KV heads (", num_kv_heads, ")");
  KVTILE_REQUIRE(q.layout.batch == kv.batch(), errc::invalid_argument, "query batch ", q.layout.batch,
                 " differs from KV batch ", kv.batch());
  check_variant<Mask>(mask_params, d);
  const std::int32_t group = hq / num_kv_heads;
  const auto* kb = kv.k_base();
  const auto* vb = kv.v_base();
  // Rotary variants: the sequence's rotated keys [kv_len, hk, d], and the frequencies (fp32 path).
  [[maybe_unused]] std::vector<Acc> k_rot;
  [[maybe_unused]] std::vector<float> inv_freq;
  for (std::int32_t b = 0; b < q.layout.batch; ++b) {
    const std::int32_t q_len = q.layout.len_of(b), kv_len = kv.kv_len(b);
    const Mask mask(mask_params, q_len, kv_len);
    // Rotates src[0, d) at position pos into dst (see the header comment for the precision).
    [[maybe_unused]] auto rotate = [&](const auto* src, int pos, Acc* dst) {
      if constexpr (has_rotary<Mask>) {
        const int r = mask.rotary_dims(d);
        if constexpr (std::is_same_v<Acc, double>) {
          for (std::int32_t x = 0; x < d; ++x) dst[x] = to_double(src[x]);
          rotary_rotate_row_f64<Mask::rotary_layout_v>(dst, r, pos, double(mask.rotary_theta()));
        } else {  // fp32, in place
          static_assert(std::is_same_v<Acc, float>);
          for (std::int32_t x = 0; x < d; ++x) dst[x] = float(to_double(src[x]));
          rotary_rotate_row<Mask::rotary_layout_v>(dst, r, pos, inv_freq.data());
          for (std::int32_t x = 0; x < d; ++x) dst[x] = round_score(dst[x]);
        }
      }
    };
    if constexpr (has_rotary<Mask>) {
      if constexpr (!std::is_same_v<Acc, double>) {
        const int r = mask.rotary_dims(d);
        inv_freq.resize(std::size_t(r / 2));
        for (int k = 0; k < r / 2; ++k) inv_freq[k] = rotary_inv_freq(k, r, mask.rotary_theta());
      }
      k_rot.assign(std::size_t(kv_len) * num_kv_heads * d, Acc(0));
      for (std::int32_t j = 0; j < kv_len; ++j)
        for (std::int32_t hk = 0; hk < num_kv_heads; ++hk)
          rotate(kb + kv.token_offset(b, j, hk), mask.key_position(j), &k_rot[(std::size_t(j) * num_kv_heads + hk) * d]);
    }
    // One output row (query t, head h); rows are independent, so they run on the CPU backend's
    // thread pool when the sequence is large enough to pay for it (the result does not depend on it).
    auto row = [&](std::int64_t item) {
      const auto t = std::int32_t(item / hq), h = std::int32_t(item % hq);
      const std::int32_t hk = h / group;
      const TQ* qr = q.at(b, t, h);
      std::vector<Acc> s(static_cast<std::size_t>(kv_len)), acc(static_cast<std::size_t>(d), Acc(0));
      [[maybe_unused]] std::vector<Acc> q_rot;
      if constexpr (has_rotary<Mask>) {
        q_rot.resize(std::size_t(d));
        rotate(qr, mask.query_position(t), q_rot.data());
      }
      Acc mx = -std::numeric_limits<Acc>::infinity();
      for (std::int32_t j = 0; j < kv_len; ++j) {
        if (!mask.visible(t, j)) {
          s[j] = -std::numeric_limits<Acc>::infinity();
          continue;
        }
        Acc dot = 0;
        if constexpr (has_rotary<Mask>) {
          const Acc* kr = &k_rot[(std::size_t(j) * num_kv_heads + hk) * d];
          for (std::int32_t x = 0; x < d; ++x) dot += q_rot[x] * kr[x];
        } else {
          const auto* kr = kb + kv.token_offset(b, j, hk);
          for (std::int32_t x = 0; x < d; ++x) dot += Acc(to_double(qr[x])) * Acc(to_double(kr[x]));
        }
        dot *= Acc(kv_k_scale(kv, b, j, hk));
        if constexpr (has_logit_transform<Mask>) {
          const Acc sc = round_score(dot * Acc(scale));
          if constexpr (std::is_same_v<Acc, double> && has_logit_transform_f64<Mask>) s[j] = mask.logit(sc);
          else s[j] = round_score(Acc(mask.logit(float(sc))));
        } else {
          s[j] = round_score(dot * Acc(scale));
        }
        if (s[j] > mx) mx = s[j];
      }
      Acc sum = 0;
      for (std::int32_t j = 0; j < kv_len; ++j) {
        s[j] = mx == -std::numeric_limits<Acc>::infinity() ? Acc(0) : std::exp(s[j] - mx);
        sum += s[j];
      }
      for (std::int32_t j = 0; j < kv_len; ++j) {
        if (s[j] == Acc(0)) continue;
        const Acc p = round_score(s[j] / sum) * Acc(kv_v_scale(kv, b, j, hk));
        const auto* vr = vb + kv.token_offset(b, j, hk);
        for (std::int32_t x = 0; x < d; ++x) acc[x] += p * Acc(to_double(vr[x]));
      }
      TO* orow = o.at(b, t, h);
      for (std::int32_t x = 0; x < d; ++x) orow[x] = round_out(acc[x]);
      if (lse)
        lse[q.layout.row(b, t) * hq + h] = sum > 0 ? mx + std::log(sum) : -std::numeric_limits<Acc>::infinity();
    };
    const std::int64_t rows = std::int64_t(q_len) * hq;
    if (rows > 1 && rows * kv_len * d >= (std::int64_t(1) << 22)) {
      cpu::thread_pool::global().parallel_for(rows, row);
    } else {
      for (std::int64_t i = 0; i < rows; ++i) row(i);
    }
  }
}

}  // namespace detail

// Exact (fp64) attention. o: [.., num_qo_heads, head_dim] doubles; lse may be null.
template <attention_variant Mask, class TQ, kv_source Src>
void reference_attention(const dense_tensor<TQ>& q, const Src& kv, std::int32_t num_kv_heads,
                         typename Mask::params mask_params, double scale, const dense_tensor<double>& o,
                         double* lse = nullptr) {
  auto id = [](double x) { return x; };
  detail::naive_attention<TQ, double, Src, Mask, double>(q, kv, num_kv_heads, mask_params, scale, o, lse, id, id);
}

// The naive algorithm in storage precision T: the error baseline of FlashAttention's rule.
template <attention_variant Mask, class TQ, class T, kv_source Src>
void naive_attention_lowp(const dense_tensor<TQ>& q, const Src& kv, std::int32_t num_kv_heads,
                          typename Mask::params mask_params, double scale, const dense_tensor<T>& o,
                          float* lse = nullptr) {
  auto round_t = [](float x) { return to_float(from_float<T>(x)); };
  auto out_t = [](float x) { return from_float<T>(x); };
  detail::naive_attention<TQ, T, Src, Mask, float>(q, kv, num_kv_heads, mask_params, scale, o, lse, round_t, out_t);
}

}  // namespace attention
KVTILE_NAMESPACE_END
