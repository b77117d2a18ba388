// kvtile/attention/cuda/tuning.hpp: every tuning value of the CUDA attention kernels, in one
// place, each with the measurement that chose it (docs/perf-log/prefill.md, decode.md).
//
// These are values, not switches: variants of a pipeline that lost their A/B are deleted from
// the code and live on in the perf log only. Head-dim or architecture dependent values are
// constexpr functions, so a kernel reads `tuning::x(D)` and a reader finds every choice here.
// Plain C++ (no CUDA needed): the planner includes it too.
#pragma once

#include "kvtile/attention/tile_shape.hpp"
#include "kvtile/core/config.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda::tuning {

// ---- prefill, portable mma.sync kernel (sm_80+) ---------------------------------------------

// Default tiles per head dim: tile sweep of bench/prefill_bench.cu on an H100 80GB HBM3 (bf16,
// 16k tokens, hidden 2048), docs/prefill.md. D <= 128: <128, 64, 4, 2>; above: <64, 32, 4, 2>
// (the O accumulators of 32 rows per warp do not fit beside S at D = 256).
template <int HeadDim>
struct prefill_tile {
  using type = tile_shape<128, 64, 4, 2>;
};
template <int HeadDim>
  requires(HeadDim > 128)
struct prefill_tile<HeadDim> {
  using type = tile_shape<64, 32, 4, 2>;
};

// Unroll of the Q K^T k-steps when Q is re-read from shared memory. H100, D = 128,
// <128, 64, 4, 2>, S = 4096: 8 (full) 331.5 TFLOP/s, 2 301.8 (perf-log prefill v4).
inline constexpr int prefill_qk_unroll = 8;

// Largest head dim whose K/V tiles take one barrier (K and V waited together); above it V is
// waited for separately. One barrier lets warps drift (+3-8% at D = 64, H100); at D = 128 the
// split wait measured 319 against 292 TFLOP/s at S = 4096 (perf-log prefill v3). The paged
// append kernel measured the same way (perf-log decode v6).
inline constexpr int prefill_single_barrier_max_d = 64;
inline constexpr int paged_append_single_barrier_max_d = 64;

// ---- backward, portable mma.sync kernels (sm_80+) -------------------------------------------

// Default tiles of the backward (cuda/backward.cuh): BlockKV keys per CTA, 16 per warp, so
// Warps = BlockKV / 16; BlockQ queries per step of the inner loop. A warp keeps dK and dV of its
// 16 keys over at most 128 columns in registers (D / 2 fp32 each) beside S^T and dP^T of BlockQ
// queries (BlockQ / 2 each). Chosen from the compiler's report and occupancy, not yet measured
// (docs/perf-log/backward.md, v1): D <= 64 <64, 64, 4, 2> (233 registers, 64 KB: two CTAs per
// SM); above <32, 64, 4, 2>: at D = 128 it takes 246 registers and 75 KB, so two CTAs (eight
// warps) share an SM, where <64, 64, 4, 2> needs 255 registers with spills and 114 KB, one CTA
// of four warps per SM with nothing to run while it waits at a barrier. D = 256 runs its dK / dV
// columns as two CTAs (backward_max_dkv_cols).
template <int HeadDim>
struct backward_tile {
  using type = tile_shape<32, 64, 4, 2>;
};
template <int HeadDim>
  requires(HeadDim <= 64)
struct backward_tile<HeadDim> {
  using type = tile_shape<64, 64, 4, 2>;
};

// Widest slice of dK / dV columns one CTA accumulates in registers; wider head dims split their
// columns over CTAs that each recompute S and dP (2 CTAs at D = 256).
inline constexpr int backward_max_dkv_cols = 128;

// Keys per step of the Q-outer dQ kernel (deterministic mode): the tile's BlockKV up to D = 128;
// 32 above, so that Q, dO and two K / V slots fit the 163 KB an sm_80 CTA may use at D = 256.
template <int HeadDim, int BlockKV>
inline constexpr int backward_dq_block_kv = HeadDim > 128 && BlockKV > 32 ? 32 : BlockKV;

// ---- backward, Hopper wgmma kernel (sm_90a) -------------------------------------------------

// Warpgroups per CTA of the sm_90a backward (backward/sm90_kernel.cuh), 64 keys each: two share
// the Q / dO tiles of a step (one CTA per SM); one runs two CTAs per SM, which overlap each
// other's waits, for twice the Q / dO loads and dQ reductions per key. Measured on an H200
// (docs/perf-log/backward.md, v4; bf16, S 1k..16k): one is 1.06-1.13x two at D = 64, two is
// 1.06-1.31x one at D = 128. With dQ through TMA reductions (v10), two at D = 64 measured
// 0.98-1.03x one without a mask and 0.92-0.94x causal (v11).
template <int HeadDim>
inline constexpr int backward_sm90_warpgroups = HeadDim <= 64 ? 1 : 2;

// ---- prefill and paged append, Hopper wgmma kernel (sm_90a) ---------------------------------

// Default tiles of the warp-specialised kernel (prefill_sm90/ws_kernel.cuh, TMA producer warp
// plus consumer warpgroups of 64 query rows), from the sweep at S = 4096 full, bf16, on an H200
// (docs/perf-log/prefill.md, sm90 v5): D = 128 <128, 128, 12, 3> 563.8 TFLOP/s (12 x 2 stages
// 555.8, BlockKV 176 / 192 with 2 stages 571.0 / 569.4, causal 483-488 for all three);
// D = 64 <192, 128, 16, 3> 448.9 (three consumer warpgroups; <128, 128, 12, 3> 430.6).
template <int HeadDim>
struct prefill_sm90_tile {
  using type = tile_shape<128, 128, 12, 3>;
};
template <int HeadDim>
  requires(HeadDim <= 64)
struct prefill_sm90_tile<HeadDim> {
  using type = tile_shape<192, 128, 16, 3>;
};
// D = 64 when the longest query sequence of the batch has at most prefill_sm90_short_q tokens:
// <128, 128, 12, 3>. H200, bf16, 16k tokens per call: S 512 / 1024 causal 166.1 / 242.8 TFLOP/s
// against 145.2 / 213.2 for <192, 128, 16, 3> (fewer, emptier 192-row tiles), full 291.1 /
// 360.0 against 289.7 / 344.0; from S 2048 on the 192-row tile wins (causal 310.5-446.6 against
// 307.6-404.7). `void`: no such choice at this head dim.
template <int HeadDim>
struct prefill_sm90_short_tile {
  using type = void;
};
template <int HeadDim>
  requires(HeadDim <= 64)
struct prefill_sm90_short_tile<HeadDim> {
  using type = tile_shape<128, 128, 12, 3>;
};
inline constexpr int prefill_sm90_short_q = 1024;

// D = 256: 64-key tiles and two stages fit (Q 64 KB + 4 x 32 KB); O takes 128 registers of a
// consumer thread's 240.
template <int HeadDim>
  requires(HeadDim > 128)
struct prefill_sm90_tile<HeadDim> {
  using type = tile_shape<128, 64, 12, 2>;
};
// A rotary variant's default: the same, but for D = 64 two consumer warpgroups instead of three
// (<128, 128, 12, 3>): the producer warpgroup rotates K and needs more than 24 registers, and
// what it keeps leaves three consumer warpgroups 152 (spilling, wgmma serialised) instead of 160.
template <int HeadDim>
struct prefill_sm90_rotary_tile : prefill_sm90_tile<HeadDim> {};
template <int HeadDim>
  requires(HeadDim <= 64)
struct prefill_sm90_rotary_tile<HeadDim> {
  using type = tile_shape<128, 128, 12, 3>;
};

// A rotary variant's prefill on Hopper: run() with a workspace rotates Q and K once (a pass, then
// the plain kernel) where the sequences have more keys than this, and lets the warp-specialised
// kernel rotate its tiles in shared memory where they have at most this many. H200, bf16, causal,
// 16k tokens a call (docs/perf-log/composed.md, step 12), TFLOP/s rotated once / in the kernel:
// D 128 S 512 143 / 189, 1k 226 / 256, 2k 319 / 304; D 64 118 / 143, 186 / 197, 255 / 232.
inline constexpr int prefill_rotary_fused_max_kv = 1024;

// The warp-specialised prefill runs persistent CTAs (one per SM walking the work tiles, the next
// tile's Q and K/V loading under the last P V and the epilogue) where the longest query sequence
// has at most this many tokens and there is more than one wave of work tiles. H200, bf16, 16k
// tokens per call, against a CTA per tile (docs/perf-log/prefill.md, sm90 v9): S 512 +4-13%,
// S 1024 +0-4%; from S 2048 on 1-14% slower (29% at D 128 causal 16k): over many rounds the
// CTAs of a static schedule drift apart, and the tiles running at once stop sharing K/V in L2.
inline constexpr int prefill_sm90_persistent_max_q = 1024;

// Default tiles of the cp.async wgmma kernel (prefill_sm90/kernel.cuh), which runs what the TMA
// kernel cannot map (varlen layouts, strided batches): three warpgroups at D = 64 (registers
// allow it), two at D = 128; three stages so that a slot is refilled half a tile after its P V
// was issued (perf-log prefill sm90 v2: +1-5% over waiting P V at once; v3: per-slot mbarriers,
// no CTA barrier, where Stages >= 3).
template <int HeadDim>
struct prefill_sm90_cp_async_tile {
  using type = tile_shape<128, 128, 8, 3>;
};
template <int HeadDim>
  requires(HeadDim <= 64)
struct prefill_sm90_cp_async_tile<HeadDim> {
  using type = tile_shape<192, 128, 12, 3>;
};

// ---- paged decode ----------------------------------------------------------------------------

// K/V stages of the TMA decode kernel at head dims up to 128: 3. Four measured +0-1% and six do
// not fit the persistent layout (perf-log decode v13 and the stage-count experiment after v15).
inline constexpr int decode_sm90_stages = 3;

// Rotary variants on the TMA decode kernel: batches that would run one one-item CTA per SM are
// split until each SM holds two. H200, rotary time / plain time (docs/perf-log/composed.md,
// step 11): 16 x 4k 1.43x with one CTA per SM (ncu: the consumer warps issue-latency bound,
// DRAM at 52 %), 1.09x split in two. Smaller batches stay persistent: 1 x 32k cut into 256
// one-item CTAs ran 1.19x, the persistent runs 1.13x.
inline constexpr bool decode_sm90_rotary_fill = true;
// The same for fp8 pages with per-token scales (H200, 16 x 4k, docs/perf-log/decode.md v22):
// 58.2 -> 47.1 us (0.80 -> 0.66x the bf16 time). Not for per-head scales, where the consumers
// keep up with one CTA per SM: 42.4 -> 45.4 us split in two.
inline constexpr bool decode_sm90_token_scales_fill = true;

// Persistent TMA decode runs (small batches): no CTA runs fewer than decode_runs_min_keys keys
// (1 x 4k bf16: 128 CTAs of four 64-key tiles, the best split in decode.md v12), and a run
// that holds a cut is counted decode_runs_switch_keys longer (an epilogue, a partial state, a
// longer merge: 1 x 32k ran 9 % faster as 128 CTAs of 32 tiles, one piece each, than as 132 of
// 31, decode.md v13). In keys, not tiles: an fp8 tile holds 128 keys, and counted as four
// tiles 1 x 4k fp8 ran on 64 CTAs, one per two SMs, at 0.92x (per-head scales) and 1.10x
// (per-token) the bf16 time (decode.md v21).
inline constexpr int decode_runs_min_keys = 256;
inline constexpr int decode_runs_switch_keys = 256;

// When the merge grid of a split plan starts (sm_90, programmatic dependent launch): 0 after the
// attention grid, 1 as soon as every attention CTA has started, 2 once every decode CTA is past
// its key loop (the append kernels allow it at their start for 1 and 2). perf-log decode v11.
inline constexpr int paged_merge_early = 2;

}  // namespace attention::cuda::tuning
KVTILE_NAMESPACE_END
