// kvtile/attention/cuda/merge_step.cuh: the device side of merging attention states (merge.cuh
// says what a state is): one state folded into a running one, four output values of a row at a
// time, and the 4-value loads and stores of fp32, fp16 and bf16 rows the merge kernels use.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_runtime.h>

#include "kvtile/attention/cuda/arch/mma.cuh"
#include "kvtile/attention/softmax_state.hpp"
#include "kvtile/core/config.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda {

// (o, lse) <- merge((o, lse), (ob, lse_b)) for four output values of one row.
KVTILE_DEVICE KVTILE_FORCEINLINE void merge_state_step(float (&o)[4], float& lse, const float (&ob)[4], float lse_b) {
  const merge_weights w = merge_lse(lse, lse_b);
  KVTILE_PRAGMA_UNROLL
  for (int i = 0; i < 4; ++i) o[i] = w.wa * o[i] + w.wb * ob[i];
  lse = w.lse;
}

namespace detail {

template <class T>
KVTILE_DEVICE KVTILE_FORCEINLINE void load4(float (&v)[4], const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    const float4 x = *reinterpret_cast<const float4*>(p);
    v[0] = x.x, v[1] = x.y, v[2] = x.z, v[3] = x.w;
  } else {
    const uint2 x = *reinterpret_cast<const uint2*>(p);
    const float2 a = arch::unpack2<T>(x.x), b = arch::unpack2<T>(x.y);
    v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y;
  }
}

template <class T>
KVTILE_DEVICE KVTILE_FORCEINLINE void store4(T* p, const float (&v)[4]) {
  if constexpr (std::is_same_v<T, float>) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    *reinterpret_cast<uint2*>(p) = make_uint2(arch::pack2<T>(v[0], v[1]), arch::pack2<T>(v[2], v[3]));
  }
}

}  // namespace detail
}  // namespace attention::cuda
KVTILE_NAMESPACE_END
