// kvtile/attention/cuda/backward/passes.cuh: the element-wise passes around the backward's
// main kernel. Pre-pass, per (query row, head): Delta = dO . O (fp32), the LSE turned into the
// base-2 domain the kernels exponentiate in, and the fp32 dQ accumulator zeroed. Post-pass: dQ
// fp32 -> T, times the softmax scale. One warp per (row, head), 16-byte accesses.
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

// (query tiles of backward_pass_warps rows, qo_heads, batch).
inline dim3 backward_pass_grid(const ragged_layout& q, std::int32_t max_q_len) {
  return dim3(unsigned((max_q_len + backward_pass_warps - 1) / backward_pass_warps), unsigned(q.heads),
              unsigned(q.batch));
}

template <class T, int D, class Params>
KVTILE_KERNEL void __launch_bounds__(32 * backward_pass_warps) backward_prepass(const Params p) {
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int b = int(blockIdx.z), h = int(blockIdx.y), t = int(blockIdx.x) * backward_pass_warps + warp;
  if (t >= p.q_layout.len_of(b)) return;
  const T* o = p.o + p.o_layout.offset(b, t, h);
  const T* g = p.d_o + p.do_layout.offset(b, t, h);
  float acc = 0.f;
  for (int c = lane; c < D / 8; c += 32) {
    const uint4 x = *reinterpret_cast<const uint4*>(o + c * 8);
    const uint4 y = *reinterpret_cast<const uint4*>(g + c * 8);
    const std::uint32_t xs[4] = {x.x, x.y, x.z, x.w}, ys[4] = {y.x, y.y, y.z, y.w};
    KVTILE_PRAGMA_UNROLL
    for (int i = 0; i < 4; ++i) {
      const float2 a = arch::unpack2<T>(xs[i]), d = arch::unpack2<T>(ys[i]);
      acc = fmaf(a.x, d.x, fmaf(a.y, d.y, acc));
    }
  }
  KVTILE_PRAGMA_UNROLL
  for (int m = 16; m > 0; m /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, m);
  const std::int64_t row = p.q_layout.row(b, t);
  if (lane == 0) {
    const float l = p.lse[row * p.q_layout.heads + h];
    p.delta[std::int64_t(h) * p.ws_rows + row] = acc;
    p.lse2[std::int64_t(h) * p.ws_rows + row] = l == neg_inf ? std::numeric_limits<float>::infinity() : l * log2e;
  }
  if (p.dq_acc != nullptr) {
    float4* a = reinterpret_cast<float4*>(p.dq_acc + (row * p.q_layout.heads + h) * D);
    for (int c = lane; c < D / 4; c += 32) a[c] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
}

template <class T, int D, class Params>
KVTILE_KERNEL void __launch_bounds__(32 * backward_pass_warps) backward_postpass(const Params p) {
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int b = int(blockIdx.z), h = int(blockIdx.y), t = int(blockIdx.x) * backward_pass_warps + warp;
  if (t >= p.q_layout.len_of(b)) return;
  const std::int64_t row = p.q_layout.row(b, t);
  const float4* a = reinterpret_cast<const float4*>(p.dq_acc + (row * p.q_layout.heads + h) * D);
  T* dq = p.dq + p.dq_layout.offset(b, t, h);
  for (int c = lane; c < D / 8; c += 32) {
    const float4 x = a[2 * c], y = a[2 * c + 1];
    const float s = p.scale;
    uint4 r;
    r.x = arch::pack2<T>(x.x * s, x.y * s);
    r.y = arch::pack2<T>(x.z * s, x.w * s);
    r.z = arch::pack2<T>(y.x * s, y.y * s);
    r.w = arch::pack2<T>(y.z * s, y.w * s);
    *reinterpret_cast<uint4*>(dq + c * 8) = r;
  }
}

}  // namespace attention::cuda::detail
KVTILE_NAMESPACE_END
