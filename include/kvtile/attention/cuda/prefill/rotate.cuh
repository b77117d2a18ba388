// kvtile/attention/cuda/prefill/rotate.cuh: Q and K rotated once at a rotary variant's positions,
// into a workspace, so that a prefill kernel without the rotation (the sm_90a one on Hopper)
// runs over them (cuda::prefill's rotate-once path).
//
// One launch for both: grid z = 0 rotates Q's rows at query positions, z = 1 K's at key
// positions; grid y is the sequence. A row (token, head) is cut into 16-byte tasks, one a
// thread, so every load and store is a full vector and a warp moves 512 bytes or more at once:
//   half-split  task c < R / 16: elements [8c, 8c + 8) and their partners [R/2 + 8c, + 8) --
//               eight pairs from two loads;
//   interleaved task c < R / 8: elements [8c, 8c + 8), four pairs (2k, 2k + 1);
//   then one task per 8 elements of [R, D), copied as they are.
// Each pair is rotated with the backends' one formula (rotary_cos_sin: fp32 angle float(pos) *
// inv_freq, an accurate sincosf; rotary_rotate_pair), the frequencies from a table the CTA
// fills once (rotary_inv_freq). Positions come from the variant, built per sequence as the
// kernels build it (Variant(params, q_len, kv_len)). Each key is rotated once for the whole
// prefill instead of once per CTA that reads it.
// Needs what cuda::prefill's check asks: 16-byte aligned data, strides multiples of 8 elements,
// D and R multiples of 16 and 32 (check_cuda_rotary).
#pragma once

#include <cstdint>
#include <cstring>

#include "kvtile/attention/dense_view.hpp"
#include "kvtile/attention/variant.hpp"
#include "kvtile/core/config.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda::detail {

inline constexpr int rotate_threads = 256;  // 16-byte tasks per CTA

// Tasks of one row: the rotated chunks, then the copied ones.
template <int D, rotary_layout L>
KVTILE_HOST_DEVICE KVTILE_FORCEINLINE int rotate_rotated_tasks(int r) {
  return L == rotary_layout::half_split ? r / 16 : r / 8;
}
template <int D, rotary_layout L>
KVTILE_HOST_DEVICE KVTILE_FORCEINLINE int rotate_row_tasks(int r) {
  return rotate_rotated_tasks<D, L>(r) + (D - r) / 8;
}

// One side's rows: what is read and written, and how many rows its longest sequence has (the
// grid's bound; a sequence's own rows come from the layouts).
template <class T>
struct rotate_side {
  dense_tensor<const T> src;
  dense_tensor<T> dst;
};

// One side's part of the CTA's work: tasks [blockIdx.x * rotate_threads, + rotate_threads) of
// sequence blockIdx.y of `side` (K at key positions when Keys, else Q at query positions).
// q_layout / kv_layout give the sequence's lengths (device indptr for varlen ones). The side is
// a kernel parameter chosen by a compile-time branch, never by a run-time reference (which
// would copy the parameters into local memory in every thread).
template <class T, int D, class Variant, bool Keys>
KVTILE_DEVICE KVTILE_FORCEINLINE void rotate_side_rows(const rotate_side<T>& side, const ragged_layout& q_layout,
                                                       const ragged_layout& kv_layout, const typename Variant::params& vp) {
  static_assert(has_rotary<Variant>, "rotate_rows: the variant has no rotary embedding");
  static_assert(sizeof(T) == 2 && D % 16 == 0, "rotate_rows: 2-byte elements, head_dim a multiple of 16");
  constexpr rotary_layout L = Variant::rotary_layout_v;
  static __shared__ float inv_freq[D / 2];
  const int b = int(blockIdx.y);
  const int q_len = q_layout.len_of(b), kv_len = kv_layout.len_of(b);
  const Variant v(vp, q_len, kv_len);
  const int r = v.rotary_dims(D);
  const int len = Keys ? kv_len : q_len, heads = side.src.layout.heads;
  const int tasks = rotate_row_tasks<D, L>(r), rotated = rotate_rotated_tasks<D, L>(r);
  const std::int64_t items = std::int64_t(len) * heads * tasks, first = std::int64_t(blockIdx.x) * rotate_threads;
  if (first >= items) return;  // the whole CTA: past this side's rows (before the barrier)
  for (int i = int(threadIdx.x); i < r / 2; i += int(blockDim.x)) inv_freq[i] = rotary_inv_freq(i, r, v.rotary_theta());
  __syncthreads();
  const std::int64_t item = first + threadIdx.x;
  if (item >= items) return;
  const std::int64_t row = item / tasks;
  const int task = int(item % tasks);
  const int t = int(row / heads), h = int(row % heads);
  const T* in = side.src.at(b, t, h);
  T* out = side.dst.at(b, t, h);
  if (task >= rotated) {  // dims [R, D): as they are
    const int x = r + 8 * (task - rotated);
    *reinterpret_cast<uint4*>(out + x) = *reinterpret_cast<const uint4*>(in + x);
    return;
  }
  const int pos = Keys ? v.key_position(t) : v.query_position(t);
  // Eight elements of a 16-byte vector, as values.
  auto unpack = [](const uint4& u, float (&f)[8]) {
    T e[8];
    std::memcpy(e, &u, sizeof(u));
    for (int j = 0; j < 8; ++j) f[j] = float(e[j]);
  };
  auto pack = [](const float (&f)[8]) {
    T e[8];
    for (int j = 0; j < 8; ++j) e[j] = T(f[j]);
    uint4 u;
    std::memcpy(&u, e, sizeof(u));
    return u;
  };
  if constexpr (L == rotary_layout::half_split) {
    const int i0 = 8 * task, i1 = r / 2 + 8 * task;  // pairs k = i0 + j: (k, k + R/2)
    float x0[8], x1[8];
    unpack(*reinterpret_cast<const uint4*>(in + i0), x0);
    unpack(*reinterpret_cast<const uint4*>(in + i1), x1);
    KVTILE_PRAGMA_UNROLL
    for (int j = 0; j < 8; ++j) {
      float c, s;
      rotary_cos_sin(pos, inv_freq[i0 + j], c, s);
      rotary_rotate_pair(x0[j], x1[j], c, s);
    }
    *reinterpret_cast<uint4*>(out + i0) = pack(x0);
    *reinterpret_cast<uint4*>(out + i1) = pack(x1);
  } else {
    const int i0 = 8 * task;  // pairs k = 4 task + j: (2k, 2k + 1)
    float x[8];
    unpack(*reinterpret_cast<const uint4*>(in + i0), x);
    KVTILE_PRAGMA_UNROLL
    for (int j = 0; j < 4; ++j) {
      float c, s;
      rotary_cos_sin(pos, inv_freq[4 * task + j], c, s);
      rotary_rotate_pair(x[2 * j], x[2 * j + 1], c, s);
    }
    *reinterpret_cast<uint4*>(out + i0) = pack(x);
  }
}

// The CTA's work (the kernel below is it): side blockIdx.z (0: Q, 1: K).
template <class T, int D, class Variant>
KVTILE_DEVICE KVTILE_FORCEINLINE void rotate_rows_cta(const rotate_side<T>& q, const rotate_side<T>& k,
                                                      const ragged_layout& q_layout, const ragged_layout& kv_layout,
                                                      const typename Variant::params& vp) {
  if (blockIdx.z == 1)
    rotate_side_rows<T, D, Variant, true>(k, q_layout, kv_layout, vp);
  else
    rotate_side_rows<T, D, Variant, false>(q, q_layout, kv_layout, vp);
}

template <class T, int D, class Variant>
KVTILE_KERNEL void __launch_bounds__(rotate_threads)
    rotate_rows_kernel(rotate_side<T> q, rotate_side<T> k, ragged_layout q_layout, ragged_layout kv_layout,
                       typename Variant::params vp) {
  rotate_rows_cta<T, D, Variant>(q, k, q_layout, kv_layout, vp);
}

// Grid of rotate_rows_kernel: per sequence (y) and side (z), enough CTAs for the longer side's
// bound of rows (tokens x heads of its longest sequence) at `tasks` tasks a row
// (rotate_row_tasks of the variant's rotary dims, which depend on its parameters alone); the
// CTAs past a side's own rows return at once.
inline dim3 rotate_rows_grid(std::int64_t q_rows_bound, std::int64_t k_rows_bound, int tasks, std::int32_t batch) {
  const std::int64_t items = (q_rows_bound > k_rows_bound ? q_rows_bound : k_rows_bound) * tasks;
  return dim3(unsigned((items + rotate_threads - 1) / rotate_threads), unsigned(batch), 2u);
}

}  // namespace attention::cuda::detail
KVTILE_NAMESPACE_END
