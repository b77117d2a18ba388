// tests/emulation: a host stand-in for <cuda_runtime.h>, for running kvtile's mma.sync kernels
// on a machine without a GPU. Every CUDA thread of a CTA is a std::thread; __syncthreads is a
// barrier of the CTA's threads, and warp collectives (shuffles here, ldmatrix and mma.sync in
// arch/mma.cuh) meet at a barrier of the warp's 32 threads, exchange their operands through a
// per-warp slot, and compute each lane's result as the PTX ISA defines it. cp.async copies at
// once (so the emulation checks index arithmetic, masks and the algorithm, not the pipeline's
// timing or races: compute-sanitizer's racecheck on a GPU does that). Shared memory starts as
// 0xFF bytes (NaN in fp16 and bf16), so a read of an element never written shows.
//
// Only what the kernels under test use is here; the test target puts this folder first on
// its include path, so these headers replace the toolkit's and kvtile's arch/ ones.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>
#include <memory>

struct uint3 { unsigned x = 0, y = 0, z = 0; };
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint2 { unsigned x, y; };
struct uint4 { unsigned x, y, z, w; };
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline float2 make_float2(float a, float b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
using cudaStream_t = void*;
#define __global__
#define __device__
#define __host__
#define __shared__
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __forceinline__ inline

namespace emu {
struct warp_ctx {
  std::unique_ptr<std::barrier<>> bar;
  std::uint32_t addr[32];
  std::uint32_t a[32][4];
  std::uint32_t b[32][2];
  float c[32][4];
  float v[32];
  unsigned u[32];
};
struct cta_ctx {
  std::unique_ptr<std::barrier<>> bar;
  std::vector<warp_ctx> warps;
  unsigned char* smem;
};
inline thread_local cta_ctx* cta = nullptr;
inline thread_local uint3 tidx, bidx;
inline dim3 grid_dim, block_dim;
inline std::atomic<long> atomics{0};
}  // namespace emu

#define threadIdx (emu::tidx)
#define blockIdx (emu::bidx)
#define gridDim (emu::grid_dim)
#define blockDim (emu::block_dim)

inline void __syncthreads() { emu::cta->bar->arrive_and_wait(); }
inline void __syncwarp() { emu::cta->warps[emu::tidx.x / 32].bar->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int m) {
  auto& w = emu::cta->warps[emu::tidx.x / 32];
  const int lane = emu::tidx.x % 32;
  w.v[lane] = v;
  w.bar->arrive_and_wait();
  const float r = w.v[lane ^ m];
  w.bar->arrive_and_wait();
  return r;
}
// The largest of the warp's 32 values (every lane of the warp takes part).
inline unsigned __reduce_max_sync(unsigned, unsigned v) {
  auto& w = emu::cta->warps[emu::tidx.x / 32];
  w.u[emu::tidx.x % 32] = v;
  w.bar->arrive_and_wait();
  const unsigned r = *std::max_element(w.u, w.u + 32);
  w.bar->arrive_and_wait();
  return r;
}
// Per 16-bit half, the unsigned larger of a's and b's.
inline unsigned __vmaxu2(unsigned a, unsigned b) {
  return std::max(a & 0xFFFFu, b & 0xFFFFu) | std::max(a & 0xFFFF0000u, b & 0xFFFF0000u);
}
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
inline float atomicAdd(float* p, float v) {
  ++emu::atomics;
  return std::atomic_ref<float>(*p).fetch_add(v);
}
inline void __sincosf(float x, float* s, float* c) { *s = std::sin(x); *c = std::cos(x); }
// Byte s of the result is byte (selector nibble s) of the 8 bytes {y:x} (PTX prmt, default mode).
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned sel) {
  const unsigned long long v = (static_cast<unsigned long long>(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= unsigned((v >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  return r;
}
inline float __logf(float x) { return std::log(x); }
using std::fmaf;
using std::exp2f;
using std::log2f;

namespace emu {
// Runs body() as every thread of every CTA of `grid`, `threads` per CTA with `smem` bytes.
template <class Body>
void launch(dim3 grid, int threads, std::size_t smem, Body body) {
  grid_dim = grid;
  block_dim = dim3(threads);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        cta_ctx c;
        c.bar = std::make_unique<std::barrier<>>(threads);
        c.warps.resize((threads + 31) / 32);
        for (auto& w : c.warps) w.bar = std::make_unique<std::barrier<>>(32);
        std::vector<unsigned char> mem(smem + 16, 0xFF);  // garbage: 0xFFFF is a NaN in fp16 / bf16
        c.smem = mem.data();
        std::vector<std::thread> ts;
        for (int t = 0; t < threads; ++t)
          ts.emplace_back([&, t] {
            cta = &c;
            tidx = {unsigned(t), 0, 0};
            bidx = {x, y, z};
            body(c.smem);
          });
        for (auto& t : ts) t.join();
      }
}
}  // namespace emu
