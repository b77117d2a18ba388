// CPU attention forward and backward: GFLOP/s (decimal) for several tile shapes, head dims 64
// and 128, prefill and decode, with the naive reference (kvtile::attention::reference.hpp,
// single thread) in the same run as the baseline, and the fraction of this machine's measured
// fp32 FMA peak (all threads of the pool).
//
// FLOPs counted: forward 4 * rows * visible keys * D (QK^T and PV, 2 per multiply-add; the
// causal mask halves the visible keys), backward 2.5x the forward (FlashAttention's convention).
// Results protocol label: suite=cpu_attention;shape=..;impl=..;unit=GFLOP/s, counter `value`.
#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "kvtile/attention/cpu/backward.hpp"
#include "kvtile/attention/reference.hpp"
#include "kvtile/attention/reference_backward.hpp"

using namespace kvtile;
using namespace kvtile::attention;

// ---- The tile configurations to measure: add yours here, one line. ----
using forward_tiles = std::tuple<tile_shape<32, 64>, tile_shape<64, 64>, tile_shape<128, 64>, tile_shape<64, 128>>;
using backward_tiles = std::tuple<tile_shape<32, 64>, tile_shape<64, 64>>;

namespace {

// fp32 FMA peak of the pool's threads, measured: each thread runs 12 independent chains of
// 8-wide FMAs (enough to cover FMA latency x 2 pipes), the widest the AVX2 path uses. On the
// 2-core AMD EPYC (Zen 4) this was written on: 2 cores x 2 FMA pipes x 8 lanes x 2 FLOP x
// ~3.6 GHz boost = ~230 GFLOP/s when nothing else runs.
#if KVTILE_CPU_DISPATCH_AVX2
KVTILE_CPU_TARGET_AVX2 double fma_chains(long iters) {
  typedef float v8 __attribute__((vector_size(32)));
  v8 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = v8{} + float(i) * 1e-3f;
  v8 a = v8{} + 0.999999f, b = v8{} + 1e-7f;
  for (long it = 0; it < iters; ++it)
    for (int i = 0; i < 12; ++i) acc[i] = acc[i] * a + b;  // no fast-math: nothing folds
  float s = 0;
  for (int i = 0; i < 12; ++i) s += acc[i][0];
  return s;
}
#endif

double measured_peak_gflops() {
  static const double peak = [] {
#if KVTILE_CPU_DISPATCH_AVX2
    if (!cpu::cpu_has_avx2_fma()) return 0.0;
    const int threads = cpu::thread_pool::global().size();
    const long iters = 5'000'000;  // ~25 ms per try
    double best = 0;
    for (int rep = 0; rep < 40; ++rep) {  // best of 40 short tries: the cores are shared
      const auto t0 = std::chrono::steady_clock::now();
      cpu::thread_pool::global().parallel_for(threads, [&](std::int64_t) { benchmark::DoNotOptimize(fma_chains(iters)); });
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      best = std::max(best, 2.0 * 8 * 12 * double(iters) * threads / s / 1e9);
    }
    return best;
#else
    return 0.0;
#endif
  }();
  return peak;
}

void BM_fma_peak(benchmark::State& state) {
  for (auto _ : state) benchmark::DoNotOptimize(measured_peak_gflops());
  state.counters["value"] = measured_peak_gflops();
  state.SetLabel("suite=cpu_attention;shape=fp32 FMA peak, " + std::to_string(cpu::thread_pool::global().size()) +
                 " threads;impl=measured;unit=GFLOP/s");
}

struct shape {
  const char* name;
  int batch, q_len, kv_len, hq, hk, d;
  bool causal;
};

// Prefill (q_len = kv_len) and decode (q_len = 1, GQA 4 and 8) shapes; D = 64 and 128.
const shape shapes[] = {
    {"prefill D=128 L=2048 h=4", 1, 2048, 2048, 4, 4, 128, false},
    {"prefill D=128 L=2048 h=4 causal", 1, 2048, 2048, 4, 4, 128, true},
    {"prefill D=64 L=2048 h=8 causal", 1, 2048, 2048, 8, 8, 64, true},
    {"decode D=128 B=8 kv=4096 h=32/8", 8, 1, 4096, 32, 8, 128, false},
    {"decode D=64 B=8 kv=4096 h=32/8", 8, 1, 4096, 32, 8, 64, false},
    // One sequence, one KV head: a single work item, which only split-KV spreads over threads.
    {"decode D=128 B=1 kv=32768 h=8/1", 1, 1, 32768, 8, 1, 128, false},
};
// The naive baseline is slow: it runs on these shorter prefill shapes, with kvtile beside it.
const shape baseline_shapes[] = {
    {"prefill D=128 L=512 h=4", 1, 512, 512, 4, 4, 128, false},
    {"prefill D=64 L=512 h=4 causal", 1, 512, 512, 4, 4, 64, true},
};

double forward_flops(const shape& s) {
  double keys = 0;  // visible (query, key) pairs per head
  for (int i = 0; i < s.q_len; ++i) keys += s.causal ? std::max(0, std::min(s.kv_len, i + 1 + s.kv_len - s.q_len)) : s.kv_len;
  return 4.0 * s.batch * s.hq * keys * s.d;
}

template <class T>
struct data {
  std::vector<T> q, k, v, o, d_o;
  std::vector<float> lse;
  std::vector<float> dq, dk, dv;
  explicit data(const shape& s) {
    std::mt19937 rng(1);
    std::uniform_real_distribution<float> u(-1, 1);
    auto fill = [&](std::vector<T>& x, std::size_t n) {
      x.resize(n);
      for (auto& e : x) e = from_float<T>(u(rng));
    };
    const std::size_t nq = std::size_t(s.batch) * s.q_len * s.hq * s.d, nk = std::size_t(s.batch) * s.kv_len * s.hk * s.d;
    fill(q, nq), fill(k, nk), fill(v, nk), fill(o, nq), fill(d_o, nq);
    lse.resize(std::size_t(s.batch) * s.q_len * s.hq);
    dq.resize(nq), dk.resize(nk), dv.resize(nk);
  }
};

void set_result(benchmark::State& state, const shape& s, const std::string& impl, double flops, double kv_bytes) {
  state.counters["FLOP/s"] = benchmark::Counter(flops * double(state.iterations()), benchmark::Counter::kIsRate);
  if (kv_bytes > 0)
    state.counters["KV_bytes/s"] = benchmark::Counter(kv_bytes * double(state.iterations()), benchmark::Counter::kIsRate);
  state.SetLabel(std::string("suite=cpu_attention;shape=") + s.name + ";impl=" + impl + ";unit=GFLOP/s");
}

// `value` (and `peak_frac`) use the fastest iteration: the 2 cores of this machine are shared,
// and the best iteration is the one least disturbed by other processes. The FLOP/s counter is
// Google Benchmark's mean over all iterations.
template <class Body>
void timed(benchmark::State& state, const shape& s, const std::string& impl, double flops, double kv_bytes, Body body) {
  double best = 1e30;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    body();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  set_result(state, s, impl, flops, kv_bytes);
  const double gflops = flops / best / 1e9;
  state.counters["value"] = gflops;
  if (measured_peak_gflops() > 0) state.counters["peak_frac"] = gflops / measured_peak_gflops();
}

template <class Tile, class Mask, int D, class T>
void forward_bench(benchmark::State& state, const shape& s, const char* type) {
  data<T> x(s);
  dense_tensor<const T> q{x.q.data(), ragged_layout::fixed(s.batch, s.q_len, s.hq, D)};
  dense_kv<const T> kv{x.k.data(), x.v.data(), ragged_layout::fixed(s.batch, s.kv_len, s.hk, D)};
  dense_tensor<T> o{x.o.data(), q.layout};
  const double kv_bytes = 2.0 * s.batch * s.kv_len * s.hk * D * sizeof(T);
  const std::string impl = std::string("kvtile-cpu-fwd ") + type + " " + std::to_string(Tile::block_q) + "x" +
                           std::to_string(Tile::block_kv);
  timed(state, s, impl, forward_flops(s), kv_bytes, [&] {
    cpu::attention_forward<Tile, D, Mask>(q, kv, s.hk, {}, 0.1f, o, x.lse.data());
    benchmark::ClobberMemory();
  });
}

template <class Tile, class Mask, int D, class T>
void backward_bench(benchmark::State& state, const shape& s, const char* type) {
  data<T> x(s);
  const auto ql = ragged_layout::fixed(s.batch, s.q_len, s.hq, D), kl = ragged_layout::fixed(s.batch, s.kv_len, s.hk, D);
  dense_tensor<const T> q{x.q.data(), ql};
  dense_kv<const T> kv{x.k.data(), x.v.data(), kl};
  cpu::attention_forward<Tile, D, Mask>(q, kv, s.hk, {}, 0.1f, dense_tensor<T>{x.o.data(), ql}, x.lse.data());
  const std::string impl = std::string("kvtile-cpu-bwd ") + type + " " + std::to_string(Tile::block_q) + "x" +
                           std::to_string(Tile::block_kv);
  timed(state, s, impl, 2.5 * forward_flops(s), 0, [&] {
    cpu::attention_backward<Tile, D, Mask>(q, kv, s.hk, {}, 0.1f, dense_tensor<const T>{x.o.data(), ql}, x.lse.data(),
                                           dense_tensor<const T>{x.d_o.data(), ql}, dense_tensor<float>{x.dq.data(), ql},
                                           dense_tensor<float>{x.dk.data(), kl}, dense_tensor<float>{x.dv.data(), kl});
    benchmark::ClobberMemory();
  });
}

template <class Mask, int D>
void naive_forward_bench(benchmark::State& state, const shape& s) {
  data<float> x(s);
  dense_tensor<const float> q{x.q.data(), ragged_layout::fixed(s.batch, s.q_len, s.hq, D)};
  dense_kv<const float> kv{x.k.data(), x.v.data(), ragged_layout::fixed(s.batch, s.kv_len, s.hk, D)};
  timed(state, s, "naive-fwd fp32 (1 thread)", forward_flops(s), 0, [&] {
    naive_attention_lowp<Mask>(q, kv, s.hk, {}, 0.1, dense_tensor<float>{x.o.data(), q.layout}, x.lse.data());
    benchmark::ClobberMemory();
  });
}

template <class Mask, int D>
void naive_backward_bench(benchmark::State& state, const shape& s) {
  data<float> x(s);
  const auto ql = ragged_layout::fixed(s.batch, s.q_len, s.hq, D), kl = ragged_layout::fixed(s.batch, s.kv_len, s.hk, D);
  std::vector<double> dq(x.q.size()), dk(x.k.size()), dv(x.v.size());
  timed(state, s, "naive-bwd fp64 (1 thread)", 2.5 * forward_flops(s), 0, [&] {
    reference_attention_backward<Mask>(dense_tensor<const float>{x.q.data(), ql},
                                       dense_kv<const float>{x.k.data(), x.v.data(), kl}, s.hk, {}, 0.1,
                                       dense_tensor<const float>{x.d_o.data(), ql}, dense_tensor<double>{dq.data(), ql},
                                       dense_tensor<double>{dk.data(), kl}, dense_tensor<double>{dv.data(), kl});
    benchmark::ClobberMemory();
  });
}

template <int D, class F>
void with_mask(const shape& s, F&& f) {
  if (s.causal) f.template operator()<causal_mask, D>();
  else f.template operator()<no_mask, D>();
}

// Head dims compiled into this binary. A shape asking for any other one is an error: running
// the D=64 kernel under a D=96 label (as this function once did) reports FLOP/s for work it
// never did.
template <class F>
void with_shape(const shape& s, F&& f) {
  if (s.d == 128) with_mask<128>(s, f);
  else if (s.d == 64) with_mask<64>(s, f);
  else KVTILE_FAIL(errc::unsupported, "cpu_attention_bench: shape '", s.name, "' has head dim ", s.d,
                   ", not compiled in (available: 64, 128)");
}

void reg(const std::string& name, auto fn) {
  benchmark::RegisterBenchmark(name.c_str(), fn)->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);
}

template <class Tile>
std::string tile_name() {
  return std::to_string(Tile::block_q) + "x" + std::to_string(Tile::block_kv);
}

void register_all() {
  benchmark::RegisterBenchmark("fma_peak", BM_fma_peak)->Iterations(1);
  for (const shape& s : shapes) {
    std::apply([&]<class... Tiles>(Tiles...) {
      (with_shape(s, [&]<class Mask, int D>() {
         reg("fwd/fp32/" + tile_name<Tiles>() + "/" + s.name,
             [&s](benchmark::State& st) { forward_bench<Tiles, Mask, D, float>(st, s, "fp32"); });
       }), ...);
    }, forward_tiles{});
    with_shape(s, [&]<class Mask, int D>() {
      reg(std::string("fwd/bf16/64x64/") + s.name,
          [&s](benchmark::State& st) { forward_bench<tile_shape<64, 64>, Mask, D, bfloat16>(st, s, "bf16"); });
    });
    // RoPE on the fly (attention/variant.hpp: Q rotated once per item, K per loaded tile), beside
    // the bf16 row above: the same kernel, tile and data, only the transform added.
    with_shape(s, [&]<class Mask, int D>() {
      reg(std::string("fwd/bf16-rotary/64x64/") + s.name, [&s](benchmark::State& st) {
        forward_bench<tile_shape<64, 64>, rotary<Mask>, D, bfloat16>(st, s, "bf16 rotary");
      });
    });
    if (s.d == 128 && s.q_len > 1)
      reg(std::string("fwd/fp16/64x64/") + s.name, [&s](benchmark::State& st) {
        with_mask<128>(s, [&]<class Mask, int D>() { forward_bench<tile_shape<64, 64>, Mask, D, half>(st, s, "fp16"); });
      });
    if (s.d == 128 && !s.causal && s.q_len > 1)  // the SSE2 copy: what -march / AVX2 dispatch buys
      reg(std::string("fwd/fp32-baseline-isa/64x64/") + s.name, [&s](benchmark::State& st) {
        cpu::cpu_isa_choice() = cpu::isa_choice::baseline;
        forward_bench<tile_shape<64, 64>, no_mask, 128, float>(st, s, "fp32 baseline-isa");
        cpu::cpu_isa_choice() = cpu::isa_choice::best;
      });
    if (s.q_len == 1) continue;  // backward: prefill shapes
    std::apply([&]<class... Tiles>(Tiles...) {
      (with_shape(s, [&]<class Mask, int D>() {
         reg("bwd/fp32/" + tile_name<Tiles>() + "/" + s.name,
             [&s](benchmark::State& st) { backward_bench<Tiles, Mask, D, float>(st, s, "fp32"); });
       }), ...);
    }, backward_tiles{});
  }
  for (const shape& s : baseline_shapes)
    with_shape(s, [&]<class Mask, int D>() {
      reg(std::string("fwd/fp32/64x64/") + s.name,
          [&s](benchmark::State& st) { forward_bench<tile_shape<64, 64>, Mask, D, float>(st, s, "fp32"); });
      reg(std::string("fwd/naive/") + s.name, [&s](benchmark::State& st) { naive_forward_bench<Mask, D>(st, s); });
      reg(std::string("bwd/fp32/64x64/") + s.name,
          [&s](benchmark::State& st) { backward_bench<tile_shape<64, 64>, Mask, D, float>(st, s, "fp32"); });
      reg(std::string("bwd/naive/") + s.name, [&s](benchmark::State& st) { naive_backward_bench<Mask, D>(st, s); });
    });
}

}  // namespace

int main(int argc, char** argv) {
  try {
    register_all();
  } catch (const kvtile::error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
