// kvtile/attention/cpu/tile_math.hpp: the fp32 tile arithmetic of the CPU kernels.
//
//   gemm_acc<Isa>(m, n, k, A, lda, B, ldb, C, ldc)   C[m,n] += A[m,k] B[k,n], all row-major
//   gemm_nt<Isa>(m, n, k, A, lda, B, ldb, C, ldc)    C[m,n]  = A[m,k] B[n,k]^T (few rows)
//   row_max<Isa>(s, n)                                 max of a row of scores
//   exp2_row<Isa>(s, n, base, p)                       p = 2^(s - base) (0 for -inf), returns sum p
//   convert_row<Isa>(src, n, mul, dst)                 fp32/fp16/bf16 -> fp32, times mul
//
// Written with GCC/Clang vector extensions so the register blocking is explicit and the same
// source serves every x86 level: an instruction-set description `Isa` fixes the vector width
// and the micro-tile. The kernels are compiled twice: once for the build's baseline (SSE2 on
// x86-64, isa_generic) and once, through a target attribute, for AVX2 + FMA + F16C (isa_avx2), picked
// at run time by use_avx2_path() (cpu_isa_choice() can pin the baseline copy). Everything here
// is force-inlined into those two entry points, so -march=native only speeds up the baseline.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kvtile/attention/softmax_state.hpp"
#include "kvtile/core/config.hpp"
#include "kvtile/core/numeric.hpp"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define KVTILE_CPU_DISPATCH_AVX2 1
#define KVTILE_CPU_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#include <cpuid.h>
#include <immintrin.h>
#else
#define KVTILE_CPU_DISPATCH_AVX2 0
#define KVTILE_CPU_TARGET_AVX2
#endif

KVTILE_NAMESPACE_BEGIN
namespace attention::cpu {

// Vector width W floats; the GEMM micro-tile is Rows x (Vecs * W), sized to the register file.
struct isa_generic {  // SSE2: 16 xmm registers -> 4 x 8 accumulators in 8 registers
  static constexpr int width = 4, rows = 4, vecs = 2;
  static constexpr const char* name = "sse2";
};
struct isa_avx2 {  // AVX2 + FMA (+ F16C): 16 ymm registers -> 8 x 8 accumulators in 8 registers
  static constexpr int width = 8, rows = 8, vecs = 1;
  static constexpr const char* name = "avx2-fma";
};

// GEMM columns (head dim, key tiles) are multiples of micro_n; GEMM rows multiples of micro_m
// (a remainder of micro_m rows below Isa::rows runs a smaller micro-tile: decode of a GQA
// group of 4 pads to 4 rows, not 8).
inline constexpr int micro_n = 8;
inline constexpr int micro_m = 4;
static_assert(isa_generic::width * isa_generic::vecs == micro_n && isa_avx2::width * isa_avx2::vecs == micro_n);
static_assert(isa_generic::rows % micro_m == 0 && isa_avx2::rows % micro_m == 0);

inline bool cpu_has_avx2_fma() {
#if KVTILE_CPU_DISPATCH_AVX2
  // F16C from CPUID leaf 1 (ECX bit 29): clang before 15 has no "f16c" for __builtin_cpu_supports.
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29)) != 0;
  }();
  return has;
#else
  return false;
#endif
}

// Which compiled copy the kernels run: the best this CPU supports, or (for tests and
// comparisons) always the baseline one. Read at every kernel call.
enum class isa_choice { best, baseline };
inline std::atomic<isa_choice>& cpu_isa_choice() {
  static std::atomic<isa_choice> choice{isa_choice::best};
  return choice;
}
inline bool use_avx2_path() { return cpu_isa_choice().load() == isa_choice::best && cpu_has_avx2_fma(); }

namespace detail {

template <int W>
struct vec_of {
  typedef float type __attribute__((vector_size(4 * W)));
  typedef std::int32_t itype __attribute__((vector_size(4 * W)));
};

template <int W>
using vf = typename vec_of<W>::type;
template <int W>
using vi = typename vec_of<W>::itype;

// Vectors travel by reference only: no vector crosses a call boundary by value, so the ABI of
// AVX vector arguments (GCC's -Wpsabi note) never comes into play.
template <int W>
KVTILE_FORCEINLINE void load(vf<W>& v, const float* p) {
  std::memcpy(&v, p, sizeof v);
}
template <int W>
KVTILE_FORCEINLINE void store(float* p, const vf<W>& v) {
  std::memcpy(p, &v, sizeof v);
}

// x = 2^x in place, x <= 0 in practice; accurate to ~2 ulp, 0 below 2^-126 (and for -inf).
template <int W>
KVTILE_FORCEINLINE void exp2_inplace(vf<W>& x) {
  const vf<W> zero{}, lo = zero - 126.f, hi = zero + 127.f;
  const vf<W> xc = x < lo ? lo : (x > hi ? hi : x);
  const vf<W> magic = zero + 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const vf<W> r = (xc + magic) - magic;
  const vf<W> f = xc - r;  // [-0.5, 0.5]
  // Taylor series of 2^f = e^(f ln 2) to degree 6: relative error < 2e-7 on [-0.5, 0.5].
  vf<W> p = zero + 1.5403530e-4f;
  p = p * f + 1.3333558e-3f;
  p = p * f + 9.6181291e-3f;
  p = p * f + 5.5504109e-2f;
  p = p * f + 2.4022651e-1f;
  p = p * f + 6.9314718e-1f;
  p = p * f + 1.0f;
  const vi<W> bits = (__builtin_convertvector(r, vi<W>) + 127) << 23;
  vf<W> scale;
  std::memcpy(&scale, &bits, sizeof scale);
  x = x < lo ? zero : p * scale;
}

// Register-blocked micro-kernel: C[R, Vecs*W] += A[R, k] B[k, Vecs*W].
template <class Isa, int R>
KVTILE_FORCEINLINE void micro_gemm(int k, const float* a, std::int64_t lda, const float* b, std::int64_t ldb, float* c,
                                   std::int64_t ldc) {
  constexpr int W = Isa::width, V = Isa::vecs;
  vf<W> acc[R][V];

  for (int i = 0; i < R; ++i)

    for (int j = 0; j < V; ++j) load<W>(acc[i][j], c + i * ldc + j * W);
  for (int p = 0; p < k; ++p) {
    vf<W> bv[V];

    for (int j = 0; j < V; ++j) load<W>(bv[j], b + p * ldb + j * W);

    for (int i = 0; i < R; ++i) {
      const float ai = a[i * lda + p];

      for (int j = 0; j < V; ++j) acc[i][j] += ai * bv[j];
    }
  }

  for (int i = 0; i < R; ++i)

    for (int j = 0; j < V; ++j) store<W>(c + i * ldc + j * W, acc[i][j]);
}

}  // namespace detail

// C[m, n] += A[m, k] B[k, n]; m a multiple of micro_m, n a multiple of micro_n (callers pad).
template <class Isa>
KVTILE_FORCEINLINE void gemm_acc(int m, int n, int k, const float* a, std::int64_t lda, const float* b,
                                 std::int64_t ldb, float* c, std::int64_t ldc) {
  int i = 0;
  for (; i + Isa::rows <= m; i += Isa::rows)
    for (int j = 0; j < n; j += micro_n)
      detail::micro_gemm<Isa, Isa::rows>(k, a + i * lda, lda, b + j, ldb, c + i * ldc + j, ldc);
  if constexpr (Isa::rows > micro_m)
    for (; i < m; i += micro_m)
      for (int j = 0; j < n; j += micro_n)
        detail::micro_gemm<Isa, micro_m>(k, a + i * lda, lda, b + j, ldb, c + i * ldc + j, ldc);
}

// C[m, n] = A[m, k] B[n, k]^T: dot products of rows, for GEMMs with few rows (decode), where
// transposing B for gemm_acc would cost more than the arithmetic. m a multiple of 4, n of 2, k
// of the vector width.
template <class Isa>
KVTILE_FORCEINLINE void gemm_nt(int m, int n, int k, const float* a, std::int64_t lda, const float* b, std::int64_t ldb,
                                float* c, std::int64_t ldc) {
  constexpr int W = Isa::width, R = 4, J = 2;
  for (int i0 = 0; i0 < m; i0 += R)
    for (int j0 = 0; j0 < n; j0 += J) {
      detail::vf<W> acc[R][J] = {}, av, bv[J];
      for (int x = 0; x < k; x += W) {
        for (int j = 0; j < J; ++j) detail::load<W>(bv[j], b + (j0 + j) * ldb + x);
        for (int i = 0; i < R; ++i) {
          detail::load<W>(av, a + (i0 + i) * lda + x);
          for (int j = 0; j < J; ++j) acc[i][j] += av * bv[j];
        }
      }
      for (int i = 0; i < R; ++i)
        for (int j = 0; j < J; ++j) {
          float sum = 0.f;
          for (int l = 0; l < W; ++l) sum += acc[i][j][l];
          c[(i0 + i) * ldc + j0 + j] = sum;
        }
    }
}

#if KVTILE_CPU_DISPATCH_AVX2
// fp16 -> fp32 with F16C, 8 at a time (a call, not inlined: the intrinsics need the target).
KVTILE_CPU_TARGET_AVX2 inline void convert_half_f16c(const half* src, int n, float mul, float* dst) {
  const __m256 m = _mm256_set1_ps(mul);
  for (int x = 0; x < n; x += 8) {
    __m128i h;
    std::memcpy(&h, src + x, sizeof h);
    _mm256_storeu_ps(dst + x, _mm256_mul_ps(_mm256_cvtph_ps(h), m));
  }
}
#endif

// dst[0, n) = float(src[0, n)) * mul, n a multiple of micro_n.
template <class Isa, class T>
KVTILE_FORCEINLINE void convert_row(const T* src, int n, float mul, float* dst) {
#if KVTILE_CPU_DISPATCH_AVX2
  if constexpr (std::is_same_v<Isa, isa_avx2> && std::is_same_v<std::remove_cv_t<T>, half>) {
    convert_half_f16c(src, n, mul, dst);
    return;
  }
#endif
  for (int x = 0; x < n; ++x) dst[x] = to_float(src[x]) * mul;
}

// Max of s[0, n), n a multiple of micro_n; -inf when every entry is -inf.
template <class Isa>
KVTILE_FORCEINLINE float row_max(const float* s, int n) {
  constexpr int W = Isa::width;
  detail::vf<W> m = detail::vf<W>{} + neg_inf, x;
  for (int j = 0; j < n; j += W) {
    detail::load<W>(x, s + j);
    m = x > m ? x : m;
  }
  float r = neg_inf;
  for (int i = 0; i < W; ++i) r = max_f(r, m[i]);
  return r;
}

// p[j] = 2^(s[j] - base) for j in [0, n), n a multiple of micro_n; masked scores (-inf) give 0.
// Returns the sum of p.
template <class Isa>
KVTILE_FORCEINLINE float exp2_row(const float* s, int n, float base, float* p) {
  constexpr int W = Isa::width;
  detail::vf<W> sum{}, e;
  for (int j = 0; j < n; j += W) {
    detail::load<W>(e, s + j);
    e -= base;
    detail::exp2_inplace<W>(e);
    detail::store<W>(p + j, e);
    sum += e;
  }
  float r = 0.f;
  for (int i = 0; i < W; ++i) r += sum[i];
  return r;
}

// y[0, n) *= a, n a multiple of micro_n.
template <class Isa>
KVTILE_FORCEINLINE void scale_row(float* y, int n, float a) {
  constexpr int W = Isa::width;
  detail::vf<W> v;
  for (int j = 0; j < n; j += W) {
    detail::load<W>(v, y + j);
    v *= a;
    detail::store<W>(y + j, v);
  }
}

}  // namespace attention::cpu
KVTILE_NAMESPACE_END
