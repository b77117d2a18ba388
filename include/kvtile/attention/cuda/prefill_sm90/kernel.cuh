// kvtile/attention/cuda/prefill_sm90/kernel.cuh: the device side of the Hopper (sm_90a) prefill
// attention kernel. One CTA owns BlockQ = 64 * W query rows of one (sequence, query head) and
// runs W warpgroups (4 warps each); warpgroup w owns query rows [64 w, 64 w + 64).
//
// Q, K and V tiles sit in shared memory in the 128-byte swizzled layout (arch/wgmma.cuh),
// loaded by every thread with cp.async through a Stages-deep ring (K and V of a tile signalled
// separately, so P V waits for V only). With Stages >= 3 the ring is synchronised by per-slot
// mbarriers (full: the copies landed; empty: every thread's P V on the slot completed) and the
// main loop has no CTA-wide barrier; with 2 stages, two __syncthreads per tile. Per K/V tile
// and warpgroup:
//   S = Q K^T      wgmma m64n{BlockKV}k16, A = Q and B = K from shared memory (K-major)
//   softmax        on the accumulator fragments in registers (exp2, scale folded in one FFMA),
//                  through kvtile's softmax_state
//   O += P V       wgmma m64n{D}k16, A = P converted to 16-bit registers, B = V from shared
//                  memory (MN-major, transpose bit)
// With lane = 4g + t of warp q of a warpgroup, a thread holds rows 16q + g and 16q + g + 8 of
// the warpgroup's 64: two softmax states, each over the thread's D / 4 output columns.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "kvtile/attention/cuda/arch/cp_async.cuh"
#include "kvtile/attention/cuda/arch/cp_async_shared.cuh"
#include "kvtile/attention/cuda/arch/mbarrier.cuh"
#include "kvtile/attention/cuda/arch/mma.cuh"
#include "kvtile/attention/cuda/arch/wgmma.cuh"
#include "kvtile/attention/cuda/prefill/kernel.cuh"
#include "kvtile/attention/cuda/scores.cuh"
#include "kvtile/attention/cuda/tuning.hpp"
#include "kvtile/attention/dense_view.hpp"
#include "kvtile/attention/mask.hpp"
#include "kvtile/attention/softmax_state.hpp"
#include "kvtile/attention/tile_shape.hpp"
#include "kvtile/core/cuda_check.cuh"
#include "kvtile/core/error.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda::detail {

// Default tile of this (cp.async) sm_90a kernel: tuning.hpp. The warp-specialised kernel's
// (ws_kernel.cuh) is sm90_default_tile_t.
template <int D>
using sm90_cp_async_default_tile_t = typename tuning::prefill_sm90_cp_async_tile<D>::type;
template <int D>
using sm90_default_tile_t = typename tuning::prefill_sm90_tile<D>::type;

// Whether the sm_90a kernel takes head dim D with tile Tile: the geometry's rules below, as a
// value the dispatch asks (cuda::prefill runs a user's tile on this kernel whenever it can).
template <int D, class Tile>
inline constexpr bool prefill_sm90_tile_ok = (D == 64 || D == 128) && Tile::warps % 4 == 0 &&
                                             Tile::block_q == 16 * Tile::warps &&
                                             (Tile::block_kv == 64 || Tile::block_kv == 128) && Tile::stages >= 2;

template <class T, int D, class Tile>
struct prefill_sm90_geometry {
  static constexpr int block_q = Tile::block_q;
  static constexpr int block_kv = Tile::block_kv;
  static constexpr int warps = Tile::warps;
  static constexpr int stages = Tile::stages;
  static constexpr int threads = Tile::threads;
  static constexpr int warpgroups = warps / 4;

  static_assert(D == 64 || D == 128, "prefill_sm90: head dim must be 64 or 128");
  static_assert(warps % 4 == 0 && warps >= 4, "prefill_sm90: Warps must be a multiple of 4 (whole warpgroups)");
  static_assert(block_q == 64 * warpgroups, "prefill_sm90: BlockQ must be 64 * Warps / 4 (64 rows per warpgroup)");
  static_assert(block_kv == 64 || block_kv == 128, "prefill_sm90: BlockKV must be 64 or 128");
  static_assert(stages >= 2, "prefill_sm90: Stages must be at least 2");

  // P V stays in flight across the next tile's barrier and Q K^T (waited with S), so a slot is
  // refilled after the second barrier of the next tile. Per-slot mbarriers replace the CTA-wide
  // barriers of the main loop where Stages >= 3 (a slot is refilled two tiles after its last
  // use); with two stages, two __syncthreads per tile (perf-log prefill sm90 v2, v3).
  static constexpr bool use_mbarriers = stages >= 3;

  static constexpr int chunks = D / 8;  // 16-byte chunks per row
  static constexpr int d_steps = D / 16;
  static constexpr int kv_steps = block_kv / 16;
  static constexpr int s_regs = block_kv / 2;  // S accumulators per thread
  static constexpr int o_regs = D / 2;         // O accumulators per thread
  static constexpr std::uint32_t q_bytes = std::uint32_t(block_q) * D * sizeof(T);
  static constexpr std::uint32_t kv_bytes = std::uint32_t(block_kv) * D * sizeof(T);  // one K or V tile
  // + 1024: the dynamic shared-memory base is rounded up to the swizzle atom.
  static constexpr std::size_t smem_bytes = q_bytes + 2 * std::size_t(stages) * kv_bytes + 1024 +
                                            (use_mbarriers ? 3 * 8 * stages : 0);
};

// The rows a thread copies of a Rows-row tile: r0 + i * step for i < count, r0 = tid / chunks
// (one 16-byte chunk column per thread). A thread's rows share one swizzle phase.
template <class G, int Rows>
struct row_share {
  static constexpr int step = G::threads / G::chunks;
  static constexpr int count = (Rows + step - 1) / step;
  static_assert(G::threads % G::chunks == 0 && step % 8 == 0, "prefill_sm90: a thread's rows must share one swizzle phase");
  KVTILE_DEVICE KVTILE_FORCEINLINE static int first_row(int tid) { return tid / G::chunks; }
  KVTILE_DEVICE KVTILE_FORCEINLINE static bool in_tile(int i, int tid) { return Rows % step == 0 || first_row(tid) + i * step < Rows; }
};

// One thread's share of copying a Rows-row tile of rows `stride` elements apart, global -> an
// SW128 tile in shared memory, with 16-byte cp.async; rows at or past `valid_rows` are
// zero-filled (nothing is read). Kept apart from copy_rows_sw128 below on purpose: written as
// per-row offsets, this strided walk cost the dense kernel ~15% (docs/perf-log/prefill.md, v4).
template <class T, class G, int Rows>
KVTILE_DEVICE KVTILE_FORCEINLINE void load_tile_sw128(std::uint32_t smem, const T* gmem, std::int64_t stride,
                                                      int valid_rows, int tid) {
  using R = row_share<G, Rows>;
  const int r0 = R::first_row(tid), c = tid % G::chunks;
  const T* src = gmem + r0 * stride + c * 8;
  const std::int64_t src_step = R::step * stride;
  const std::uint32_t dst = smem + arch::sw128_offset(Rows, r0, c);
  KVTILE_PRAGMA_UNROLL
  for (int i = 0; i < R::count; ++i) {
    if (R::in_tile(i, tid)) {
      const bool ok = r0 + i * R::step < valid_rows;
      arch::cp_async_16_to(dst + i * R::step * 128, ok ? src : gmem, ok);
    }
    src += src_step;
  }
}

// One thread's share of copying a Rows-row tile global -> an SW128 tile in shared memory with
// 16-byte cp.async: its row i starts at base + row_offset(i) (elements); rows at or past
// `valid_rows` are zero-filled (nothing is read).
template <class T, class G, int Rows, class RowOffset>
KVTILE_DEVICE KVTILE_FORCEINLINE void copy_rows_sw128(std::uint32_t smem, const T* base, RowOffset&& row_offset,
                                                      int valid_rows, int tid) {
  using R = row_share<G, Rows>;
  const int r0 = R::first_row(tid), c = tid % G::chunks;
  const std::uint32_t dst = smem + arch::sw128_offset(Rows, r0, c);
  KVTILE_PRAGMA_UNROLL
  for (int i = 0; i < R::count; ++i) {
    if (R::in_tile(i, tid)) {
      const bool ok = r0 + i * R::step < valid_rows;
      arch::cp_async_16_to(dst + i * R::step * 128, ok ? base + row_offset(i) + c * 8 : base, ok);
    }
  }
}

// ---- the softmax on a wgmma score fragment, shared by both sm_90a mainloops ----------------
// A thread holds rows g and g + 8 (half 0 and 1) of its warp's 16 and, per 8-key group j,
// columns 8j + 2t + {0, 1}: s[4j + 2 half + {0, 1}] (arch/wgmma.cuh).

// The row's max over the tile (its quad of lanes reduced).
template <int N>
KVTILE_DEVICE KVTILE_FORCEINLINE float fragment_row_max(const float (&s)[N], int half) {
  float mx = neg_inf;
  KVTILE_PRAGMA_UNROLL
  for (int j = 0; j < N / 4; ++j) mx = max_f(mx, max_f(s[4 * j + 2 * half], s[4 * j + 2 * half + 1]));
  mx = max_f(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  return max_f(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
}
// s <- exp2(s * scale_log2 - base) over the row's columns of this lane; returns their sum (the
// quad is summed once, at the end of the row).
template <int N>
KVTILE_DEVICE KVTILE_FORCEINLINE float fragment_row_exp2(float (&s)[N], int half, float scale_log2, float base) {
  float sum = 0.f;
  KVTILE_PRAGMA_UNROLL
  for (int j = 0; j < N / 4; ++j)
    KVTILE_PRAGMA_UNROLL
    for (int c = 0; c < 2; ++c) {
      float& x = s[4 * j + 2 * half + c];
      x = arch::fast_exp2(fmaf(x, scale_log2, -base));
      sum += x;
    }
  return sum;
}
// P (fp32 in the score fragment) as the register A fragments of P V's 16-key steps.
template <class T, int N>
KVTILE_DEVICE KVTILE_FORCEINLINE void fragment_to_a(const float (&s)[N], std::uint32_t (&pa)[N / 8][4]) {
  KVTILE_PRAGMA_UNROLL
  for (int j = 0; j < N / 8; ++j) {
    pa[j][0] = arch::pack2<T>(s[8 * j + 0], s[8 * j + 1]);
    pa[j][1] = arch::pack2<T>(s[8 * j + 2], s[8 * j + 3]);
    pa[j][2] = arch::pack2<T>(s[8 * j + 4], s[8 * j + 5]);
    pa[j][3] = arch::pack2<T>(s[8 * j + 6], s[8 * j + 7]);
  }
}

// What the sm_90a attention core reads and writes, for one CTA: a policy object built by the
// kernel entry (dense_sm90_source below for cuda::prefill, paged::append_sm90_source for paged
// K/V). It provides
//   rows, kv_lo, kv_hi, kv_limit, mask   the CTA's valid query rows [0, rows), its key range, the
//                                        end of loadable keys (later ones are zero and masked)
//   token(r)                             query position (mask row) of CTA row r
//   load_q(smem)                         this thread's cp.async of the Q tile
//   load_kv(k_smem, v_smem, k0, between) this thread's cp.async of the K, then (after calling
//                                        between()) the V tile of the keys at k0
//   prefetch(k0)                         the tile at k0 is fetched next (k0 < 0: none)
//   store(r, o, lse, t)                  normalised output of CTA row r: o[2j], o[2j + 1] are
//                                        columns 8j + 2t, 8j + 2t + 1; lse in natural log
template <class T, int D, class Tile, class Mask>
struct sm90_attention_core {
  using G = prefill_sm90_geometry<T, D, Tile>;
  using state = softmax_state<D / 4>;  // one row, this thread's D/4 columns
  using qk_op = arch::wgmma_op<T, G::block_kv>;
  using pv_op = arch::wgmma_op<T, D>;

  template <class Source>
  static KVTILE_DEVICE void run(Source& src, unsigned char* smem_raw) {
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, t = lane % 4;
    const int wg = warp / 4, wq = warp % 4;
    const Mask mask = src.mask;
    const int rows = src.rows;
    const int q0 = src.token(0), q1 = src.token(rows - 1) + 1;  // the CTA's query positions
    const int kv_lo = src.kv_lo, kv_hi = src.kv_hi, kv_limit = src.kv_limit;
    const int n_tiles = kv_hi > kv_lo ? (kv_hi - kv_lo + G::block_kv - 1) / G::block_kv : 0;

    // Shared memory (32-bit shared-window byte addresses), 1024-byte aligned tiles.
    const std::uint32_t raw = arch::smem_addr(smem_raw);
    const std::uint32_t q_base = (raw + 1023u) & ~1023u;               // [block_q rows] SW128
    const std::uint32_t k_base = q_base + G::q_bytes;                  // [stages][block_kv rows]
    const std::uint32_t v_base = k_base + G::stages * G::kv_bytes;     // [stages][block_kv rows]

    auto next_tile = [&](int i) {
      while (i < n_tiles && mask.classify(q0, q1, kv_lo + i * G::block_kv, kv_lo + (i + 1) * G::block_kv) ==
                                tile_visibility::empty)
        ++i;
      return i;
    };
    auto tile_start = [&](int i) { return i < n_tiles ? kv_lo + i * G::block_kv : -1; };
    // K and V of visible tile i into ring slot `stage`; then the next fetch is announced.
    auto copy_kv = [&](int i, int stage, auto&& between) {
      src.load_kv(k_base + stage * G::kv_bytes, v_base + stage * G::kv_bytes, kv_lo + i * G::block_kv, between);
    };
    auto fetch_tile = [&](int i, int stage) {
      if (i < n_tiles) copy_kv(i, stage, [] { arch::cp_async_commit(); });
      else arch::cp_async_commit();
      arch::cp_async_commit();
    };
    auto load_q = [&] { src.load_q(q_base); };

    state st[2];  // rows g and g + 8 of this warp's 16
    st[0].init();
    st[1].init();

    const int wr0 = wg * 64, wr1 = min_i(wr0 + 64, rows);  // this warpgroup's CTA rows
    const int wq0 = wr0 < wr1 ? src.token(wr0) : 0, wq1 = wr0 < wr1 ? src.token(wr1 - 1) + 1 : 0;
    const int row_local = wr0 + wq * 16 + g;  // this thread's rows: row_local, row_local + 8
    const int row_pos[2] = {src.token(row_local), src.token(row_local + 8)};
    const float scale_log2 = softmax_scale_log2<Mask>(src.scale_log2);
    // Q descriptor base of this warpgroup: its 64 rows inside each column block.
    const std::uint32_t q_wg = q_base + wg * 64 * 128;
    constexpr std::uint32_t sbo = 1024;

    // O accumulators in the wgmma fragment layout; between tiles they are moved into the two
    // softmax states (free after register allocation) so that softmax_state does the rescale.
    float o[G::o_regs];
    KVTILE_PRAGMA_UNROLL
    for (int x = 0; x < G::o_regs; ++x) o[x] = 0.f;
    arch::fence_operands(o);  // zeroed in the accumulator registers, before any branch
    auto o_to_states = [&] {
      KVTILE_PRAGMA_UNROLL
      for (int j = 0; j < D / 8; ++j) {
        st[0].o[2 * j] = o[4 * j + 0];
        st[0].o[2 * j + 1] = o[4 * j + 1];
        st[1].o[2 * j] = o[4 * j + 2];
        st[1].o[2 * j + 1] = o[4 * j + 3];
      }
    };
    auto states_to_o = [&] {
      KVTILE_PRAGMA_UNROLL
      for (int j = 0; j < D / 8; ++j) {
        o[4 * j + 0] = st[0].o[2 * j];
        o[4 * j + 1] = st[0].o[2 * j + 1];
        o[4 * j + 2] = st[1].o[2 * j];
        o[4 * j + 3] = st[1].o[2 * j + 1];
      }
    };

    // S = Q K^T of the tile in ring slot `stage` starting at key k0, the mask, the online
    // softmax, and P packed as the register A fragments `pa`. Waits all of this warpgroup's
    // wgmma (so also a P V still in flight).
    auto qk_softmax = [&](int stage, int k0, tile_visibility vis, std::uint32_t (&pa)[G::kv_steps][4]) {
      float s[G::s_regs];
      const std::uint32_t k_tile = k_base + stage * G::kv_bytes;
      arch::fence_operands(s);
      arch::wgmma_fence();
      KVTILE_PRAGMA_UNROLL
      for (int kd = 0; kd < G::d_steps; ++kd) {
        const std::uint32_t col = (kd / 4), in_atom = (kd % 4) * 32;
        const std::uint64_t da = arch::sw128_desc(q_wg + col * G::block_q * 128 + in_atom, 16, sbo);
        const std::uint64_t db = arch::sw128_desc(k_tile + col * G::block_kv * 128 + in_atom, 16, sbo);
        qk_op::ss(s, da, db, kd > 0 ? 1 : 0);
      }
      arch::wgmma_commit();
      arch::wgmma_wait<0>();  // S, and the previous tile's P V
      arch::fence_operands(s);
      arch::fence_operands(o);

      apply_logits(mask, s, src.scale_log2);  // a variant's logit transform (nothing for a mask)
      if (vis == tile_visibility::partial) {
        KVTILE_PRAGMA_UNROLL
        for (int j = 0; j < G::block_kv / 8; ++j)
          KVTILE_PRAGMA_UNROLL
          for (int c = 0; c < 4; ++c) {
            const int col = k0 + j * 8 + 2 * t + (c % 2);
            if (!(col < kv_limit && mask.visible(row_pos[c / 2], col))) s[4 * j + c] = neg_inf;
          }
      }

      // Online softmax per row (a quad of lanes shares a row).
      o_to_states();
      KVTILE_PRAGMA_UNROLL
      for (int half = 0; half < 2; ++half) {
        const float base = st[half].enter_tile(fragment_row_max(s, half) * scale_log2);
        st[half].l += fragment_row_exp2(s, half, scale_log2, base);
      }
      states_to_o();
      fragment_to_a<T>(s, pa);
    };
    // O += P V of the tile in ring slot `stage`, committed, not waited.
    auto issue_pv = [&](int stage, const std::uint32_t (&pa)[G::kv_steps][4]) {
      const std::uint32_t v_tile = v_base + stage * G::kv_bytes;
      arch::fence_operands(o);
      arch::wgmma_fence();
      KVTILE_PRAGMA_UNROLL
      for (int j = 0; j < G::kv_steps; ++j) {
        const std::uint64_t db = arch::sw128_desc(v_tile + j * 16 * 128, G::block_kv * 128, sbo);
        pv_op::template rs<1>(o, pa[j], db, 1);
      }
      arch::wgmma_commit();
    };
    auto visibility = [&](int k0) {
      tile_visibility vis = wq0 < wq1 ? mask.classify(wq0, wq1, k0, k0 + G::block_kv) : tile_visibility::empty;
      if (vis == tile_visibility::full && k0 + G::block_kv > kv_limit) vis = tile_visibility::partial;
      return vis;
    };

    if constexpr (G::use_mbarriers) {
      // Per-slot mbarriers: full_k / full_v complete when every thread's copies of the slot
      // landed (cp.async arrive), empty when every thread's P V on it completed.
      const std::uint32_t bars = v_base + G::stages * G::kv_bytes;
      auto full_k = [&](int slot) { return bars + std::uint32_t(slot) * 8u; };
      auto full_v = [&](int slot) { return bars + std::uint32_t(G::stages + slot) * 8u; };
      auto empty = [&](int slot) { return bars + std::uint32_t(2 * G::stages + slot) * 8u; };
      if (tid == 0) {
        for (int x = 0; x < G::stages; ++x) {
          arch::mbarrier_init(full_k(x), G::threads);
          arch::mbarrier_init(full_v(x), G::threads);
          arch::mbarrier_init(empty(x), G::threads);
        }
      }
      __syncthreads();
      // Q lands with the first tile's K (the arrive covers every earlier copy of the thread).
      load_q();
      int fetch = next_tile(0), fetched = 0;
      src.prefetch(tile_start(fetch));
      // Visible tile number `fetched` goes to slot fetched % Stages, once the tile that used
      // the slot before is released by every thread.
      auto fetch_next = [&] {
        const int slot = fetched % G::stages;
        if (fetched >= G::stages) arch::mbarrier_wait(empty(slot), std::uint32_t((fetched / G::stages - 1) & 1));
        copy_kv(fetch, slot, [&] { arch::cp_async_mbarrier_arrive(full_k(slot)); });
        arch::cp_async_mbarrier_arrive(full_v(slot));
        fetch = next_tile(fetch + 1);
        src.prefetch(tile_start(fetch));
        ++fetched;
      };
      for (int x = 0; x < G::stages - 2; ++x)
        if (fetch < n_tiles) fetch_next();
      int c = 0;
      for (int i = next_tile(0); i < n_tiles; i = next_tile(i + 1), ++c) {
        if (fetch < n_tiles) fetch_next();  // visible tile c + Stages - 2, into tile c - 2's slot
        const int slot = c % G::stages;
        const std::uint32_t parity = std::uint32_t((c / G::stages) & 1);
        arch::mbarrier_wait(full_k(slot), parity);
        arch::fence_proxy_async_shared();
        const int k0 = kv_lo + i * G::block_kv;
        const tile_visibility vis = visibility(k0);
        std::uint32_t pa[G::kv_steps][4];
        if (vis != tile_visibility::empty)
          qk_softmax(slot, k0, vis, pa);
        else
          arch::wgmma_wait<0>();
        if (c > 0) arch::mbarrier_arrive(empty((c - 1) % G::stages));  // previous tile's P V is done
        arch::mbarrier_wait(full_v(slot), parity);
        arch::fence_proxy_async_shared();
        if (vis != tile_visibility::empty) issue_pv(slot, pa);
      }
      arch::cp_async_commit();
      arch::cp_async_wait<0>();  // Q's copies when no tile was visible
    } else {
      // Q joins the first K group, so the first wait covers both.
      load_q();
      int fetch = next_tile(0);
      src.prefetch(tile_start(fetch));
      auto fetch_and_advance = [&](int stage) {
        fetch_tile(fetch, stage);
        fetch = next_tile(fetch + 1);
        src.prefetch(tile_start(fetch));
      };
      KVTILE_PRAGMA_UNROLL
      for (int x = 0; x < G::stages - 1; ++x) fetch_and_advance(x);
      int stage = 0, refill = G::stages - 1;
      for (int i = next_tile(0); i < n_tiles; i = next_tile(i + 1)) {
        // K of this tile (and Q) landed and is published to the async proxy.
        arch::cp_async_wait<2 * G::stages - 3>();
        arch::fence_proxy_async_shared();
        __syncthreads();
        const int k0 = kv_lo + i * G::block_kv;
        const tile_visibility vis = visibility(k0);
        std::uint32_t pa[G::kv_steps][4];
        if (vis != tile_visibility::empty) qk_softmax(stage, k0, vis, pa);
        // V of this tile landed, and every warpgroup has finished the previous tile's P V (its
        // wait above), so that tile's slot is refilled here.
        arch::wgmma_wait<0>();  // covers a tile this warpgroup skipped
        arch::cp_async_wait<2 * G::stages - 4>();
        arch::fence_proxy_async_shared();
        __syncthreads();
        fetch_and_advance(refill);
        refill = refill + 1 == G::stages ? 0 : refill + 1;
        if (vis != tile_visibility::empty) issue_pv(stage, pa);
        stage = stage + 1 == G::stages ? 0 : stage + 1;
      }
      arch::cp_async_wait<0>();
    }
    arch::wgmma_wait<0>();
    arch::fence_operands(o);
    o_to_states();
    arch::cp_async_wait<0>();

    // Epilogue: finish each row (quad sum of l, LSE, normalise) and hand it to the source,
    // which stores straight from the fragments (a quad covers 16 contiguous bytes of a row).
    KVTILE_PRAGMA_UNROLL
    for (int r = 0; r < 2; ++r) {
      st[r].l += __shfl_xor_sync(0xffffffffu, st[r].l, 1);
      st[r].l += __shfl_xor_sync(0xffffffffu, st[r].l, 2);
      const int row = row_local + r * 8;
      if (row < rows) {
        const float lse = st[r].lse();
        st[r].normalize();
        src.store(row, st[r].o, lse, t);
      }
    }
  }
};

// The epilogue of a dense prefill row, for both sm_90a mainloops: token `row` of sequence b,
// query head h; o[2j], o[2j + 1] are its columns 8j + 2t, 8j + 2t + 1, lse in natural log.
template <int D, class T, class Mask>
KVTILE_DEVICE KVTILE_FORCEINLINE void store_dense_row(const prefill_params<T, Mask>& p, int b, int row, int h, const float* o,
                                                      float lse, int t) {
  if (p.lse != nullptr && t == 0) p.lse[p.q_layout.row(b, row) * p.q_layout.heads + h] = lse;
  T* dst = p.o + p.o_layout.offset(b, row, h) + 2 * t;
  KVTILE_PRAGMA_UNROLL
  for (int j = 0; j < D / 8; ++j) *reinterpret_cast<std::uint32_t*>(dst + j * 8) = arch::pack2<T>(o[2 * j], o[2 * j + 1]);
}

// The dense source: CTA (q tile, query head, sequence) of cuda::prefill's arguments; rows are
// `stride` apart, so a thread walks its rows with one pointer increment each.
template <class T, int D, class Tile, class Mask>
struct dense_sm90_source {
  using G = prefill_sm90_geometry<T, D, Tile>;
  using params = prefill_params<T, Mask>;
  const params& p;
  int b, h, q0, rows, kv_lo, kv_hi, kv_limit;
  Mask mask;
  const T* q;
  const T* k;
  const T* v;
  float scale_log2;
  std::int64_t q_stride, kv_stride;

  KVTILE_DEVICE dense_sm90_source(const params& pp, int q_tile)
      : p(pp), b(int(blockIdx.z)), h(int(blockIdx.y)), q0(q_tile * G::block_q),
        mask(pp.mask, pp.q_layout.len_of(int(blockIdx.z)), pp.kv_layout.len_of(int(blockIdx.z))) {
    const int q_len = p.q_layout.len_of(b);
    rows = min_i(G::block_q, q_len - q0);
    kv_limit = p.kv_layout.len_of(b);
    kv_lo = rows > 0 ? mask.kv_begin(q0, q0 + rows) : 0;
    kv_hi = rows > 0 ? mask.kv_end(q0, q0 + rows) : 0;
    const int hk = h / p.group;
    q_stride = p.q_layout.stride_token;
    kv_stride = p.kv_layout.stride_token;
    q = p.q + p.q_layout.offset(b, q0, h);
    k = p.k + p.kv_layout.offset(b, 0, hk);
    v = p.v + p.kv_layout.offset(b, 0, hk);
    scale_log2 = p.scale_log2;
  }
  KVTILE_DEVICE KVTILE_FORCEINLINE int token(int r) const { return q0 + r; }
  KVTILE_DEVICE KVTILE_FORCEINLINE void load_q(std::uint32_t smem) const {
    load_tile_sw128<T, G, G::block_q>(smem, q, q_stride, rows, int(threadIdx.x));
  }
  template <class Between>
  KVTILE_DEVICE KVTILE_FORCEINLINE void load_kv(std::uint32_t k_smem, std::uint32_t v_smem, int k0, Between&& between) const {
    const std::int64_t off = k0 * kv_stride;
    load_tile_sw128<T, G, G::block_kv>(k_smem, k + off, kv_stride, kv_limit - k0, int(threadIdx.x));
    between();
    load_tile_sw128<T, G, G::block_kv>(v_smem, v + off, kv_stride, kv_limit - k0, int(threadIdx.x));
  }
  KVTILE_DEVICE KVTILE_FORCEINLINE void prefetch(int) const {}
  KVTILE_DEVICE KVTILE_FORCEINLINE void store(int r, const float* o, float lse, int t) const {
    store_dense_row<D>(p, b, q0 + r, h, o, lse, t);
  }
};

template <class T, int D, class Tile, class Mask>
struct prefill_sm90_kernel {
  using G = prefill_sm90_geometry<T, D, Tile>;
  using params = prefill_params<T, Mask>;

  static KVTILE_DEVICE void run(const params& p, unsigned char* smem_raw) {
    const int q_tile = int(gridDim.x) - 1 - int(blockIdx.x);  // heaviest (causal) tiles first
    if (q_tile * G::block_q >= p.q_layout.len_of(int(blockIdx.z))) return;
    dense_sm90_source<T, D, Tile, Mask> src(p, q_tile);
    sm90_attention_core<T, D, Tile, Mask>::run(src, smem_raw);
  }
};

// Entry point; the body exists only in the sm_90a device pass (elsewhere an empty kernel that
// the host never launches, see prefill_sm90::run).
template <class Kernel>
KVTILE_KERNEL void __launch_bounds__(Kernel::G::threads, 1) prefill_sm90_entry(const typename Kernel::params p) {
#if KVTILE_WGMMA_AVAILABLE
  extern __shared__ __align__(16) unsigned char prefill_sm90_smem[];
  Kernel::run(p, prefill_sm90_smem);
#else
  (void)p;
#endif
}

// 1 in the sm_90a device code of this binary, 0 in every other; the host reads the copy of the
// module the device loaded to know whether the wgmma kernels are really there.
[[maybe_unused]] static __device__ int prefill_sm90_compiled = KVTILE_WGMMA_AVAILABLE;

// Whether device `device` (the current one) is compute capability 9.x and runs sm_90a code of
// this binary. The first call per device reads one word from the module (a synchronous copy),
// then the answer is cached; make that first call (run or can_implement) outside a CUDA-graph
// capture, where the copy is refused and the answer is "no" until it succeeds.
inline bool sm90_kernels_available(int device) {
  static std::atomic<int> cache[64] = {};  // 0 unknown, 1 yes, 2 no
  if (device >= 0 && device < 64) {
    const int c = cache[device].load(std::memory_order_relaxed);
    if (c != 0) return c == 1;
  }
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;  // not cached: a later call asks again
  }
  bool ok = major == 9;
  if (ok) {
    int flag = 0;
    const cudaError_t e = cudaMemcpyFromSymbol(&flag, prefill_sm90_compiled, sizeof(int));
    if (e != cudaSuccess) {
      // No module image for this device (not sticky), or a call the runtime refused right now
      // (e.g. inside a global-mode stream capture): answer no, and ask again next time.
      (void)cudaGetLastError();
      return false;
    }
    ok = flag == 1;
  }
  if (device >= 0 && device < 64) cache[device].store(ok ? 1 : 2, std::memory_order_relaxed);
  return ok;
}

// Launches the sm_90a kernel `Kernel` for `p` (already checked) on a device where
// sm90_kernels_available holds; shared by prefill_sm90::run and prefill::run's dispatch.
template <class Kernel>
void launch_prefill_sm90(const typename Kernel::params& p, std::int32_t max_q_len, int device, cudaStream_t stream) {
  using G = typename Kernel::G;
  int smem_optin = 0;
  KVTILE_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  KVTILE_REQUIRE(G::smem_bytes <= std::size_t(smem_optin), errc::unsupported, "prefill_sm90 tile <", G::block_q, ", ",
                 G::block_kv, ", ", G::warps, ", ", G::stages, "> needs ", G::smem_bytes,
                 " bytes of shared memory, device ", device, " allows ", smem_optin);
  const dim3 g = prefill_grid(p.q_layout, max_q_len, G::block_q);
  if (g.x == 0 || g.y == 0 || g.z == 0) return;
  auto* fn = &prefill_sm90_entry<Kernel>;
  KVTILE_CUDA_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, int(G::smem_bytes)));
  fn<<<g, G::threads, G::smem_bytes, stream>>>(p);
  KVTILE_CUDA_CHECK_LAUNCH();
}

}  // namespace attention::cuda::detail
KVTILE_NAMESPACE_END
