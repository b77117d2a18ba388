// kvtile/attention/cuda/arch/mma.cuh: warp-level tensor-core pieces for sm_80 and newer:
// mma.sync m16n8k16 (fp16/bf16 in, fp32 accumulate), ldmatrix, and fragment packing.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"): with lane = 4*g + t
// (g = lane / 4 in 0..7, t = lane % 4 in 0..3)
//   A (16x16, row-major): a[0]=(g, 2t..2t+1) a[1]=(g+8, 2t..) a[2]=(g, 2t+8..) a[3]=(g+8, 2t+8..)
//   B (16x8, "col"):      b[0]=(k=2t..2t+1, n=g) b[1]=(k=2t+8.., n=g)
//   C/D (16x8, fp32):     c[0..1]=(g, 2t..2t+1) c[2..3]=(g+8, 2t..2t+1)
// Each a[i]/b[i] register holds two 16-bit values, the lower column in the low half.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kvtile/core/config.hpp"
#include "kvtile/core/numeric.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda::arch {

// The CUDA type behind a kvtile storage type.
template <class T>
struct native;
template <>
struct native<kvtile::half> {
  using type = __half;
  using type2 = __half2;
};
template <>
struct native<kvtile::bfloat16> {
  using type = __nv_bfloat16;
  using type2 = __nv_bfloat162;
};
template <class T>
using native_t = typename native<T>::type;

// Two floats packed into one 32-bit register of T (low half = a).
template <class T>
KVTILE_DEVICE KVTILE_FORCEINLINE std::uint32_t pack2(float a, float b) {
  if constexpr (std::is_same_v<T, kvtile::bfloat16>) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<std::uint32_t*>(&h);
  } else {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<std::uint32_t*>(&h);
  }
}

// A bf16 Q taken into fp16 (the fp8 paths compute in fp16) times 2^e, one e for a warp's rows,
// chosen so that their largest |q| lands in [2^14, 2^15): no fp16 overflow, and every element
// down to 2^-28 of that largest keeps fp16's 11 bits (bf16 has 8), so the conversion is exact
// there and below it loses less than 2^-39 of the largest |q|. The caller folds 2^-e into its
// softmax scale (a power of two: the scores are exactly the unscaled ones'). In three steps:
// a lane's running maximum over its bf16 pairs (|bf16| orders as its bits without the sign),
struct bf16_to_fp16_scaled {
  static KVTILE_DEVICE KVTILE_FORCEINLINE std::uint32_t max_abs(std::uint32_t mx, std::uint32_t pair) {
    return __vmaxu2(mx, pair & 0x7fff7fffu);
  }
  // the warp's e from its lanes' maxima (every lane calls), within [-64, 64] so that 2^-e stays
  // a normal float,
  static KVTILE_DEVICE KVTILE_FORCEINLINE int exponent(std::uint32_t mx) {
    mx = __reduce_max_sync(0xffffffffu, (mx & 0xffffu) > (mx >> 16) ? mx & 0xffffu : mx >> 16);
    const int e = 141 - int(mx >> 7);  // 141 - the largest's biased exponent
    const int lo = -64 > e ? -64 : e;
    return 64 < lo ? 64 : lo;
  }
  // and each pair times up = 2^e into fp16.
  static KVTILE_DEVICE KVTILE_FORCEINLINE float up(int e) { return __int_as_float((127 + e) << 23); }
  static KVTILE_DEVICE KVTILE_FORCEINLINE float down(int e) { return __int_as_float((127 - e) << 23); }
  static KVTILE_DEVICE KVTILE_FORCEINLINE std::uint32_t pair(std::uint32_t u, float up) {
    return pack2<kvtile::half>(__uint_as_float(u << 16) * up, __uint_as_float(u & 0xffff0000u) * up);
  }
};

template <class T>
KVTILE_DEVICE KVTILE_FORCEINLINE float2 unpack2(std::uint32_t r) {
  if constexpr (std::is_same_v<T, kvtile::bfloat16>) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&r));
  } else {
    return __half22float2(*reinterpret_cast<__half2*>(&r));
  }
}

// Rotates the 16-bit pairs of two registers by the angles whose cosines and sines are packed in
// c and s, in T's packed arithmetic (two roundings of T per element, where a rotation in fp32
// rounds once): x' = x c - y s, y' = x s + y c, element-wise. One multiply and one FMA per
// register, where unpacking to fp32, four FMAs and packing again take seven instructions a pair.
template <class T>
KVTILE_DEVICE KVTILE_FORCEINLINE void rotate2(std::uint32_t& x, std::uint32_t& y, std::uint32_t c, std::uint32_t s) {
  using V = typename native<T>::type2;
  const V xv = *reinterpret_cast<const V*>(&x), yv = *reinterpret_cast<const V*>(&y);
  const V cv = *reinterpret_cast<const V*>(&c), sv = *reinterpret_cast<const V*>(&s);
  const V xr = __hfma2(xv, cv, __hneg2(__hmul2(yv, sv)));
  const V yr = __hfma2(yv, cv, __hmul2(xv, sv));
  x = *reinterpret_cast<const std::uint32_t*>(&xr);
  y = *reinterpret_cast<const std::uint32_t*>(&yr);
}

// Rotates the pair held in the two halves of one register (x low, y high) by cosine c and sine
// s given as (c, c) and (-s, s): r' = r (c, c) + swap(r) (-s, s).
template <class T>
KVTILE_DEVICE KVTILE_FORCEINLINE void rotate_halves(std::uint32_t& r, std::uint32_t cc, std::uint32_t ns_s) {
  using V = typename native<T>::type2;
  const std::uint32_t sw = __byte_perm(r, 0, 0x1032);
  const V rv = *reinterpret_cast<const V*>(&r), swv = *reinterpret_cast<const V*>(&sw);
  const V ccv = *reinterpret_cast<const V*>(&cc), nsv = *reinterpret_cast<const V*>(&ns_s);
  const V out = __hfma2(rv, ccv, __hmul2(swv, nsv));
  r = *reinterpret_cast<const std::uint32_t*>(&out);
}

// D = A * B + C, m16n8k16, fp32 accumulators in place.
template <class T>
KVTILE_DEVICE KVTILE_FORCEINLINE void mma_16816(float (&c)[4], const std::uint32_t (&a)[4], const std::uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, kvtile::bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  (void)c; (void)a; (void)b;
  __trap();  // tensor-core kernels need sm_80 or newer; their launchers reject older devices
#endif
}

KVTILE_DEVICE KVTILE_FORCEINLINE std::uint32_t smem_addr(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

// ldmatrix: lanes 8i..8i+7 give the row addresses of 8x8 matrix i; each lane receives one
// 32-bit register per matrix. .trans transposes each 8x8 matrix on the way.
KVTILE_DEVICE KVTILE_FORCEINLINE void ldmatrix_x4(std::uint32_t (&r)[4], std::uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
KVTILE_DEVICE KVTILE_FORCEINLINE void ldmatrix_x4_trans(std::uint32_t (&r)[4], std::uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
KVTILE_DEVICE KVTILE_FORCEINLINE void ldmatrix_x2(std::uint32_t (&r)[2], std::uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}
KVTILE_DEVICE KVTILE_FORCEINLINE void ldmatrix_x2_trans(std::uint32_t (&r)[2], std::uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}

// exp2 on the special-function unit (ex2.approx.ftz.f32): ~2 ulp, exp2(-inf) = 0.
KVTILE_DEVICE KVTILE_FORCEINLINE float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace attention::cuda::arch
KVTILE_NAMESPACE_END
