// Prefill (forward) attention on the GPU: the grid of ../shared ANCHORS (bf16, D 64 and 128,
// S 512..16384, causal and not, 16k tokens per batch, hidden 2048 so heads = 2048 / D), and a
// tile-shape sweep. impl=kvtile is cuda::prefill::run (on Hopper: the sm_90a wgmma kernel for
// D 64 / 128), kvtile_mma its mma.sync kernel (run_portable), kvtile_sm90 cuda::prefill_sm90.
// CUDA-event manual time; the counter `value` is TFLOP/s (decimal) with
// FLOPs = 4 * B * H * S * S * D, halved for causal (the count PyTorch peers use).
//
//   prefill_bench --benchmark_format=json > prefill.json
#include <benchmark/benchmark.h>

#include <cstdint>
#include <string>

#include <cuda_runtime.h>

#include "kvtile/attention/cuda/prefill.cuh"
#include "kvtile/attention/cuda/prefill_sm90.cuh"

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
  T *q = nullptr, *k = nullptr, *v = nullptr, *o = nullptr;
  float* lse = nullptr;
  explicit buffers(std::int64_t elems, std::int64_t rows) {
    for (T** p : {&q, &k, &v, &o}) KVTILE_CUDA_CHECK(cudaMalloc(p, elems * sizeof(T)));
    KVTILE_CUDA_CHECK(cudaMalloc(&lse, rows * sizeof(float)));
    std::uint32_t seed = 12345;
    for (T* p : {q, k, v}) fill_random<<<1024, 256>>>(p, elems, seed++);
    KVTILE_CUDA_CHECK_LAUNCH();
  }
  ~buffers() {
    for (void* p : {(void*)q, (void*)k, (void*)v, (void*)o, (void*)lse}) cudaFree(p);
  }
};

template <class Kernel>
void run_prefill(benchmark::State& state, const std::string& suite, const std::string& impl,
                 typename Kernel::mask::params mask_params = {}) {
  constexpr int D = Kernel::head_dim;
  const int S = int(state.range(0));
  const int B = tokens / S, H = hidden / D;
  const bool causal = !std::is_same_v<typename Kernel::mask, no_mask>;
  buffers buf(std::int64_t(B) * S * H * D, std::int64_t(B) * S * H);
  const ragged_layout l = ragged_layout::fixed(B, S, H, D);
  typename Kernel::arguments args;
  args.q = {buf.q, l};
  args.kv = {buf.k, buf.v, l};
  args.o = {buf.o, l};
  args.lse = buf.lse;
  args.mask_params = mask_params;
  // The workspace the kernel asks for (a rotary variant's rotated Q and K; none otherwise).
  void* ws = nullptr;
  if (const std::size_t bytes = Kernel::workspace_size(args)) KVTILE_CUDA_CHECK(cudaMalloc(&ws, bytes));
  const double flops = 4.0 * B * H * double(S) * S * D * (causal ? 0.5 : 1.0);

  cudaEvent_t start, stop;
  KVTILE_CUDA_CHECK(cudaEventCreate(&start));
  KVTILE_CUDA_CHECK(cudaEventCreate(&stop));
  Kernel::run(args, ws);  // warm-up: module load, shared-memory attribute
  KVTILE_CUDA_CHECK(cudaDeviceSynchronize());
  // Launches per timed iteration so that one iteration lasts about a millisecond or more.
  const int reps = flops < 1e11 ? 8 : flops < 1e12 ? 2 : 1;
  double total_s = 0;
  for (auto _ : state) {
    KVTILE_CUDA_CHECK(cudaEventRecord(start));
    for (int r = 0; r < reps; ++r) Kernel::run(args, ws);
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
  cudaFree(ws);
  const double tflops = flops * double(state.iterations()) / total_s / 1e12;
  state.counters["value"] = tflops;
  state.counters["TFLOP/s"] = tflops;
  const std::string shape = "bf16 D" + std::to_string(D) + " S" + std::to_string(S) + " B" + std::to_string(B) + " H" +
                            std::to_string(H) + (causal ? " causal" : " full");
  state.SetLabel("suite=" + suite + ";shape=" + shape + ";impl=" + impl + ";unit=TFLOP/s");
}

template <int D, class Mask>
void grid_row(benchmark::State& state) {
  run_prefill<cuda::prefill<T, D, Mask>>(state, "prefill", "kvtile");
}

// cuda::prefill forced onto its mma.sync kernel (run_portable): on Hopper, run() dispatches
// the default tiles to the sm_90a kernel, so impl=kvtile is that one and kvtile_mma this one.
template <class K>
struct mma_sync_path : K {
  static void run(const typename K::arguments& a, void* ws) { K::run_portable(a, ws); }
};

template <int D, class Mask>
void grid_row_mma(benchmark::State& state) {
  run_prefill<mma_sync_path<cuda::prefill<T, D, Mask>>>(state, "prefill", "kvtile_mma");
}

// A rotary variant (half-split, every dim, theta 10000). grid_row_rotary: run() with its
// workspace, Q and K rotated once into it, then the prefill without the rotation (the sm_90a
// kernel on Hopper): compare with grid_row. grid_row_rotary_fused: run() without a workspace,
// the kernel rotating each tile in shared memory as it arrives (on Hopper the warp-specialised
// sm_90a kernel, its producer warps rotating K): compare with grid_row. grid_row_rotary_mma: the
// mma.sync kernel rotating in shared memory: compare with grid_row_mma.
template <class K>
struct no_workspace : K {
  static std::size_t workspace_size(const typename K::arguments&) { return 0; }
  static void run(const typename K::arguments& a, void*) { K::run(a, nullptr); }
};
template <int D, class Mask>
void grid_row_rotary(benchmark::State& state) {
  run_prefill<cuda::prefill<T, D, rotary<Mask>>>(state, "prefill", "kvtile_rotary");
}
template <int D, class Mask>
void grid_row_rotary_fused(benchmark::State& state) {
  run_prefill<no_workspace<cuda::prefill<T, D, rotary<Mask>>>>(state, "prefill", "kvtile_rotary_fused");
}
// Partial rotary, the first quarter of the dims (GPT-NeoX's rotary_pct 0.25), in the kernel.
template <int D, class Mask>
void grid_row_rotary_quarter_fused(benchmark::State& state) {
  typename rotary<Mask>::params p;
  p.rotary_dim = D / 4;
  run_prefill<no_workspace<cuda::prefill<T, D, rotary<Mask>>>>(state, "prefill", "kvtile_rotary_quarter_fused", p);
}
template <int D, class Mask>
void grid_row_rotary_mma(benchmark::State& state) {
  run_prefill<mma_sync_path<no_workspace<cuda::prefill<T, D, rotary<Mask>>>>>(state, "prefill", "kvtile_mma_rotary");
}

alignas(16) unsigned char probe_buffer[512];

// The Hopper wgmma kernel (prefill_sm90.cuh), same grid; skipped where it cannot run.
template <int D, class Mask>
void grid_row_sm90(benchmark::State& state) {
  using K = cuda::prefill_sm90<T, D, Mask>;
  typename K::arguments probe;
  probe.q = {reinterpret_cast<const T*>(probe_buffer), ragged_layout::fixed(1, 1, 1, D)};
  probe.kv = {reinterpret_cast<const T*>(probe_buffer), reinterpret_cast<const T*>(probe_buffer),
              ragged_layout::fixed(1, 1, 1, D)};
  probe.o = {reinterpret_cast<T*>(probe_buffer), ragged_layout::fixed(1, 1, 1, D)};
  if (!K::can_implement(probe)) {
    state.SkipWithError("prefill_sm90: no compute capability 9.x device with sm_90a code");
    return;
  }
  run_prefill<K>(state, "prefill", "kvtile_sm90");
}

template <int D, class Mask, int BQ, int BKV, int W, int S>
void tile_row_sm90(benchmark::State& state) {
  run_prefill<cuda::prefill_sm90<T, D, Mask, tile_shape<BQ, BKV, W, S>>>(
      state, "prefill_tiles",
      "sm90_tile_" + std::to_string(BQ) + "x" + std::to_string(BKV) + "x" + std::to_string(W) + "x" + std::to_string(S));
}

template <int D, class Mask, int BQ, int BKV, int W, int S>
void tile_row(benchmark::State& state) {
  run_prefill<cuda::prefill<T, D, Mask, tile_shape<BQ, BKV, W, S>>>(
      state, "prefill_tiles",
      "tile_" + std::to_string(BQ) + "x" + std::to_string(BKV) + "x" + std::to_string(W) + "x" + std::to_string(S));
}

void grid_args(benchmark::internal::Benchmark* b) {
  for (int s = 512; s <= 16384; s *= 2) b->Arg(s);
  b->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.2);
}
void sweep_args(benchmark::internal::Benchmark* b) {
  b->Arg(4096)->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.2);
}

}  // namespace

// The grid, with the default tile of each head dim.
BENCHMARK(grid_row<64, no_mask>)->Apply(grid_args);
BENCHMARK(grid_row<64, causal_mask>)->Apply(grid_args);
BENCHMARK(grid_row<128, no_mask>)->Apply(grid_args);
BENCHMARK(grid_row<128, causal_mask>)->Apply(grid_args);

BENCHMARK(grid_row_mma<64, no_mask>)->Apply(grid_args);
BENCHMARK(grid_row_mma<64, causal_mask>)->Apply(grid_args);
BENCHMARK(grid_row_mma<128, no_mask>)->Apply(grid_args);
BENCHMARK(grid_row_mma<128, causal_mask>)->Apply(grid_args);
BENCHMARK(grid_row_rotary<64, causal_mask>)->Apply(grid_args);
BENCHMARK(grid_row_rotary<128, causal_mask>)->Apply(grid_args);
BENCHMARK(grid_row_rotary_fused<64, causal_mask>)->Apply(grid_args);
BENCHMARK(grid_row_rotary_fused<128, causal_mask>)->Apply(grid_args);
BENCHMARK(grid_row_rotary_quarter_fused<128, causal_mask>)->Apply(grid_args);
BENCHMARK(grid_row_rotary_mma<64, causal_mask>)->Apply(grid_args);
BENCHMARK(grid_row_rotary_mma<128, causal_mask>)->Apply(grid_args);
BENCHMARK(grid_row_sm90<64, no_mask>)->Apply(grid_args);
BENCHMARK(grid_row_sm90<64, causal_mask>)->Apply(grid_args);
BENCHMARK(grid_row_sm90<128, no_mask>)->Apply(grid_args);
BENCHMARK(grid_row_sm90<128, causal_mask>)->Apply(grid_args);

// Tile sweep at S = 4096 (B = 4): which tiles win on this card. <BlockQ, BlockKV, Warps, Stages>.
BENCHMARK(tile_row<64, no_mask, 128, 64, 4, 2>)->Apply(sweep_args);
BENCHMARK(tile_row<64, no_mask, 128, 128, 4, 2>)->Apply(sweep_args);
BENCHMARK(tile_row<64, no_mask, 128, 64, 4, 3>)->Apply(sweep_args);
BENCHMARK(tile_row<64, no_mask, 128, 64, 8, 2>)->Apply(sweep_args);
BENCHMARK(tile_row<64, no_mask, 64, 64, 4, 2>)->Apply(sweep_args);
BENCHMARK(tile_row<64, causal_mask, 128, 128, 4, 2>)->Apply(sweep_args);
BENCHMARK(tile_row<64, causal_mask, 128, 64, 8, 2>)->Apply(sweep_args);
BENCHMARK(tile_row<128, no_mask, 128, 64, 4, 2>)->Apply(sweep_args);
BENCHMARK(tile_row<128, no_mask, 128, 32, 4, 2>)->Apply(sweep_args);
BENCHMARK(tile_row<128, no_mask, 64, 64, 4, 2>)->Apply(sweep_args);
BENCHMARK(tile_row<128, no_mask, 128, 64, 8, 2>)->Apply(sweep_args);
BENCHMARK(tile_row<128, no_mask, 128, 128, 8, 2>)->Apply(sweep_args);
BENCHMARK(tile_row<128, no_mask, 256, 64, 8, 2>)->Apply(sweep_args);
BENCHMARK(tile_row<128, causal_mask, 128, 32, 4, 2>)->Apply(sweep_args);
BENCHMARK(tile_row<128, causal_mask, 128, 64, 8, 2>)->Apply(sweep_args);
// Warp-specialised sm_90a tiles (the defaults: tuning.hpp): <64 * C, BlockKV, 4 * (C + 1),
// Stages> with C consumer warpgroups.
BENCHMARK(tile_row_sm90<64, no_mask, 128, 128, 12, 2>)->Apply(sweep_args);
BENCHMARK(tile_row_sm90<64, no_mask, 128, 128, 12, 3>)->Apply(sweep_args);
BENCHMARK(tile_row_sm90<64, no_mask, 128, 128, 12, 4>)->Apply(sweep_args);
BENCHMARK(tile_row_sm90<64, no_mask, 128, 176, 12, 3>)->Apply(sweep_args);
BENCHMARK(tile_row_sm90<64, no_mask, 128, 192, 12, 3>)->Apply(sweep_args);
BENCHMARK(tile_row_sm90<64, no_mask, 192, 128, 16, 3>)->Apply(sweep_args);
BENCHMARK(tile_row_sm90<64, no_mask, 64, 128, 8, 3>)->Apply(sweep_args);
BENCHMARK(tile_row_sm90<64, causal_mask, 128, 128, 12, 3>)->Apply(sweep_args);
BENCHMARK(tile_row_sm90<64, causal_mask, 128, 176, 12, 3>)->Apply(sweep_args);
BENCHMARK(tile_row_sm90<128, no_mask, 128, 128, 12, 2>)->Apply(sweep_args);
BENCHMARK(tile_row_sm90<128, no_mask, 128, 128, 12, 3>)->Apply(sweep_args);
BENCHMARK(tile_row_sm90<128, no_mask, 128, 176, 12, 2>)->Apply(sweep_args);
BENCHMARK(tile_row_sm90<128, no_mask, 128, 192, 12, 2>)->Apply(sweep_args);
BENCHMARK(tile_row_sm90<128, no_mask, 128, 64, 12, 3>)->Apply(sweep_args);
BENCHMARK(tile_row_sm90<128, no_mask, 64, 128, 8, 3>)->Apply(sweep_args);
BENCHMARK(tile_row_sm90<128, causal_mask, 128, 128, 12, 2>)->Apply(sweep_args);
BENCHMARK(tile_row_sm90<128, causal_mask, 128, 128, 12, 3>)->Apply(sweep_args);
BENCHMARK(tile_row_sm90<128, causal_mask, 128, 176, 12, 2>)->Apply(sweep_args);
BENCHMARK(tile_row_sm90<256, no_mask, 128, 64, 12, 2>)->Apply(sweep_args);
BENCHMARK(tile_row_sm90<256, no_mask, 64, 64, 8, 2>)->Apply(sweep_args);
BENCHMARK(tile_row_sm90<256, no_mask, 64, 64, 8, 3>)->Apply(sweep_args);
BENCHMARK(tile_row_sm90<256, causal_mask, 128, 64, 12, 2>)->Apply(sweep_args);
BENCHMARK(tile_row<256, no_mask, 64, 32, 4, 2>)->Apply(sweep_args);  // the mma.sync default at D 256
// cp.async sm_90a kernel tiles (its defaults: D=64 192x128x12x3, D=128 128x128x8x3).
BENCHMARK(tile_row_sm90<64, no_mask, 128, 128, 8, 2>)->Apply(sweep_args);
BENCHMARK(tile_row_sm90<64, no_mask, 192, 128, 12, 2>)->Apply(sweep_args);
BENCHMARK(tile_row_sm90<64, no_mask, 192, 128, 12, 3>)->Apply(sweep_args);
BENCHMARK(tile_row_sm90<128, no_mask, 128, 64, 8, 2>)->Apply(sweep_args);
BENCHMARK(tile_row_sm90<128, no_mask, 128, 128, 8, 2>)->Apply(sweep_args);
BENCHMARK(tile_row_sm90<128, no_mask, 128, 128, 8, 3>)->Apply(sweep_args);
BENCHMARK(tile_row_sm90<128, no_mask, 192, 64, 12, 2>)->Apply(sweep_args);

BENCHMARK_MAIN();
