// kvtile/attention/cuda/scores.cuh: a variant's transforms on a tile of scores, for every CUDA
// mainloop (attention/variant.hpp says what a variant is).
//
// Mainloops keep raw scores q.k in the m16n8 accumulator fragments and fold the softmax scale
// into their exp2 (one FFMA per weight). A variant with a logit transform needs the scaled
// score first, so apply_logits() turns every score of the fragments into the transformed score
// in the base-2 domain, and softmax_scale_log2() tells the mainloop that the scale is now 1.
// For a plain mask both compile to nothing and the mainloop is what it was.
#pragma once

#include <cstdint>
#include <type_traits>

#include "kvtile/attention/cuda/arch/mma.cuh"
#include "kvtile/attention/variant.hpp"
#include "kvtile/core/error.hpp"
#include "kvtile/core/config.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda {

// The scale a mainloop applies inside exp2 after apply_logits.
template <class Variant>
KVTILE_HOST_DEVICE KVTILE_FORCEINLINE constexpr float softmax_scale_log2(float scale_log2) {
  return has_logit_transform<Variant> ? 1.f : scale_log2;
}

// Raw scores (any array of floats, nested as the fragments are) -> the variant's transformed,
// scaled, base-2 scores. Masked scores are set to -inf after this, by the mainloop.
template <class Variant, class A>
KVTILE_DEVICE KVTILE_FORCEINLINE void apply_logits(const Variant& v, A& s, float scale_log2) {
  if constexpr (has_logit_transform<Variant>) {
    if constexpr (std::is_array_v<A>) {
      KVTILE_PRAGMA_UNROLL
      for (int i = 0; i < int(std::extent_v<A>); ++i) apply_logits(v, s[i], scale_log2);
    } else {
      s = apply_logit_base2(v, s * scale_log2);
    }
  } else {
    (void)v, (void)s, (void)scale_log2;
  }
}

// ---- rotary variants on mma fragments --------------------------------------------------------
//
// The m16n8k16 fragments hold 16-bit pairs of adjacent columns: a thread (lane = 4g + tq) holds,
// per 16-column k-step kk, columns kk*16 + 2tq + {0, 1} and kk*16 + 8 + 2tq + {0, 1} of two rows.
// A rotary pair is then always in one thread: interleaved pairs (2p, 2p + 1) are the two halves
// of one register; half-split pairs (d, d + R/2) sit in the same register slot of k-steps kk and
// kk + R/32 (R a multiple of 32). So Q and K fragments are rotated in registers, where the
// mainloop holds them anyway: no extra shared-memory pass, no barrier.

// cos and sin of pair p's angle at position pos: inv_freq = theta^(-2p/R) as exp2(p * c) with
// c = -2 log2(theta) / R, the fp32 product pos * inv_freq as on the CPU (rotary_cos_sin), then a
// two-constant reduction to [-pi, pi] and the hardware sine and cosine, whose error there is
// about 2^-21 (the angle's own fp32 rounding, ~ulp(pos * inv_freq), is what every backend has).
KVTILE_DEVICE KVTILE_FORCEINLINE void rotary_cos_sin_fast(int pos, int pair, float c, float& cs, float& sn) {
  const float angle = float(pos) * exp2f(float(pair) * c);
  const float k = rintf(angle * 0.15915494309189535f);  // 1 / (2 pi)
  float r = fmaf(-k, 6.28318548202514648f, angle);       // 2 pi, high part (fp32)
  r = fmaf(-k, -1.7484555314695172e-7f, r);              // 2 pi - high part
  __sincosf(r, &sn, &cs);
}

// The constant c of rotary_cos_sin_fast for a variant.
template <class Variant>
KVTILE_DEVICE KVTILE_FORCEINLINE float rotary_log2_step(const Variant& v, int rotary_dims) {
  return -2.f * log2f(v.rotary_theta()) / float(rotary_dims);
}

// Rotates one 16-bit pair register (x: column `col`, y: its partner) in place; lo/hi are two
// registers holding partners element-wise (half-split) or lo == hi (interleaved, both halves).
template <class T>
KVTILE_DEVICE KVTILE_FORCEINLINE void rotate_pair_regs(std::uint32_t& lo, std::uint32_t& hi, int pos, int pair0, float c,
                                                       bool interleaved) {
  const float2 a = arch::unpack2<T>(lo);
  if (interleaved) {
    float cs, sn;
    rotary_cos_sin_fast(pos, pair0, c, cs, sn);
    float x = a.x, y = a.y;
    rotary_rotate_pair(x, y, cs, sn);
    lo = arch::pack2<T>(x, y);
  } else {
    const float2 b = arch::unpack2<T>(hi);
    float x0 = a.x, y0 = b.x, x1 = a.y, y1 = b.y;
    float cs, sn;
    rotary_cos_sin_fast(pos, pair0, c, cs, sn);
    rotary_rotate_pair(x0, y0, cs, sn);
    rotary_cos_sin_fast(pos, pair0 + 1, c, cs, sn);
    rotary_rotate_pair(x1, y1, cs, sn);
    lo = arch::pack2<T>(x0, x1);
    hi = arch::pack2<T>(y0, y1);
  }
}

// Rotates fragments f[kk][4] of D columns in place. reg_row(r) says which of the thread's two
// rows register r holds (0 or 1), reg_col(r) its 8-column offset in the k-step (0 or 8); pos[2]
// are the rows' positions. FullDims: rotary_dims == D, so every partner index is known at
// compile time (the common case); otherwise the partner k-step is selected at run time.
template <class T, int D, bool FullDims, class Variant, class RegRow, class RegCol>
KVTILE_DEVICE KVTILE_FORCEINLINE void rotate_fragments_as(const Variant& v, std::uint32_t (&f)[D / 16][4],
                                                          const int (&pos)[2], int tq, RegRow reg_row, RegCol reg_col) {
  const int R = FullDims ? D : v.rotary_dims(D);
  const float c = rotary_log2_step(v, R);
  constexpr bool interleaved = Variant::rotary_layout_v == rotary_layout::interleaved;
  const int half_steps = FullDims ? D / 32 : R / 32;  // k-steps between a half-split pair's columns
  KVTILE_PRAGMA_UNROLL
  for (int kk = 0; kk < (interleaved ? D / 16 : D / 32); ++kk) {
    if (interleaved ? kk * 16 >= R : kk >= half_steps) continue;
    KVTILE_PRAGMA_UNROLL
    for (int r = 0; r < 4; ++r) {
      const int col = kk * 16 + reg_col(r) + 2 * tq;  // the register's first column
      if constexpr (interleaved) {
        rotate_pair_regs<T>(f[kk][r], f[kk][r], pos[reg_row(r)], col / 2, c, true);
      } else if constexpr (FullDims) {
        rotate_pair_regs<T>(f[kk][r], f[kk + D / 32][r], pos[reg_row(r)], col, c, false);
      } else {
        std::uint32_t partner = 0;
        KVTILE_PRAGMA_UNROLL
        for (int k2 = 0; k2 < D / 16; ++k2)
          if (k2 == kk + half_steps) partner = f[k2][r];
        rotate_pair_regs<T>(f[kk][r], partner, pos[reg_row(r)], col, c, false);
        KVTILE_PRAGMA_UNROLL
        for (int k2 = 0; k2 < D / 16; ++k2)
          if (k2 == kk + half_steps) f[k2][r] = partner;
      }
    }
  }
}

template <class T, int D, class Variant, class RegRow, class RegCol>
KVTILE_DEVICE KVTILE_FORCEINLINE void rotate_fragments(const Variant& v, std::uint32_t (&f)[D / 16][4], const int (&pos)[2],
                                                       int tq, RegRow reg_row, RegCol reg_col) {
  if (v.rotary_dims(D) == D)
    rotate_fragments_as<T, D, true>(v, f, pos, tq, reg_row, reg_col);
  else
    rotate_fragments_as<T, D, false>(v, f, pos, tq, reg_row, reg_col);
}

// What the CUDA kernels take of a variant: masks and logit transforms everywhere; rotary on the
// 16-row paged kernels (decode, fragments rotated in registers, above), with rotary_dim a
// multiple of 32. The prefill mainloops refuse rotary at compile time, and the paged planner
// refuses a rotary plan with a request of more than 16 packed query rows, until their K sources
// rotate keys as they load them.
template <class Variant>
inline constexpr bool cuda_variant_supported = !has_rotary<Variant>;

// Run-time check of a rotary variant's parameters against the decode kernels' rule.
template <class Variant>
void check_cuda_rotary(const typename Variant::params& p, int head_dim) {
  if constexpr (has_rotary<Variant>) {
    const int r = p.rotary_dim == 0 ? head_dim : p.rotary_dim;
    KVTILE_REQUIRE(r % 32 == 0, errc::unsupported, "the CUDA kernels rotate whole 16-column steps in pairs: rotary_dim ",
                   "must be 0 (all) or a multiple of 32, got ", p.rotary_dim);
  } else {
    (void)p, (void)head_dim;
  }
}

}  // namespace attention::cuda
KVTILE_NAMESPACE_END
