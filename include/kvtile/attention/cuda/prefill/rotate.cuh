// kvtile/attention/cuda/prefill/rotate.cuh: Q and K rotated once at a rotary variant's positions,
// into a workspace, so that a prefill kernel without the rotation (the sm_90a one on Hopper)
// runs over them (cuda::prefill's rotate-once path).
//
// One warp a row (sequence b, token t, head h): the lanes take the pairs k of dims [0, R), each
// rotated with the backends' one formula (rotary_cos_sin: fp32 angle float(pos) * inv_freq, an
// accurate sincosf; rotary_rotate_pair), and copy dims [R, D) as they are. Positions come from
// the variant, built per sequence as the kernels build it (Variant(params, q_len, kv_len)):
// query_position(t) for Q, key_position(t) for K. Each key is rotated once for the whole
// prefill instead of once per CTA that reads it.
#pragma once

#include <cstdint>

#include "kvtile/attention/dense_view.hpp"
#include "kvtile/attention/variant.hpp"
#include "kvtile/core/config.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda::detail {

inline constexpr int rotate_rows_warps = 4;  // warps (rows) per CTA

// The CTA's work (the kernel below is it): rows [blockIdx.x * warps, + warps) of sequence
// blockIdx.y, a row being (token, head) of `src`, rotated into the same row of `dst`. Keys:
// the rows are K's (key positions), else Q's (query positions). q_len / kv_len: of the
// sequence, from the layouts (device indptr for varlen ones).
template <class T, int D, class Variant, bool Keys>
KVTILE_DEVICE KVTILE_FORCEINLINE void rotate_rows_cta(dense_tensor<const T> src, dense_tensor<T> dst, ragged_layout q_layout,
                                                      ragged_layout kv_layout, typename Variant::params vp) {
  static_assert(has_rotary<Variant>, "rotate_rows: the variant has no rotary embedding");
  const int b = int(blockIdx.y);
  const int q_len = q_layout.len_of(b), kv_len = kv_layout.len_of(b);
  const int len = Keys ? kv_len : q_len, heads = src.layout.heads;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const std::int64_t row = std::int64_t(blockIdx.x) * rotate_rows_warps + warp;
  if (row >= std::int64_t(len) * heads) return;
  const int t = int(row / heads), h = int(row % heads);
  const Variant v(vp, q_len, kv_len);
  const int pos = Keys ? v.key_position(t) : v.query_position(t);
  const int r = v.rotary_dims(D);
  constexpr rotary_layout L = Variant::rotary_layout_v;
  const T* in = src.at(b, t, h);
  T* out = dst.at(b, t, h);
  for (int k = lane; k < r / 2; k += 32) {
    const int i0 = rotary_pair_first<L>(k, r), i1 = rotary_pair_second<L>(k, r);
    float x0 = float(in[i0]), x1 = float(in[i1]), c, s;
    rotary_cos_sin(pos, rotary_inv_freq(k, r, v.rotary_theta()), c, s);
    rotary_rotate_pair(x0, x1, c, s);
    out[i0] = T(x0);
    out[i1] = T(x1);
  }
  for (int x = r + lane; x < D; x += 32) out[x] = in[x];
}

template <class T, int D, class Variant, bool Keys>
KVTILE_KERNEL void __launch_bounds__(32 * rotate_rows_warps)
    rotate_rows_kernel(dense_tensor<const T> src, dense_tensor<T> dst, ragged_layout q_layout, ragged_layout kv_layout,
                       typename Variant::params vp) {
  rotate_rows_cta<T, D, Variant, Keys>(src, dst, q_layout, kv_layout, vp);
}

// Grid of rotate_rows_kernel over `rows_bound` rows (tokens x heads, at least those of the
// longest sequence) of each of `batch` sequences.
inline dim3 rotate_rows_grid(std::int64_t rows_bound, std::int32_t batch) {
  return dim3(unsigned((rows_bound + rotate_rows_warps - 1) / rotate_rows_warps), unsigned(batch));
}

}  // namespace attention::cuda::detail
KVTILE_NAMESPACE_END
