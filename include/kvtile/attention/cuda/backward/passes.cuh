// kvtile/attention/cuda/backward/passes.cuh: the element-wise passes around the backward's
// main kernel. Pre-pass, per (query row, head): Delta = dO . O (fp32), the LSE turned into the
// base-2 domain the kernels exponentiate in, and the fp32 dQ accumulator zeroed. Post-pass: dQ
// fp32 -> T, times the softmax scale.
// Both are pure streams of bytes, so what sets their speed is the bytes in flight: a row of a
// head is D / 8 16-byte chunks, taken by a group of lanes (D / 8 rounded up to a power of two,
// for the shuffle sum), so that a warp covers 32 / lanes rows at once, and each thread issues
// the loads of pass_unroll rows before it uses any (a warp per row, as these passes were first
// written, kept 128-256 bytes in flight per warp: 1.3 TB/s at D 64, perf-log backward v16).
#pragma once

#include <cstdint>
#include <limits>

#include <cuda_runtime.h>

#include "kvtile/attention/cuda/arch/mma.cuh"
#include "kvtile/attention/cuda/backward/params.cuh"
#include "kvtile/attention/softmax_state.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda::detail {

inline constexpr int backward_pass_warps = 8;
inline constexpr int backward_pass_unroll = 4;  // rows a lane group takes, their loads issued together

// The lanes of a row (D / 8 chunks rounded up to a power of two) and the rows of a CTA.
template <int D>
struct backward_pass_geometry {
  static constexpr int chunks = D / 8;
  static constexpr int lanes = chunks <= 2 ? 2 : chunks <= 4 ? 4 : chunks <= 8 ? 8 : chunks <= 16 ? 16 : 32;
  static_assert(chunks >= 1 && chunks <= 32 && D % 8 == 0, "backward passes: head_dim a multiple of 8, at most 256");
  static constexpr int rows_per_warp = 32 / lanes;
  static constexpr int rows_per_step = backward_pass_warps * rows_per_warp;  // a CTA's rows at once
  static constexpr int rows_per_cta = rows_per_step * backward_pass_unroll;
};

// (query tiles of rows_per_cta rows, qo_heads, batch).
template <int D>
dim3 backward_pass_grid(const ragged_layout& q, std::int32_t max_q_len) {
  constexpr int rows = backward_pass_geometry<D>::rows_per_cta;
  return dim3(unsigned((max_q_len + rows - 1) / rows), unsigned(q.heads), unsigned(q.batch));
}

// This thread's place in its CTA: the token of row slot u (u < backward_pass_unroll) and its
// chunk of that row (`sub`, valid below G::chunks).
template <int D>
struct backward_pass_lane {
  using G = backward_pass_geometry<D>;
  int sub, first;
  KVTILE_DEVICE KVTILE_FORCEINLINE backward_pass_lane() {
    const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
    sub = lane % G::lanes;
    first = int(blockIdx.x) * G::rows_per_cta + warp * G::rows_per_warp + lane / G::lanes;
  }
  KVTILE_DEVICE KVTILE_FORCEINLINE int token(int u) const { return first + u * G::rows_per_step; }
};

template <class T, int D, class Params>
KVTILE_KERNEL void __launch_bounds__(32 * backward_pass_warps) backward_prepass(const Params p) {
  using G = backward_pass_geometry<D>;
  constexpr int U = backward_pass_unroll;
  const int b = int(blockIdx.z), h = int(blockIdx.y);
  const int len = p.q_layout.len_of(b);
  const backward_pass_lane<D> me;
  uint4 x[U], y[U];
  KVTILE_PRAGMA_UNROLL
  for (int u = 0; u < U; ++u) {
    const int t = me.token(u);
    x[u] = y[u] = make_uint4(0u, 0u, 0u, 0u);
    if (t < len && me.sub < G::chunks) {
      x[u] = *reinterpret_cast<const uint4*>(p.o + p.o_layout.offset(b, t, h) + me.sub * 8);
      y[u] = *reinterpret_cast<const uint4*>(p.d_o + p.do_layout.offset(b, t, h) + me.sub * 8);
    }
  }
  KVTILE_PRAGMA_UNROLL
  for (int u = 0; u < U; ++u) {
    const int t = me.token(u);
    const std::uint32_t xs[4] = {x[u].x, x[u].y, x[u].z, x[u].w}, ys[4] = {y[u].x, y[u].y, y[u].z, y[u].w};
    float acc = 0.f;
    KVTILE_PRAGMA_UNROLL
    for (int i = 0; i < 4; ++i) {
      const float2 a = arch::unpack2<T>(xs[i]), d = arch::unpack2<T>(ys[i]);
      acc = fmaf(a.x, d.x, fmaf(a.y, d.y, acc));
    }
    KVTILE_PRAGMA_UNROLL
    for (int m = G::lanes / 2; m > 0; m /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, m);
    if (t >= len) continue;
    const std::int64_t row = p.q_layout.row(b, t);
    if (me.sub == 0) {
      const float l = p.lse[row * p.q_layout.heads + h];
      p.delta[std::int64_t(h) * p.ws_rows + row] = acc;
      p.lse2[std::int64_t(h) * p.ws_rows + row] = l == neg_inf ? std::numeric_limits<float>::infinity() : l * log2e;
    }
    if (p.dq_acc != nullptr && me.sub < G::chunks) {  // D fp32 = 2 chunks' worth of float4 a lane
      float4* a = reinterpret_cast<float4*>(p.dq_acc + (row * p.q_layout.heads + h) * D);
      a[me.sub] = make_float4(0.f, 0.f, 0.f, 0.f);
      a[me.sub + G::chunks] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
}

template <class T, int D, class Params>
KVTILE_KERNEL void __launch_bounds__(32 * backward_pass_warps) backward_postpass(const Params p) {
  using G = backward_pass_geometry<D>;
  constexpr int U = backward_pass_unroll;
  const int b = int(blockIdx.z), h = int(blockIdx.y);
  const int len = p.q_layout.len_of(b);
  const backward_pass_lane<D> me;
  if (me.sub >= G::chunks) return;
  float4 x[U], y[U];
  KVTILE_PRAGMA_UNROLL
  for (int u = 0; u < U; ++u) {
    const int t = me.token(u);
    x[u] = y[u] = make_float4(0.f, 0.f, 0.f, 0.f);
    if (t < len) {
      const float4* a = reinterpret_cast<const float4*>(p.dq_acc + (p.q_layout.row(b, t) * p.q_layout.heads + h) * D);
      x[u] = a[2 * me.sub];
      y[u] = a[2 * me.sub + 1];
    }
  }
  const float s = p.scale;
  KVTILE_PRAGMA_UNROLL
  for (int u = 0; u < U; ++u) {
    const int t = me.token(u);
    if (t >= len) continue;
    uint4 r;
    r.x = arch::pack2<T>(x[u].x * s, x[u].y * s);
    r.y = arch::pack2<T>(x[u].z * s, x[u].w * s);
    r.z = arch::pack2<T>(y[u].x * s, y[u].y * s);
    r.w = arch::pack2<T>(y[u].z * s, y[u].w * s);
    *reinterpret_cast<uint4*>(p.dq + p.dq_layout.offset(b, t, h) + me.sub * 8) = r;
  }
}

}  // namespace attention::cuda::detail
KVTILE_NAMESPACE_END
