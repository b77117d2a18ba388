// kvtile/attention/softmax_state.hpp: the online-softmax state of a query row and its merge.
//
// This is the one implementation used by the CPU kernels, every CUDA kernel, split-KV merging
// and cascade merging. Scores live in the base-2 domain: kernels multiply q.k by
// scale * log2(e), so every exponential is an exp2. The log-sum-exp handed to users is in the
// natural-log domain, like FlashAttention's.
//
//   m  running max of the scores seen so far (-inf while none)
//   l  running sum of exp2(s_j - m)
//   o  the unnormalised accumulator sum_j exp2(s_j - m) v_j, of which a thread may own only a
//      slice (N elements)
//
// Merging two partial states (FlashAttention, eq. of the seed):
//   m = max(m1, m2),  l = 2^(m1-m) l1 + 2^(m2-m) l2,  o = 2^(m1-m) o1 + 2^(m2-m) o2
// with 2^(-inf - x) taken as 0, so two empty states merge to an empty one and never to NaN.
#pragma once

#include <cmath>
#include <limits>

#include "kvtile/core/config.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention {

inline constexpr float log2e = 1.4426950408889634f;
inline constexpr float ln2 = 0.6931471805599453f;
inline constexpr float neg_inf = -std::numeric_limits<float>::infinity();

KVTILE_HOST_DEVICE KVTILE_FORCEINLINE float exp2_approx(float x) {
#if KVTILE_IS_DEVICE_PASS
  return exp2f(x);  // one MUFU ex2 (plus range fix-up) per weight
#else
  return std::exp2(x);
#endif
}

KVTILE_HOST_DEVICE KVTILE_FORCEINLINE float max_f(float a, float b) {
#if KVTILE_IS_DEVICE_PASS
  return fmaxf(a, b);
#else
  return a > b ? a : b;
#endif
}

// The factor that moves a sum taken relative to max m_old onto max m_new (m_new >= m_old):
// 2^(m_old - m_new), and 0 when nothing was summed yet (m_old = -inf), never NaN.
KVTILE_HOST_DEVICE KVTILE_FORCEINLINE float rescale_factor(float m_old, float m_new) {
  return m_old == neg_inf ? 0.f : exp2_approx(m_old - m_new);
}

// The max to subtract before exponentiating: -inf (a row with no visible score yet) becomes 0,
// so exp2(-inf - 0) = 0 instead of exp2(-inf + inf) = NaN.
KVTILE_HOST_DEVICE KVTILE_FORCEINLINE float exp_base(float m) { return m == neg_inf ? 0.f : m; }

// Natural-log LSE of a finished row: ln(l) + m ln 2, or -inf for a row that saw no key.
KVTILE_HOST_DEVICE KVTILE_FORCEINLINE float lse_of(float m, float l) {
  if (m == neg_inf || !(l > 0.f)) return neg_inf;
#if KVTILE_IS_DEVICE_PASS
  return (m + log2f(l)) * ln2;
#else
  return (m + std::log2(l)) * ln2;
#endif
}

template <int N>
struct softmax_state {
  static_assert(N >= 1, "softmax_state needs at least one accumulator element");
  float o[N];
  float m;
  float l;

  KVTILE_HOST_DEVICE KVTILE_FORCEINLINE void init() {
    KVTILE_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) o[i] = 0.f;
    m = neg_inf;
    l = 0.f;
  }

  // Begin absorbing a tile whose (scaled, base-2) row max is tile_max: rescale o and l onto the
  // new running max. Returns the value to subtract from the tile's scores before exp2.
  KVTILE_HOST_DEVICE KVTILE_FORCEINLINE float enter_tile(float tile_max) {
    const float m_new = max_f(m, tile_max);
    const float a = rescale_factor(m, m_new);
    KVTILE_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) o[i] *= a;
    l *= a;
    m = m_new;
    return exp_base(m_new);
  }

  // Fold another partial state of the same row (other keys) into this one.
  KVTILE_HOST_DEVICE KVTILE_FORCEINLINE void merge(const softmax_state& b) {
    const float m_new = max_f(m, b.m);
    const float sa = rescale_factor(m, m_new);
    const float sb = rescale_factor(b.m, m_new);
    KVTILE_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) o[i] = sa * o[i] + sb * b.o[i];
    l = sa * l + sb * b.l;
    m = m_new;
  }

  // 1 / l, or 0 for a row that saw no key (its output is all zeros, not NaN).
  KVTILE_HOST_DEVICE KVTILE_FORCEINLINE float inv_l() const { return l > 0.f ? 1.f / l : 0.f; }

  KVTILE_HOST_DEVICE KVTILE_FORCEINLINE void normalize() {
    const float r = inv_l();
    KVTILE_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) o[i] *= r;
  }

  KVTILE_HOST_DEVICE KVTILE_FORCEINLINE float lse() const { return lse_of(m, l); }
};

// The row statistics (m, l) of the online softmax, apart from any accumulator: for mainloops
// whose accumulator lives in MMA fragments, in their own register layout, and is rescaled there,
// possibly later than the statistics (after an asynchronous P V of the previous tile landed).
// softmax_state above is the same arithmetic with the accumulator slice beside it.
struct softmax_row_stats {
  float m;
  float l;

  KVTILE_HOST_DEVICE KVTILE_FORCEINLINE void init() {
    m = neg_inf;
    l = 0.f;
  }
  // Begin a tile whose (scaled, base-2) row max is tile_max: m moves to the new running max and
  // l onto it. Returns the factor the accumulator must be multiplied by; `base` is the value to
  // subtract from the tile's scores before exp2.
  KVTILE_HOST_DEVICE KVTILE_FORCEINLINE float enter_tile(float tile_max, float& base) {
    const float m_new = max_f(m, tile_max);
    const float a = rescale_factor(m, m_new);
    l *= a;
    m = m_new;
    base = exp_base(m_new);
    return a;
  }
  KVTILE_HOST_DEVICE KVTILE_FORCEINLINE float inv_l() const { return l > 0.f ? 1.f / l : 0.f; }
  KVTILE_HOST_DEVICE KVTILE_FORCEINLINE float lse() const { return lse_of(m, l); }
};

// Merging finished (normalised) states, as split-KV partitions and cascade levels produce:
// each input is an output row o (already divided by its l) and its natural-log LSE.
//   lse = ln(e^lse_a + e^lse_b),  o = (e^(lse_a - lse) o_a + e^(lse_b - lse) o_b)
// The weights are computed once per row by merge_weights; two empty rows (-inf, -inf) give
// weights (0, 0) and lse -inf, so the merged row is zeros.
struct merge_weights {
  float wa, wb, lse;
};

KVTILE_HOST_DEVICE KVTILE_FORCEINLINE merge_weights merge_lse(float lse_a, float lse_b) {
  const float m = max_f(lse_a, lse_b);
  if (m == neg_inf) return {0.f, 0.f, neg_inf};
  const float ea = exp2_approx((lse_a - m) * log2e);
  const float eb = exp2_approx((lse_b - m) * log2e);
  const float s = ea + eb;
#if KVTILE_IS_DEVICE_PASS
  const float lse = m + __logf(s);
#else
  const float lse = m + std::log(s);
#endif
  return {ea / s, eb / s, lse};
}

}  // namespace attention
KVTILE_NAMESPACE_END
