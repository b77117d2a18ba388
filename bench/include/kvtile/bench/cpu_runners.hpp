// kvtile/bench/cpu_runners.hpp: kvtile_bench runners for the CPU backend.
//
//   add_cpu_attention<T, HeadDim, Tile, Mask>()  registers prefill, decode and append of
//   cpu::attention_forward<Tile, HeadDim, Mask> with element type T (float, half, bfloat16).
// Prefill reads dense K/V [batch, S, kv_heads, D]; decode and append read paged K/V through a
// CSR page table over shuffled blocks, in the problem's layout (NHD or HND).
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "kvtile/attention/cpu/forward.hpp"
#include "kvtile/attention/mask.hpp"
#include "kvtile/bench/registry.hpp"
#include "kvtile/core/numeric.hpp"

KVTILE_NAMESPACE_BEGIN
namespace bench {

template <class T>
constexpr const char* dtype_name() {
  if constexpr (std::is_same_v<T, float>) return "fp32";
  else if constexpr (std::is_same_v<T, kvtile::half>) return "fp16";
  else return "bf16";
}
template <class Mask>
constexpr const char* mask_name() {
  return std::is_same_v<Mask, attention::causal_mask> ? "causal" : "none";
}

// Times `body` per iteration with the host clock (Google Benchmark's real time) and sets the
// row's counters from the mean.
template <class Body>
void time_cpu(benchmark::State& st, const problem& p, Body&& body) {
  body();  // warm-up: pages touched, thread pool started
  double total = 0;
  for (auto _ : st) {
    const auto t0 = std::chrono::steady_clock::now();
    body();
    total += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  set_counters(st, p, st.iterations() ? total / double(st.iterations()) : 0.0, false);
}

namespace detail {

template <class T>
std::vector<T> random_values(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1, 1);
  std::vector<T> x(n);
  for (auto& e : x) e = from_float<T>(u(rng));
  return x;
}

template <class T, int HeadDim, class Tile, class Mask>
void run_cpu(benchmark::State& st, const problem& p) {
  using namespace attention;
  KVTILE_REQUIRE(p.head_dim == HeadDim, errc::internal, "problem head dim ", p.head_dim, " != ", HeadDim);
  const int rows = p.queries(), keys = p.keys();
  const auto q = random_values<T>(std::size_t(p.batch) * rows * p.qo_heads * HeadDim, 1);
  std::vector<T> o(q.size());
  std::vector<float> lse(std::size_t(p.batch) * rows * p.qo_heads);
  const dense_tensor<const T> qv{q.data(), ragged_layout::fixed(p.batch, rows, p.qo_heads, HeadDim)};
  const dense_tensor<T> ov{o.data(), qv.layout};
  const float scale = 1.f / std::sqrt(float(HeadDim));
#if KVTILE_CPU_DISPATCH_AVX2
  kernel_note() = cpu::cpu_has_avx2_fma() ? "cpu tiled (AVX2)" : "cpu tiled (baseline ISA)";
#else
  kernel_note() = "cpu tiled";
#endif
  if (p.kernel == kernel_kind::prefill) {
    const std::size_t n = std::size_t(p.batch) * keys * p.kv_heads * HeadDim;
    const auto k = random_values<T>(n, 2), v = random_values<T>(n, 3);
    const dense_kv<const T> kv{k.data(), v.data(), ragged_layout::fixed(p.batch, keys, p.kv_heads, HeadDim)};
    time_cpu(st, p, [&] {
      cpu::attention_forward<Tile, HeadDim, Mask>(qv, kv, p.kv_heads, {}, scale, ov, lse.data());
      benchmark::ClobberMemory();
    });
    return;
  }
  // Paged: each sequence's blocks are scattered over the pool (shuffled ids).
  const int per_seq = (keys + p.page_size - 1) / p.page_size;
  const int num_blocks = p.batch * per_seq;
  const std::size_t pool = std::size_t(num_blocks) * p.page_size * p.kv_heads * HeadDim;
  const auto k = random_values<T>(pool, 2), v = random_values<T>(pool, 3);
  std::vector<std::int32_t> ids(num_blocks), indptr(p.batch + 1), last(p.batch, keys - (per_seq - 1) * p.page_size);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), std::mt19937_64(42));
  for (int b = 0; b <= p.batch; ++b) indptr[b] = b * per_seq;
  const paging::paged_kv<const T, paging::csr_page_table> kv{
      paging::kv_pool_view<const T>::make(k.data(), v.data(), p.layout, num_blocks, p.page_size, p.kv_heads, HeadDim),
      paging::csr_page_table{indptr.data(), ids.data(), last.data(), p.batch}};
  time_cpu(st, p, [&] {
    cpu::attention_forward<Tile, HeadDim, Mask>(qv, kv, p.kv_heads, {}, scale, ov, lse.data());
    benchmark::ClobberMemory();
  });
}

}  // namespace detail

// Registers prefill, decode and append for one CPU instantiation. DefaultTile: the one picked
// when the command line names no tile.
template <class T, int HeadDim, class Tile, class Mask, bool DefaultTile = false>
bool add_cpu_attention() {
  for (kernel_kind k : {kernel_kind::prefill, kernel_kind::decode, kernel_kind::append}) {
    config c;
    c.kernel = k;
    c.device = device_kind::cpu;
    c.dtype = dtype_name<T>();
    c.head_dim = HeadDim;
    c.mask = mask_name<Mask>();
    c.block_q = Tile::block_q;
    c.block_kv = Tile::block_kv;
    c.default_tile = DefaultTile;
    registry::global().add({c, &detail::run_cpu<T, HeadDim, Tile, Mask>});
  }
  return true;
}

}  // namespace bench
KVTILE_NAMESPACE_END
