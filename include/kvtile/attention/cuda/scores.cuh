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
#include <utility>

#include "kvtile/attention/cuda/arch/mma.cuh"
#include "kvtile/attention/cuda/smem_tile.cuh"
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
//
// What a key costs is the angle's cosine and sine more than the rotation (two packed
// instructions per register, below): the multi-function unit does a quarter of the FMA rate.
// So per pair a thread reads its frequency
// from a table built once per work item (not an exp2 per key), takes the exact cosine and sine
// only for key g of a K fragment, and derives key g + 8's (8 positions on) by one complex
// multiply with the table's cosine and sine of 8 x the frequency. Every key g is exact, so no
// error accumulates from tile to tile; key g + 8 adds the rounding of one multiply.

// A pair's entry of the table, one 16-byte load: x the frequency theta^(-2p/R) (rotary_inv_freq,
// as on the CPU), y and z the cosine and sine of 8 x it; w unused.
using rotary_pair_entry = float4;

// The CTA's table, R / 2 <= D / 2 entries, in static shared memory of its own (the kernels'
// dynamic layouts do not change; 1 KB at D = 128).
template <int D>
KVTILE_DEVICE KVTILE_FORCEINLINE rotary_pair_entry* rotary_table() {
  static __shared__ rotary_pair_entry table[D / 2];
  return table;
}

// cos and sin of the angle pos * freq: the fp32 product as on the CPU (rotary_cos_sin), a
// two-constant reduction to [-pi, pi] and the hardware sine and cosine, whose error there is
// about 2^-21 (the angle's own fp32 rounding, ~ulp(pos * freq), is what every backend has). The
// nearest multiple of 2 pi is rounded by adding 1.5 * 2^23 (exact below 2^22 turns, i.e. for
// every position an int converted to float keeps): two FMA-unit operations, where rintf would
// take the slower conversion unit.
KVTILE_DEVICE KVTILE_FORCEINLINE void rotary_cos_sin_fast(float pos, float freq, float& cs, float& sn) {
  constexpr float round_bias = 12582912.f;  // 1.5 * 2^23
  const float angle = pos * freq;
  const float k = fmaf(angle, 0.15915494309189535f, round_bias) - round_bias;  // rint(angle / (2 pi))
  float r = fmaf(-k, 6.28318548202514648f, angle);                            // 2 pi, high part (fp32)
  r = fmaf(-k, -1.7484555314695172e-7f, r);                                   // 2 pi - high part
  __sincosf(r, &sn, &cs);
}

// Fills the table for a work item's variant, over threads [0, nt); the caller's next barrier
// makes it visible, and no thread may still read the previous item's entries. Nothing for
// other variants.
template <int D, class Variant>
KVTILE_DEVICE KVTILE_FORCEINLINE void fill_rotary_table(const Variant& v, int tid, int nt) {
  if constexpr (has_rotary<Variant>) {
    rotary_pair_entry* t = rotary_table<D>();
    const int R = v.rotary_dims(D);
    for (int p = tid; p < R / 2; p += nt) {
      const float f = rotary_inv_freq(p, R, v.rotary_theta());
      float c8, s8;
      rotary_cos_sin_fast(8.f, f, c8, s8);
      t[p] = make_float4(f, c8, s8, 0.f);
    }
  } else {
    (void)v, (void)tid, (void)nt;
  }
}

// Rotates rows [0, rows) of a padded shared tile (padded_tile<D>) in place, row r at position(r), over threads [0, nt); nothing for other variants. For kernels
// whose warps all read the same K tile (the 32-row paged append): rotating the tile once costs
// a quarter of the sines that four warps rotating their own fragments would. The table must be
// filled and the tile visible (a barrier) before; a barrier after makes the rotation visible.
template <class T, int D, class Variant, class Position>
KVTILE_DEVICE KVTILE_FORCEINLINE void rotate_tile_rows(T* tile, int rows, const Variant& v, Position&& position, int tid,
                                                       int nt) {
  if constexpr (has_rotary<Variant>) {
    constexpr rotary_layout L = Variant::rotary_layout_v;
    const rotary_pair_entry* table = rotary_table<D>();
    const int r_dims = v.rotary_dims(D), pairs = r_dims / 2;
    for (int idx = tid; idx < rows * pairs; idx += nt) {
      const int r = idx / pairs, k = idx % pairs;
      T* row = tile + padded_tile<D>::at(r, 0);
      T& a = row[rotary_pair_first<L>(k, r_dims)];
      T& b = row[rotary_pair_second<L>(k, r_dims)];
      float x0 = float(a), x1 = float(b), cs, sn;
      rotary_cos_sin_fast(float(position(r)), table[k].x, cs, sn);
      rotary_rotate_pair(x0, x1, cs, sn);
      a = T(x0);
      b = T(x1);
    }
  } else {
    (void)tile, (void)rows, (void)v, (void)position, (void)tid, (void)nt;
  }
}

// Whether key j of V sits at position j (rotary<>'s key_position, not hidden by a derived
// variant): then keys g and g + 8 of a fragment are 8 positions apart and key g + 8 takes the
// table's step. Otherwise both keys get their exact angle.
template <class V>
concept rotary_keys_consecutive = requires { typename V::rotary_base; } &&
                                  std::is_same_v<decltype(&V::key_position), int (V::rotary_base::*)(int) const>;

// Calls f(std::integral_constant<int, HS>{}) for HS = R / 32 in [1, D / 32]: the rotary dims
// as a compile-time value, so a half-split pair's partner k-step (kk + HS) is a constant and
// no register array is indexed at run time (which would put the fragments in local memory).
// One uniform branch per call; the code of the fragments' rotation exists once per HS.
template <int D, class F>
KVTILE_DEVICE KVTILE_FORCEINLINE void with_rotary_steps(int rotary_dims, F&& f) {
  const int hs = rotary_dims / 32;
  [&]<int... I>(std::integer_sequence<int, I...>) {
    (void)((hs == I + 1 ? (f(std::integral_constant<int, I + 1>{}), true) : false) || ...);
  }(std::make_integer_sequence<int, D / 32>{});
}

// The K side (warp_rows::scores). A B fragment's registers: k0 key g cols +0, k1 key g cols +8,
// k2 key g+8 cols +0, k3 key g+8 cols +8. key_cos_sin gives one pair's cosine and sine at key g
// and key g + 8 from the pair's table entry t; pos_g, pos_g8: the keys' positions (pos_g8 read
// only when they are not consecutive). The angles are fp32; the rotation itself runs in T's
// packed arithmetic (arch::rotate2, arch::rotate_halves): a key costs its angles and two packed
// instructions per register instead of unpacking, four FMAs and packing per pair
// (docs/perf-log/composed.md, step 11).
template <bool Consecutive>
KVTILE_DEVICE KVTILE_FORCEINLINE void key_cos_sin(const rotary_pair_entry& t, float pos_g, float pos_g8, float (&cs)[2],
                                                  float (&sn)[2]) {
  rotary_cos_sin_fast(pos_g, t.x, cs[0], sn[0]);
  if constexpr (Consecutive) {
    (void)pos_g8;
    cs[1] = cs[0] * t.y - sn[0] * t.z;  // angle + 8 freq
    sn[1] = sn[0] * t.y + cs[0] * t.z;
  } else {
    rotary_cos_sin_fast(pos_g8, t.x, cs[1], sn[1]);
  }
}

// Rotates the interleaved pairs of one K fragment kf (one k-step, first pair index p0 = kk * 8 +
// tq): register h (and 2 + h for key g + 8) holds pair p0 + 4h in its two halves.
template <class T, bool Consecutive>
KVTILE_DEVICE KVTILE_FORCEINLINE void rotate_k_interleaved(std::uint32_t (&kf)[4], const rotary_pair_entry* table, int p0,
                                                           float pos_g, float pos_g8) {
  KVTILE_PRAGMA_UNROLL
  for (int h = 0; h < 2; ++h) {
    float cs[2], sn[2];
    key_cos_sin<Consecutive>(table[p0 + 4 * h], pos_g, pos_g8, cs, sn);
    KVTILE_PRAGMA_UNROLL
    for (int key = 0; key < 2; ++key)
      arch::rotate_halves<T>(kf[2 * key + h], arch::pack2<T>(cs[key], cs[key]), arch::pack2<T>(-sn[key], sn[key]));
  }
}

// Rotates the half-split pairs of two K fragments: lo the first halves (columns from p0 = kk *
// 16 + 2tq), hi the partners R/2 columns on, element-wise: register h holds pairs p0 + 8h and
// p0 + 8h + 1 in its two halves.
template <class T, bool Consecutive>
KVTILE_DEVICE KVTILE_FORCEINLINE void rotate_k_half_split(std::uint32_t (&lo)[4], std::uint32_t (&hi)[4],
                                                          const rotary_pair_entry* table, int p0, float pos_g, float pos_g8) {
  KVTILE_PRAGMA_UNROLL
  for (int h = 0; h < 2; ++h) {
    float c0[2], s0[2], c1[2], s1[2];  // pairs p0 + 8h and p0 + 8h + 1, at keys g and g + 8
    key_cos_sin<Consecutive>(table[p0 + 8 * h], pos_g, pos_g8, c0, s0);
    key_cos_sin<Consecutive>(table[p0 + 8 * h + 1], pos_g, pos_g8, c1, s1);
    KVTILE_PRAGMA_UNROLL
    for (int key = 0; key < 2; ++key)
      arch::rotate2<T>(lo[2 * key + h], hi[2 * key + h], arch::pack2<T>(c0[key], c1[key]), arch::pack2<T>(s0[key], s1[key]));
  }
}

// Rotates Q's A fragments q[D/16][4] over R = 32 HS dims at the rows' positions pos[2]: a0 row g
// cols +0, a1 row g+8 cols +0, a2 row g cols +8, a3 row g+8 cols +8. Once per work item; both
// rows exact (their positions need not be 8 apart).
template <class T, int D, int HS, rotary_layout Layout>
KVTILE_DEVICE KVTILE_FORCEINLINE void rotate_q_fragments(std::uint32_t (&q)[D / 16][4], const int (&pos)[2], int tq) {
  const rotary_pair_entry* table = rotary_table<D>();
  const float pf[2] = {float(pos[0]), float(pos[1])};
  KVTILE_PRAGMA_UNROLL
  for (int r = 0; r < 4; ++r) {
    const int row = r % 2, h = r / 2;
    if constexpr (Layout == rotary_layout::interleaved) {
      KVTILE_PRAGMA_UNROLL
      for (int kk = 0; kk < 2 * HS; ++kk) {
        float cs, sn;
        rotary_cos_sin_fast(pf[row], table[kk * 8 + 4 * h + tq].x, cs, sn);
        float2 a = arch::unpack2<T>(q[kk][r]);
        rotary_rotate_pair(a.x, a.y, cs, sn);
        q[kk][r] = arch::pack2<T>(a.x, a.y);
      }
    } else {
      KVTILE_PRAGMA_UNROLL
      for (int kk = 0; kk < HS; ++kk) {
        const int p = kk * 16 + 8 * h + 2 * tq;
        float2 x = arch::unpack2<T>(q[kk][r]), y = arch::unpack2<T>(q[kk + HS][r]);
        float cs, sn;
        rotary_cos_sin_fast(pf[row], table[p].x, cs, sn);
        rotary_rotate_pair(x.x, y.x, cs, sn);
        rotary_cos_sin_fast(pf[row], table[p + 1].x, cs, sn);
        rotary_rotate_pair(x.y, y.y, cs, sn);
        q[kk][r] = arch::pack2<T>(x.x, x.y);
        q[kk + HS][r] = arch::pack2<T>(y.x, y.y);
      }
    }
  }
}

// What the CUDA kernels take of a variant: masks and logit transforms everywhere; rotary on the
// mma.sync kernels (the 16-row paged kernels rotate Q and K fragments in registers, above; the
// 32-row paged append and the dense prefill kernel rotate their Q and K tiles in shared memory,
// rotate_tile_rows), with rotary_dim a multiple of 32. The sm_90a prefill and append kernels do
// not rotate: cuda::prefill's dispatch and the paged planner take the mma.sync ones and say why.

// Run-time check of a rotary variant's parameters against the paged kernels' rule.
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
