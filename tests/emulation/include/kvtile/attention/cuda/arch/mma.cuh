// tests/emulation: kvtile/attention/cuda/arch/mma.cuh on the host. ldmatrix and mma.sync
// m16n8k16 are warp collectives over the emulated lanes (see cuda_runtime.h here), with the
// fragment layouts of the PTX ISA that the real header's comment states; products are summed
// in fp32. fast_exp2 is the exact exp2.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <cuda_runtime.h>
#include "kvtile/core/config.hpp"
#include "kvtile/core/numeric.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda::arch {

template <class T>
inline std::uint32_t pack2(float a, float b) {
  const T x(a), y(b);
  std::uint16_t lo, hi;
  std::memcpy(&lo, &x, 2);
  std::memcpy(&hi, &y, 2);
  return std::uint32_t(lo) | (std::uint32_t(hi) << 16);
}
template <class T>
inline float lane16(std::uint32_t r, int half) {
  const std::uint16_t bits = std::uint16_t(half ? r >> 16 : r & 0xFFFF);
  T x;
  std::memcpy(&x, &bits, 2);
  return to_float(x);
}
template <class T>
inline float2 unpack2(std::uint32_t r) {
  return {lane16<T>(r, 0), lane16<T>(r, 1)};
}

// A bf16 Q into fp16 times a warp's power of two: the real header's arithmetic, on the
// emulation's intrinsics (__vmaxu2, __reduce_max_sync over the emulated lanes).
struct bf16_to_fp16_scaled {
  static std::uint32_t max_abs(std::uint32_t mx, std::uint32_t pair) { return __vmaxu2(mx, pair & 0x7fff7fffu); }
  static int exponent(std::uint32_t mx) {
    mx = __reduce_max_sync(0xffffffffu, (mx & 0xffffu) > (mx >> 16) ? mx & 0xffffu : mx >> 16);
    const int e = 141 - int(mx >> 7);
    const int lo = -64 > e ? -64 : e;
    return 64 < lo ? 64 : lo;
  }
  static float up(int e) { return __int_as_float((127 + e) << 23); }
  static float down(int e) { return __int_as_float((127 - e) << 23); }
  static std::uint32_t pair(std::uint32_t u, float up) {
    return pack2<kvtile::half>(__uint_as_float(u << 16) * up, __uint_as_float(u & 0xffff0000u) * up);
  }
};

// Packed 16-bit arithmetic as the hardware rounds it: a product rounded to T, an FMA rounded
// once (the exact product of two 16-bit values and the sum in double, then to T).
template <class T>
inline float round_to(double v) {
  return float(T(float(v)));
}
template <class T>
inline void rotate2(std::uint32_t& x, std::uint32_t& y, std::uint32_t c, std::uint32_t s) {
  float xr[2], yr[2];
  for (int h = 0; h < 2; ++h) {
    const double xv = lane16<T>(x, h), yv = lane16<T>(y, h), cv = lane16<T>(c, h), sv = lane16<T>(s, h);
    xr[h] = round_to<T>(xv * cv - double(round_to<T>(yv * sv)));
    yr[h] = round_to<T>(yv * cv + double(round_to<T>(xv * sv)));
  }
  x = pack2<T>(xr[0], xr[1]);
  y = pack2<T>(yr[0], yr[1]);
}
template <class T>
inline void rotate_halves(std::uint32_t& r, std::uint32_t cc, std::uint32_t ns_s) {
  const double x = lane16<T>(r, 0), y = lane16<T>(r, 1);
  const double c0 = lane16<T>(cc, 0), c1 = lane16<T>(cc, 1), n0 = lane16<T>(ns_s, 0), s1 = lane16<T>(ns_s, 1);
  const float p0 = round_to<T>(y * n0), p1 = round_to<T>(x * s1);
  r = pack2<T>(round_to<T>(x * c0 + double(p0)), round_to<T>(y * c1 + double(p1)));
}

template <class T>
inline void mma_16816(float (&c)[4], const std::uint32_t (&a)[4], const std::uint32_t (&b)[2]) {
  auto& w = emu::cta->warps[emu::tidx.x / 32];
  const int lane = emu::tidx.x % 32;
  for (int i = 0; i < 4; ++i) w.a[lane][i] = a[i], w.c[lane][i] = c[i];
  w.b[lane][0] = b[0];
  w.b[lane][1] = b[1];
  w.bar->arrive_and_wait();
  auto A = [&](int r, int k) {
    const int reg = (r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    return lane16<T>(w.a[4 * (r % 8) + (k % 8) / 2][reg], k % 2);
  };
  auto B = [&](int k, int n) { return lane16<T>(w.b[4 * n + (k % 8) / 2][k / 8], k % 2); };
  const int g = lane / 4, t = lane % 4;
  float d[4];
  for (int i = 0; i < 4; ++i) {
    const int r = g + (i / 2) * 8, n = 2 * t + i % 2;
    float s = w.c[lane][i];
    for (int k = 0; k < 16; ++k) s += A(r, k) * B(k, n);
    d[i] = s;
  }
  w.bar->arrive_and_wait();
  for (int i = 0; i < 4; ++i) c[i] = d[i];
}

inline std::uint32_t smem_addr(const void* p) {
  return std::uint32_t(static_cast<const unsigned char*>(p) - emu::cta->smem);
}
inline std::uint16_t smem_u16(std::uint32_t addr) {
  std::uint16_t v;
  std::memcpy(&v, emu::cta->smem + addr, 2);
  return v;
}

template <int N, bool Trans>
inline void ldmatrix(std::uint32_t* r, std::uint32_t addr) {
  auto& w = emu::cta->warps[emu::tidx.x / 32];
  const int lane = emu::tidx.x % 32;
  w.addr[lane] = addr;
  w.bar->arrive_and_wait();
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < N; ++i) {
    std::uint16_t lo, hi;
    if (!Trans) {
      lo = smem_u16(w.addr[8 * i + g] + 2 * (2 * t));
      hi = smem_u16(w.addr[8 * i + g] + 2 * (2 * t + 1));
    } else {
      lo = smem_u16(w.addr[8 * i + 2 * t] + 2 * g);
      hi = smem_u16(w.addr[8 * i + 2 * t + 1] + 2 * g);
    }
    r[i] = std::uint32_t(lo) | (std::uint32_t(hi) << 16);
  }
  w.bar->arrive_and_wait();
}
inline void ldmatrix_x4(std::uint32_t (&r)[4], std::uint32_t addr) { ldmatrix<4, false>(r, addr); }
inline void ldmatrix_x4_trans(std::uint32_t (&r)[4], std::uint32_t addr) { ldmatrix<4, true>(r, addr); }
inline void ldmatrix_x2(std::uint32_t (&r)[2], std::uint32_t addr) { ldmatrix<2, false>(r, addr); }
inline void ldmatrix_x2_trans(std::uint32_t (&r)[2], std::uint32_t addr) { ldmatrix<2, true>(r, addr); }

inline float fast_exp2(float x) { return std::exp2(x); }

}  // namespace attention::cuda::arch
KVTILE_NAMESPACE_END
