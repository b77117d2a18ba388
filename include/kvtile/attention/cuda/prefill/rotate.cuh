// kvtile/attention/cuda/prefill/rotate.cuh: Q and K rotated once at a rotary variant's positions,
// into a workspace, so that a prefill kernel without the rotation (the sm_90a one on Hopper)
// runs over them (cuda::prefill's rotate-once path).
//
// One launch for both: grid z = 0 rotates Q's rows at query positions, z = 1 K's at key
// positions; grid y is the sequence. A row (token, head) is cut into 16-byte tasks, so every
// load and store is a full vector (a thread takes rotate_tasks_per_thread of them, all loaded
// before any is computed):
//   half-split  task c < R / 16: elements [8c, 8c + 8) and their partners [R/2 + 8c, + 8) --
//               eight pairs from two loads;
//   interleaved task c < R / 8: elements [8c, 8c + 8), four pairs (2k, 2k + 1);
//   then one task per 8 elements of [R, D), copied as they are.
// Each pair is rotated with the backends' one formula (fp32 angle float(pos) * inv_freq,
// rotary_rotate_pair), the cosine and sine as the decode kernels take them (scores.cuh,
// rotary_cos_sin_fast: the angle reduced to [-pi, pi] by two FMAs, then the hardware sine and
// cosine, ~2^-21 from the accurate ones; an accurate sincosf costs ~40 instructions a pair
// and bound the pass by issue), the frequencies from a table the CTA fills once
// (rotary_inv_freq). Positions come from the variant, built per sequence as the kernels build
// it (Variant(params, q_len, kv_len)). Each key is rotated once for the whole
// prefill instead of once per CTA that reads it.
// Needs what cuda::prefill's check asks: 16-byte aligned data, strides multiples of 8 elements,
// D and R multiples of 16 and 32 (check_cuda_rotary).
// The same pass with Inverse rotates back (R(p)^T: the sine negated), in place where the
// destination is the source (each thread loads its tasks before it stores them, and no two
// tasks share an element): cuda::backward turns the gradients of rotated Q and K into those of
// Q and K this way.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "kvtile/attention/cuda/scores.cuh"
#include "kvtile/attention/dense_view.hpp"
#include "kvtile/attention/variant.hpp"
#include "kvtile/core/config.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda::detail {

inline constexpr int rotate_threads = 256;          // threads per CTA
inline constexpr int rotate_tasks_per_thread = 4;   // 16-byte tasks a thread, loaded at once
inline constexpr int rotate_items_per_cta = rotate_threads * rotate_tasks_per_thread;

// Tasks of one row: the rotated chunks, then the copied ones.
template <rotary_layout L>
KVTILE_HOST_DEVICE KVTILE_FORCEINLINE int rotate_rotated_tasks(int r) {
  return L == rotary_layout::half_split ? r / 16 : r / 8;
}
template <int D, rotary_layout L>
KVTILE_HOST_DEVICE KVTILE_FORCEINLINE int rotate_row_tasks(int r) {
  return rotate_rotated_tasks<L>(r) + (D - r) / 8;
}

// The first pair of a rotated task whose first element is `first`: half-split pairs (k, k + R/2)
// start at k = first, interleaved ones (2k, 2k + 1) at k = first / 2.
template <rotary_layout L>
KVTILE_HOST_DEVICE KVTILE_FORCEINLINE int rotate_first_pair(int first) {
  return L == rotary_layout::half_split ? first : first / 2;
}

// One side's rows: what is read and written (a sequence's rows come from the layouts).
template <class T>
struct rotate_side {
  dense_tensor<const T> src;
  dense_tensor<T> dst;
};

// One 16-byte task, loaded: where it goes, and its one or two vectors (half-split rotated
// tasks carry the partner vector R / 2 on).
template <class T>
struct rotate_task {
  T* out = nullptr;
  int first = 0, pos = 0;  // first element; the row's position
  bool rotate = false, valid = false;
  uint4 lo{}, hi{};
};

// One side's part of the CTA's work: tasks [blockIdx.x * rotate_items_per_cta, + that) of
// sequence blockIdx.y of `side` (K at key positions when Keys, else Q at query positions), a
// thread's rotate_tasks_per_thread tasks rotate_threads apart. Every load is issued before the
// CTA builds its frequency table (the barrier), so the bytes are in flight while it does.
// q_layout / kv_layout give the sequence's lengths (device indptr for varlen ones). The side is
// a kernel parameter chosen by a compile-time branch, never by a run-time reference (which
// would copy the parameters into local memory in every thread).
template <class T, int D, class Variant, bool Keys, bool Inverse>
KVTILE_DEVICE KVTILE_FORCEINLINE void rotate_side_rows(const rotate_side<T>& side, const ragged_layout& q_layout,
                                                       const ragged_layout& kv_layout, const typename Variant::params& vp) {
  static_assert(has_rotary<Variant>, "rotate_rows: the variant has no rotary embedding");
  static_assert(sizeof(T) == 2 && D % 16 == 0, "rotate_rows: 2-byte elements, head_dim a multiple of 16");
  constexpr rotary_layout L = Variant::rotary_layout_v;
  constexpr int U = rotate_tasks_per_thread;
  static __shared__ float inv_freq[D / 2];
  const int b = int(blockIdx.y);
  const int q_len = q_layout.len_of(b), kv_len = kv_layout.len_of(b);
  const Variant v(vp, q_len, kv_len);
  const int r = v.rotary_dims(D);
  const int len = Keys ? kv_len : q_len, heads = side.src.layout.heads;
  const int tasks = rotate_row_tasks<D, L>(r), rotated = rotate_rotated_tasks<L>(r);
  const std::int64_t items = std::int64_t(len) * heads * tasks, first = std::int64_t(blockIdx.x) * rotate_items_per_cta;
  if (first >= items) return;  // the whole CTA: past this side's rows (before the barrier)

  rotate_task<T> w[U];
  KVTILE_PRAGMA_UNROLL
  for (int u = 0; u < U; ++u) {
    const std::int64_t item = first + std::int64_t(u) * rotate_threads + threadIdx.x;
    if (item >= items) continue;
    const std::int64_t row = item / tasks;
    const int task = int(item % tasks);
    const int t = int(row / heads), h = int(row % heads);
    const T* in = side.src.at(b, t, h);
    rotate_task<T>& x = w[u];
    x.valid = true;
    x.out = side.dst.at(b, t, h);
    x.rotate = task < rotated;
    x.first = x.rotate ? 8 * task : r + 8 * (task - rotated);  // copied: dims [R, D) as they are
    x.lo = *reinterpret_cast<const uint4*>(in + x.first);
    if (x.rotate) {
      x.pos = Keys ? v.key_position(t) : v.query_position(t);
      if constexpr (L == rotary_layout::half_split) x.hi = *reinterpret_cast<const uint4*>(in + x.first + r / 2);
    }
  }
  for (int i = int(threadIdx.x); i < r / 2; i += int(blockDim.x)) inv_freq[i] = rotary_inv_freq(i, r, v.rotary_theta());
  __syncthreads();

  // Eight elements of a 16-byte vector, as values, and back.
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
  KVTILE_PRAGMA_UNROLL
  for (int u = 0; u < U; ++u) {
    const rotate_task<T>& x = w[u];
    if (!x.valid) continue;
    if (!x.rotate) {
      *reinterpret_cast<uint4*>(x.out + x.first) = x.lo;
      continue;
    }
    const float pos = float(x.pos);
    if constexpr (L == rotary_layout::half_split) {  // pairs k = first + j: (k, k + R/2)
      float x0[8], x1[8];
      unpack(x.lo, x0);
      unpack(x.hi, x1);
      KVTILE_PRAGMA_UNROLL
      for (int j = 0; j < 8; ++j) {
        float c, s;
        rotary_cos_sin_fast(pos, inv_freq[x.first + j], c, s);
        rotary_rotate_pair(x0[j], x1[j], c, Inverse ? -s : s);
      }
      *reinterpret_cast<uint4*>(x.out + x.first) = pack(x0);
      *reinterpret_cast<uint4*>(x.out + x.first + r / 2) = pack(x1);
    } else {  // pairs k = first / 2 + j: (2k, 2k + 1)
      float e[8];
      unpack(x.lo, e);
      KVTILE_PRAGMA_UNROLL
      for (int j = 0; j < 4; ++j) {
        float c, s;
        rotary_cos_sin_fast(pos, inv_freq[x.first / 2 + j], c, s);
        rotary_rotate_pair(e[2 * j], e[2 * j + 1], c, Inverse ? -s : s);
      }
      *reinterpret_cast<uint4*>(x.out + x.first) = pack(e);
    }
  }
}

// The CTA's work (the kernel below is it): side blockIdx.z (0: Q, 1: K).
template <class T, int D, class Variant, bool Inverse = false>
KVTILE_DEVICE KVTILE_FORCEINLINE void rotate_rows_cta(const rotate_side<T>& q, const rotate_side<T>& k,
                                                      const ragged_layout& q_layout, const ragged_layout& kv_layout,
                                                      const typename Variant::params& vp) {
  if (blockIdx.z == 1)
    rotate_side_rows<T, D, Variant, true, Inverse>(k, q_layout, kv_layout, vp);
  else
    rotate_side_rows<T, D, Variant, false, Inverse>(q, q_layout, kv_layout, vp);
}

template <class T, int D, class Variant, bool Inverse = false>
KVTILE_KERNEL void __launch_bounds__(rotate_threads)
    rotate_rows_kernel(rotate_side<T> q, rotate_side<T> k, ragged_layout q_layout, ragged_layout kv_layout,
                       typename Variant::params vp) {
  rotate_rows_cta<T, D, Variant, Inverse>(q, k, q_layout, kv_layout, vp);
}

// Grid of rotate_rows_kernel: per sequence (y) and side (z), enough CTAs for the longer side's
// bound of rows (tokens x heads of its longest sequence) at `tasks` tasks a row
// (rotate_row_tasks of the variant's rotary dims, which depend on its parameters alone); the
// CTAs past a side's own rows return at once.
inline dim3 rotate_rows_grid(std::int64_t q_rows_bound, std::int64_t k_rows_bound, int tasks, std::int32_t batch) {
  const std::int64_t items = (q_rows_bound > k_rows_bound ? q_rows_bound : k_rows_bound) * tasks;
  return dim3(unsigned((items + rotate_items_per_cta - 1) / rotate_items_per_cta), unsigned(batch), 2u);
}


// Elements spanned by a layout's rows (tokens [0, rows) of every sequence, every head) from its
// base: the size of a copy that keeps the layout's strides. rows: per sequence for a fixed
// layout, in all for a varlen one.
inline std::int64_t layout_extent(const ragged_layout& l, std::int64_t rows) {
  if (l.batch == 0 || rows == 0 || l.heads == 0) return 0;
  const std::int64_t last_batch = l.indptr ? 0 : std::int64_t(l.batch - 1) * l.stride_batch;
  return last_batch + (rows - 1) * l.stride_token + std::int64_t(l.heads - 1) * l.stride_head + l.head_dim;
}

// Bytes (a multiple of 256) of a copy of l's rows with l's strides: len_bound tokens a sequence
// (fixed: its length; varlen: at most batch * len_bound rows in all).
template <class T>
std::size_t rotated_rows_bytes(const ragged_layout& l, std::int64_t len_bound) {
  const std::int64_t elems = layout_extent(l, l.indptr ? l.batch * len_bound : len_bound);
  return std::size_t((elems * std::int64_t(sizeof(T)) + 255) / 256 * 256);
}

}  // namespace attention::cuda::detail
KVTILE_NAMESPACE_END
