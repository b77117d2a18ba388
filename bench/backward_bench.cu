// Attention backward on the GPU (cuda::backward): bf16, D 64 and 128, S 1024..16384, causal and
// not, 16k tokens per call, hidden 2048 (heads = 2048 / D), the atomic dQ (impl=kvtile) and the
// deterministic dQ (impl=kvtile_det), both as run() dispatches them (the sm_90a kernel on
// Hopper), and the mma.sync kernels through run_portable() (impl=kvtile_mma, kvtile_mma_det);
// rotary<Mask> (impl=kvtile_rotary: the plain backward between the rotate pass of Q and K and the
// inverse one of dQ and dK, half-split over every dim, FLOPs counted as the plain rows');
// plus a tile sweep of the mma.sync kernel at S = 4096. The forward's O and LSE are
// computed once, outside the timing. CUDA-event manual time; the counter `value` is TFLOP/s
// (decimal) with FLOPs = 2.5 * the forward's 4 * B * H * S * S * D, halved for causal (the
// count FlashAttention and the PyTorch peers use: the backward's five matrix products against
// the forward's two).
//
//   backward_bench --benchmark_format=json > backward.json
#include <benchmark/benchmark.h>

#include <cstdint>
#include <string>

#include <cuda_runtime.h>

#include "kvtile/attention/cuda/backward.cuh"
#include "kvtile/attention/cuda/prefill.cuh"

namespace {

using namespace kvtile;
using namespace kvtile::attention;
using T = kvtile::bfloat16;

constexpr int tokens = 16384;
constexpr int hidden = 2048;

// Uniform values in [-1, 1) from a hash of the index: fresh, non-zero inputs without a host
// round trip.
__global__ void fill_random(T* x, std::int64_t n, std::uint32_t seed) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    std::uint32_t h = std::uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= h >> 15;
    h *= 0x846ca68bu;
    h ^= h >> 16;
    x[i] = T(float(h >> 8) * (2.f / 16777216.f) - 1.f);
  }
}

struct buffers {
  T *q = nullptr, *k = nullptr, *v = nullptr, *o = nullptr, *d_o = nullptr, *dq = nullptr, *dk = nullptr,
    *dv = nullptr;
  float* lse = nullptr;
  void* workspace = nullptr;
  explicit buffers(std::int64_t elems, std::int64_t rows) {
    for (T** p : {&q, &k, &v, &o, &d_o, &dq, &dk, &dv}) KVTILE_CUDA_CHECK(cudaMalloc(p, elems * sizeof(T)));
    KVTILE_CUDA_CHECK(cudaMalloc(&lse, rows * sizeof(float)));
    std::uint32_t seed = 12345;
    for (T* p : {q, k, v, d_o}) fill_random<<<1024, 256>>>(p, elems, seed++);
    KVTILE_CUDA_CHECK_LAUNCH();
  }
  ~buffers() {
    for (void* p : {(void*)q, (void*)k, (void*)v, (void*)o, (void*)d_o, (void*)dq, (void*)dk, (void*)dv, (void*)lse,
                    workspace})
      cudaFree(p);
  }
};

// Whether a mask (or a rotary variant over it) is causal, for the FLOP count and the label.
template <class M>
constexpr bool is_causal() {
  if constexpr (has_rotary<M>)
    return is_causal<rotary_stripped_t<M>>();
  else
    return !std::is_same_v<M, no_mask>;
}

template <class Kernel>
void run_backward(benchmark::State& state, const std::string& suite, const std::string& impl, bool deterministic,
                  bool portable = false) {
  constexpr int D = Kernel::head_dim;
  using Mask = typename Kernel::mask;
  const int S = int(state.range(0));
  const int B = tokens / S, H = hidden / D;
  constexpr bool causal = is_causal<Mask>();
  buffers buf(std::int64_t(B) * S * H * D, std::int64_t(B) * S * H);
  const ragged_layout l = ragged_layout::fixed(B, S, H, D);

  using fwd = cuda::prefill<T, D, Mask>;
  typename fwd::arguments f;
  f.q = {buf.q, l};
  f.kv = {buf.k, buf.v, l};
  f.o = {buf.o, l};
  f.lse = buf.lse;
  fwd::run(f);

  typename Kernel::arguments args;
  args.q = {buf.q, l};
  args.kv = {buf.k, buf.v, l};
  args.o = {buf.o, l};
  args.d_o = {buf.d_o, l};
  args.lse = buf.lse;
  args.dq = {buf.dq, l};
  args.dk = {buf.dk, l};
  args.dv = {buf.dv, l};
  args.deterministic = deterministic;
  KVTILE_CUDA_CHECK(cudaMalloc(&buf.workspace, Kernel::workspace_size(args)));
  const double flops = 2.5 * 4.0 * B * H * double(S) * S * D * (causal ? 0.5 : 1.0);

  cudaEvent_t start, stop;
  KVTILE_CUDA_CHECK(cudaEventCreate(&start));
  KVTILE_CUDA_CHECK(cudaEventCreate(&stop));
  auto run = [&] {
    if (portable)
      Kernel::run_portable(args, buf.workspace);
    else
      Kernel::run(args, buf.workspace);
  };
  run();  // warm-up: module load, shared-memory attributes
  KVTILE_CUDA_CHECK(cudaDeviceSynchronize());
  const int reps = flops < 1e11 ? 8 : flops < 1e12 ? 2 : 1;
  double total_s = 0;
  for (auto _ : state) {
    KVTILE_CUDA_CHECK(cudaEventRecord(start));
    for (int r = 0; r < reps; ++r) run();
    KVTILE_CUDA_CHECK(cudaEventRecord(stop));
    KVTILE_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    KVTILE_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    const double s = ms * 1e-3 / reps;
    total_s += s;
    state.SetIterationTime(s);
  }
  KVTILE_CUDA_CHECK(cudaEventDestroy(start));
  KVTILE_CUDA_CHECK(cudaEventDestroy(stop));
  const double tflops = flops * double(state.iterations()) / total_s / 1e12;
  state.counters["value"] = tflops;
  state.counters["TFLOP/s"] = tflops;
  const std::string shape = "bf16 D" + std::to_string(D) + " S" + std::to_string(S) + " B" + std::to_string(B) + " H" +
                            std::to_string(H) + (causal ? " causal" : " full");
  state.SetLabel("suite=" + suite + ";shape=" + shape + ";impl=" + impl + ";unit=TFLOP/s");
}

template <int D, class Mask>
void grid_row(benchmark::State& state) {
  run_backward<cuda::backward<T, D, Mask>>(state, "backward", "kvtile", false);
}

template <int D, class Mask>
void grid_row_det(benchmark::State& state) {
  run_backward<cuda::backward<T, D, Mask>>(state, "backward", "kvtile_det", true);
}

template <int D, class Mask>
void grid_row_mma(benchmark::State& state) {
  run_backward<cuda::backward<T, D, Mask>>(state, "backward", "kvtile_mma", false, true);
}

template <int D, class Mask>
void grid_row_mma_det(benchmark::State& state) {
  run_backward<cuda::backward<T, D, Mask>>(state, "backward", "kvtile_mma_det", true, true);
}

template <int D, class Mask>
void grid_row_rotary(benchmark::State& state) {
  run_backward<cuda::backward<T, D, rotary<Mask>>>(state, "backward", "kvtile_rotary", false);
}

template <int D, class Mask, int BQ, int BKV, int W>
void tile_row(benchmark::State& state) {
  run_backward<cuda::backward<T, D, Mask, tile_shape<BQ, BKV, W, 2>>>(
      state, "backward_tiles", "tile_" + std::to_string(BQ) + "x" + std::to_string(BKV) + "x" + std::to_string(W),
      false);
}

void grid_args(benchmark::internal::Benchmark* b) {
  for (int s = 1024; s <= 16384; s *= 2) b->Arg(s);
  b->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.2);
}
void sweep_args(benchmark::internal::Benchmark* b) {
  b->Arg(4096)->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.2);
}

}  // namespace

BENCHMARK(grid_row<64, no_mask>)->Apply(grid_args);
BENCHMARK(grid_row<64, causal_mask>)->Apply(grid_args);
BENCHMARK(grid_row<128, no_mask>)->Apply(grid_args);
BENCHMARK(grid_row<128, causal_mask>)->Apply(grid_args);
BENCHMARK(grid_row_rotary<64, no_mask>)->Apply(grid_args);
BENCHMARK(grid_row_rotary<64, causal_mask>)->Apply(grid_args);
BENCHMARK(grid_row_rotary<128, no_mask>)->Apply(grid_args);
BENCHMARK(grid_row_rotary<128, causal_mask>)->Apply(grid_args);
BENCHMARK(grid_row_det<64, no_mask>)->Apply(grid_args);
BENCHMARK(grid_row_det<64, causal_mask>)->Apply(grid_args);
BENCHMARK(grid_row_det<128, no_mask>)->Apply(grid_args);
BENCHMARK(grid_row_det<128, causal_mask>)->Apply(grid_args);
BENCHMARK(grid_row_mma<64, no_mask>)->Apply(grid_args);
BENCHMARK(grid_row_mma<64, causal_mask>)->Apply(grid_args);
BENCHMARK(grid_row_mma<128, no_mask>)->Apply(grid_args);
BENCHMARK(grid_row_mma<128, causal_mask>)->Apply(grid_args);
BENCHMARK(grid_row_mma_det<64, no_mask>)->Apply(grid_args);
BENCHMARK(grid_row_mma_det<64, causal_mask>)->Apply(grid_args);
BENCHMARK(grid_row_mma_det<128, no_mask>)->Apply(grid_args);
BENCHMARK(grid_row_mma_det<128, causal_mask>)->Apply(grid_args);

// Tile sweep at S = 4096 (B = 4), <BlockQ, BlockKV, Warps> (BlockKV = 16 * Warps, Stages 2).
// Defaults: <64, 64, 4> at D = 64, <32, 64, 4> at D = 128.
BENCHMARK(tile_row<64, no_mask, 64, 64, 4>)->Apply(sweep_args);
BENCHMARK(tile_row<64, no_mask, 128, 64, 4>)->Apply(sweep_args);
BENCHMARK(tile_row<64, no_mask, 64, 128, 8>)->Apply(sweep_args);
BENCHMARK(tile_row<64, no_mask, 128, 128, 8>)->Apply(sweep_args);
BENCHMARK(tile_row<64, causal_mask, 64, 128, 8>)->Apply(sweep_args);
BENCHMARK(tile_row<128, no_mask, 64, 64, 4>)->Apply(sweep_args);
BENCHMARK(tile_row<128, no_mask, 32, 64, 4>)->Apply(sweep_args);
BENCHMARK(tile_row<128, no_mask, 64, 128, 8>)->Apply(sweep_args);
BENCHMARK(tile_row<128, no_mask, 32, 128, 8>)->Apply(sweep_args);
BENCHMARK(tile_row<128, causal_mask, 64, 128, 8>)->Apply(sweep_args);

BENCHMARK_MAIN();
