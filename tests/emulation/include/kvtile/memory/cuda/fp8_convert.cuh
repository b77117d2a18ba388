// tests/emulation: kvtile/memory/cuda/fp8_convert.cuh on the host: e4m3 codes decoded by the
// host codec (memory::fp8::decode_e4m3; every code is exact in fp16 and bf16) and packed as the
// device conversion packs them: byte i of x is value i, lo = {v0, v1}, hi = {v2, v3}.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>
#include "kvtile/attention/cuda/arch/mma.cuh"
#include "kvtile/core/config.hpp"
#include "kvtile/memory/kv_codec.hpp"
KVTILE_NAMESPACE_BEGIN
namespace memory::cuda {
template <class T>
inline void e4m3x4_to(std::uint32_t x, std::uint32_t& lo, std::uint32_t& hi) {
  auto v = [&](int i) { return fp8::decode_e4m3(std::uint8_t(x >> (8 * i))); };
  lo = attention::cuda::arch::pack2<T>(v(0), v(1));
  hi = attention::cuda::arch::pack2<T>(v(2), v(3));
}
template <class T>
inline void e4m3x16_to(const uint4& in, uint4& out0, uint4& out1) {
  e4m3x4_to<T>(in.x, out0.x, out0.y);
  e4m3x4_to<T>(in.y, out0.z, out0.w);
  e4m3x4_to<T>(in.z, out1.x, out1.y);
  e4m3x4_to<T>(in.w, out1.z, out1.w);
}
}  // namespace memory::cuda
KVTILE_NAMESPACE_END
