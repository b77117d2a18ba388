// kvtile/attention/cuda/backward/sm90_kernel.cuh: the main kernel of the attention backward on
// Hopper (sm_90a): K/V outer, as backward/kernel.cuh, with warpgroup MMA (wgmma) instead of
// mma.sync.
//
// A CTA of one or two warpgroups (tuning::backward_sm90_warpgroups) owns 64 keys per
// warpgroup of one (sequence, KV head); warpgroup w owns keys [64 w, 64 w + 64) of the block and
// keeps their dK and dV (64 x D fp32 each) in registers across every query tile of every query
// head of the GQA group. K and V stay in shared memory (cp.async); the 64-row Q and dO tiles
// come through a two-slot ring by TMA (one thread issues them, an mbarrier per slot), their row
// statistics by cp.async, all tiles in the 128-byte swizzled layout (arch/wgmma.cuh). Per step
// and warpgroup, with the accumulators' rows on keys:
//   S^T = K Q^T, dP^T = V dO^T        m64n64k16, A and B from shared memory (K-major)
//   P^T, dS^T                          element-wise on the fragments (exp2 of the saved LSE)
//   dV += P^T dO, dK += dS^T Q         m64nDk16, A = P^T / dS^T from registers, B = dO / Q
//                                      from shared memory (MN-major: the transpose bit)
//   dQ += dS K                         dS^T goes to shared memory and is read back as an
//                                      MN-major A (m64n64k16, both operands transposed). At
//                                      D = 128 the two warpgroups split dQ's columns (each
//                                      reads both warpgroups' dS^T: a CTA barrier); at D = 64
//                                      each takes the product over its own 64 keys (a
//                                      warpgroup barrier).
// The step's dQ product goes, as fp32, to a staging tile in shared memory (two slots, the ring's
// parity) and is added to the fp32 workspace by the TMA (one bulk tensor reduction a 32-column
// box, issued by thread 0 after the next step's barrier, so the consumers never wait on it;
// with float2 atomics from registers instead, the kernel ran 1.04-1.14x slower:
// docs/perf-log/backward.md v9-v10).
// Without a dQ workspace (deterministic mode) the dQ product is skipped and the Q-outer
// mma.sync kernel (dq_kernel.cuh) computes dQ.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

#include <cuda_runtime.h>

#include "kvtile/attention/cuda/arch/cp_async.cuh"
#include "kvtile/attention/cuda/arch/cp_async_shared.cuh"
#include "kvtile/attention/cuda/arch/mbarrier.cuh"
#include "kvtile/attention/cuda/arch/mma.cuh"
#include "kvtile/attention/cuda/arch/tma.cuh"
#include "kvtile/attention/cuda/arch/wgmma.cuh"
#include "kvtile/attention/cuda/backward/kernel.cuh"
#include "kvtile/attention/cuda/backward/params.cuh"
#include "kvtile/attention/cuda/prefill_sm90/kernel.cuh"
#include "kvtile/attention/cuda/prefill_sm90/ws_kernel.cuh"
#include "kvtile/attention/cuda/scores.cuh"
#include "kvtile/attention/mask.hpp"
#include "kvtile/attention/variant.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda::detail {

// Head dims the sm_90a backward takes (the swizzled tiles hold 64-element column blocks).
template <int D>
inline constexpr bool backward_sm90_head_dim = D == 64 || D == 128;

template <class T, int D, int Warpgroups>
struct backward_sm90_geometry {
  static_assert(backward_sm90_head_dim<D>, "backward_sm90: head dim must be 64 or 128");
  static_assert(Warpgroups == 1 || Warpgroups == 2, "backward_sm90: one or two warpgroups per CTA");
  static constexpr int warpgroups = Warpgroups;
  static constexpr int block_q = 64;                // query rows per step (the M of dQ, the N of S^T)
  static constexpr int block_kv = 64 * warpgroups;  // keys per CTA, 64 per warpgroup
  static constexpr int threads = 128 * warpgroups;
  static constexpr int min_ctas = 3 - warpgroups;  // CTAs per SM the registers are budgeted for
  static constexpr int chunks = D / 8;  // 16-byte chunks per row (load_tile_sw128)
  static constexpr int d_steps = D / 16;
  static constexpr int q_steps = block_q / 16;
  // dQ of a step is one m64n64 product per warpgroup: at D = 128 the two warpgroups split its
  // columns (64 each, over every key of the CTA); at D = 64 each adds the product over its own
  // 64 keys.
  static constexpr bool dq_split_keys = D == 64;
  static_assert(warpgroups == 2 || D == 64, "backward_sm90: one warpgroup per CTA only at D = 64");
  static constexpr int dq_k_steps = (dq_split_keys ? 64 : block_kv) / 16;
  static constexpr int stages = 2;  // Q / dO / statistics ring slots

  static constexpr std::uint32_t kv_bytes = std::uint32_t(block_kv) * D * sizeof(T);  // K or V
  static constexpr std::uint32_t q_bytes = std::uint32_t(block_q) * D * sizeof(T);    // one slot of Q or dO
  static constexpr std::uint32_t ds_bytes = std::uint32_t(block_kv) * block_q * sizeof(T);  // dS^T
  // dQ staging: per slot and warpgroup the step's 64 x 64 fp32 product, two boxes of 32 columns
  // (128-byte rows, swizzled as the tensor map of the workspace expects).
  static constexpr int dq_box_cols = 32;
  static constexpr std::uint32_t dq_box_bytes = std::uint32_t(block_q) * dq_box_cols * sizeof(float);
  static constexpr std::uint32_t dq_wg_bytes = 2 * dq_box_bytes;
  static constexpr std::uint32_t dq_slot_bytes = warpgroups * dq_wg_bytes;
  // Rows of the fp32 workspace before its first row (never read), so that a box that starts
  // at a tile's first row has a coordinate >= 0 even when a short varlen sequence's tile
  // starts before the tensor (the TMA faults on a reduction at a negative coordinate).
  static constexpr int dq_pad_rows = block_q;
  static constexpr std::uint32_t stat_bytes = 2 * stages * block_q * sizeof(float);  // lse2, Delta per slot
  // + 1024: the dynamic shared-memory base is rounded up to the swizzle atom.
  // + 8 per slot: the mbarrier its Q and dO copies complete on.
  static constexpr std::size_t smem_bytes = 2 * std::size_t(kv_bytes) + 2 * std::size_t(stages) * q_bytes + ds_bytes +
                                            std::size_t(stages) * dq_slot_bytes + stat_bytes + 8 * stages + 1024;
  static_assert(kv_bytes % 1024 == 0 && q_bytes % 1024 == 0 && ds_bytes % 1024 == 0 && dq_box_bytes % 1024 == 0,
                "tiles stay 1024-byte aligned");
};

// The kernel's parameters: the backward's, and the tensor maps of Q and dO and of the fp32 dQ
// workspace (a __grid_constant__ parameter, where the TMA reads them; dq_acc only when
// p.dq_acc is set).
template <class T, class Mask>
struct backward_sm90_params {
  backward_params<T, Mask> p;
  CUtensorMap q, d_o, dq_acc;
};

template <class T, int D, class Mask, int Warpgroups = tuning::backward_sm90_warpgroups<D>>
struct backward_sm90_kernel {
  using G = backward_sm90_geometry<T, D, Warpgroups>;
  using params = backward_sm90_params<T, Mask>;
  using sq_op = arch::wgmma_op<T, 64>;  // S^T, dP^T and dQ: m64n64
  using acc_op = arch::wgmma_op<T, D>;  // dV, dK: m64nD

  static KVTILE_DEVICE void run(const params& P, unsigned char* smem_raw) {
    const backward_params<T, Mask>& p = P.p;
    const int tid = int(threadIdx.x), warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, t = lane % 4;
    const int wg = warp / 4, wq = warp % 4;
    const int b = int(blockIdx.z), hk = int(blockIdx.y);
    const int kv_len = p.kv_layout.len_of(b);
    const int k0 = int(blockIdx.x) * G::block_kv;
    if (k0 >= kv_len) return;
    const int k1 = min_i(k0 + G::block_kv, kv_len);
    const int q_len = p.q_layout.len_of(b);
    const Mask mask(p.mask, q_len, kv_len);
    const bool with_dq = p.dq_acc != nullptr;
    constexpr std::uint32_t sbo = 1024;  // 8-row groups of a swizzled tile

    // Shared memory: K, V [block_kv keys]; Q, dO [stages][64 rows]; dS^T [block_kv keys][64
    // queries]; dQ staging [stages][warpgroups][2 boxes]; lse2, Delta [stages][64] fp32.
    const std::uint32_t raw = arch::smem_addr(smem_raw);
    const std::uint32_t k_base = (raw + 1023u) & ~1023u;
    const std::uint32_t v_base = k_base + G::kv_bytes;
    const std::uint32_t q_base = v_base + G::kv_bytes;
    const std::uint32_t do_base = q_base + G::stages * G::q_bytes;
    const std::uint32_t ds_base = do_base + G::stages * G::q_bytes;
    const std::uint32_t dq_base = ds_base + G::ds_bytes;
    const std::uint32_t stat_base = dq_base + G::stages * G::dq_slot_bytes;
    unsigned char* const smem = smem_raw + (k_base - raw);  // generic pointer of k_base
    float* const s_lse = reinterpret_cast<float*>(smem + (stat_base - k_base));
    float* const s_delta = s_lse + G::stages * G::block_q;
    const std::uint32_t full_bars = stat_base + G::stat_bytes;  // [stages] mbarriers
    if (tid == 0) {
      for (int x = 0; x < G::stages; ++x) arch::mbarrier_init(full_bars + 8 * x, 1);
      arch::fence_barrier_init();
    }

    const std::int64_t kv_stride = p.kv_layout.stride_token;
    load_tile_sw128<T, G, G::block_kv>(k_base, p.k + p.kv_layout.offset(b, k0, hk), kv_stride, kv_len - k0, tid);
    load_tile_sw128<T, G, G::block_kv>(v_base, p.v + p.kv_layout.offset(b, k0, hk), kv_stride, kv_len - k0, tid);
    arch::cp_async_commit();

    // The packed row of the sequence's first query token (the offsets of a varlen batch are
    // read from the device once, here).
    const std::int64_t q_row0 = p.q_layout.row(b, 0);
    const bool varlen_q = p.q_layout.indptr != nullptr;

    // Steps: (query head of the group, query tile), the ones the mask hides from every key of
    // the block skipped.
    const int n_qt = (q_len + G::block_q - 1) / G::block_q, total = p.group * n_qt;
    auto next_step = [&](int i) {
      for (; i < total; ++i) {
        const int q0 = (i % n_qt) * G::block_q;
        if (mask.classify(q0, min_i(q0 + G::block_q, q_len), k0, k1) != tile_visibility::empty) break;
      }
      return i;
    };
    // A step's Q and dO tiles come by TMA (thread 0; they complete on the slot's mbarrier), its
    // row statistics by cp.async (threads 0..63). A tile is the 64 tokens from q_start on: q0,
    // or, for a varlen tile that would run past its sequence's end (and perhaps past the
    // tensor's), the 64 that end there (dense_ws_source does the same). Rows of the tile that are
    // not the step's queries (before q0, or past the end of a fixed-length sequence) get
    // lse2 = +inf, so P = 0 there, and Delta = 0.
    // Step i's query head, first query, the token of its tile's first row, and (step_info) its
    // visibility to this warpgroup's keys.
    struct step_t {
      int h = 0, q0 = 0, q_start = 0;
      tile_visibility vis = tile_visibility::empty;
    };
    auto step_at = [&](int i) {
      step_t st;
      st.h = hk * p.group + i / n_qt;
      st.q0 = (i % n_qt) * G::block_q;
      st.q_start = varlen_q && st.q0 + G::block_q > q_len ? q_len - G::block_q : st.q0;
      return st;
    };
    auto fetch = [&](int i, int slot) {
      if (i < total) {
        const step_t st = step_at(i);
        const int h = st.h, q0 = st.q0, q_start = st.q_start;
        if (tid == 0) {
          const std::uint32_t bar = full_bars + 8 * slot;
          const int row = int(q_row0) + q_start;
          arch::mbarrier_arrive_expect_tx(bar, 2 * G::q_bytes);
          KVTILE_PRAGMA_UNROLL
          for (int c = 0; c < D / 64; ++c) {
            arch::tma_load_3d(q_base + slot * G::q_bytes + c * G::block_q * 128, &P.q, c * 64, h, row, bar);
            arch::tma_load_3d(do_base + slot * G::q_bytes + c * G::block_q * 128, &P.d_o, c * 64, h, row, bar);
          }
        }
        if (tid < G::block_q) {
          const int token = q_start + tid;
          if (token >= q0 && token < q_len) {
            const std::int64_t at = std::int64_t(h) * p.ws_rows + q_row0 + token;
            arch::cp_async_4(s_lse + slot * G::block_q + tid, p.lse2 + at);
            arch::cp_async_4(s_delta + slot * G::block_q + tid, p.delta + at);
          } else {
            s_lse[slot * G::block_q + tid] = std::numeric_limits<float>::infinity();
            s_delta[slot * G::block_q + tid] = 0.f;
          }
        }
      }
      arch::cp_async_commit();
    };

    float dv[D / 2], dk[D / 2];
    KVTILE_PRAGMA_UNROLL
    for (int x = 0; x < D / 2; ++x) dv[x] = dk[x] = 0.f;
    arch::fence_operands(dv);
    arch::fence_operands(dk);

    const int wk0 = k0 + wg * 64;     // this warpgroup's first key
    const int key_row = wq * 16 + g;  // this thread's keys: wk0 + key_row, + 8
    const std::uint32_t k_wg = k_base + wg * 64 * 128, v_wg = v_base + wg * 64 * 128;  // A rows of S^T, dP^T
    const float scale_log2 = softmax_scale_log2<Mask>(p.scale_log2);

    auto step_info = [&](int i) {
      step_t st = step_at(i);
      const int q1 = min_i(st.q0 + G::block_q, q_len);
      st.vis = wk0 < kv_len ? mask.classify(st.q0, q1, wk0, wk0 + 64) : tile_visibility::empty;
      if (st.vis == tile_visibility::full && wk0 + 64 > kv_len) st.vis = tile_visibility::partial;
      return st;
    };
    // S^T = K Q^T and dP^T = V dO^T of the tiles in ring slot `sl`, two commit groups (P^T is
    // computed while dP^T runs).
    auto issue_sdp = [&](float (&s)[32], float (&dp)[32], int sl) {
      // acc = A B^T over D: A this warpgroup's 64 rows of K or V, B the slot's Q or dO tile.
      auto product = [&](float (&acc)[32], std::uint32_t a_rows, std::uint32_t b_tile) {
        KVTILE_PRAGMA_UNROLL
        for (int kd = 0; kd < G::d_steps; ++kd) {
          const std::uint32_t col = kd / 4, in_atom = (kd % 4) * 32;
          sq_op::ss(acc, arch::sw128_desc(a_rows + col * G::block_kv * 128 + in_atom, 16, sbo),
                    arch::sw128_desc(b_tile + col * G::block_q * 128 + in_atom, 16, sbo), kd > 0 ? 1 : 0);
        }
        arch::wgmma_commit();
      };
      arch::fence_operands(s);
      arch::fence_operands(dp);
      arch::wgmma_fence();
      product(s, k_wg, q_base + sl * G::q_bytes);
      product(dp, v_wg, do_base + sl * G::q_bytes);
    };
    // Barrier: step `it`'s tiles (in slot it % stages, the mbarrier's phase it / stages) and
    // statistics landed, and every thread is past the step before. The first also publishes K
    // and V (cp.async, the generic proxy) to the async proxy.
    auto tiles_landed = [&](int it) {
      arch::cp_async_wait<0>();
      if (it == 0) arch::fence_proxy_async_shared();
      arch::mbarrier_wait(full_bars + 8 * (it % G::stages), std::uint32_t((it / G::stages) & 1));
      __syncthreads();
    };

    // A visible step from its S^T and dP^T (the last two commit groups, waited here): P^T and
    // dS^T on the fragments, dV += P^T dO and dK += dS^T Q issued (one commit group), and dS^T
    // stored for dQ.
    auto grads = [&](float (&s)[32], float (&dp)[32], tile_visibility vis, int q_start, int sl) {
      const std::uint32_t q_slot = q_base + sl * G::q_bytes, do_slot = do_base + sl * G::q_bytes;
      arch::wgmma_wait<1>();
      arch::fence_operands(s);

      // P^T in place: s[4j + c] is key wk0 + key_row + 8 (c / 2) and tile row 8j + 2t + c % 2
      // (token q_start + row).
      // Masked pairs and keys past kv_len get P = 0; padding query rows and rows that see no
      // key have lse2 = +inf, so P = 0 there too.
      const float* lse_slot = s_lse + sl * G::block_q;
      const float* delta_slot = s_delta + sl * G::block_q;
      float grad[has_logit_transform<Mask> ? 32 : 1];
      KVTILE_PRAGMA_UNROLL
      for (int j = 0; j < 8; ++j) {
        const float2 l2 = *reinterpret_cast<const float2*>(lse_slot + j * 8 + 2 * t);
        KVTILE_PRAGMA_UNROLL
        for (int c = 0; c < 4; ++c) {
          float x = s[4 * j + c], d = 1.f;
          logit_and_derivative(mask, x, d, p.scale);
          if constexpr (has_logit_transform<Mask>) grad[4 * j + c] = d;
          if (vis == tile_visibility::partial) {
            const int key = wk0 + key_row + (c / 2) * 8, qi = q_start + j * 8 + 2 * t + (c % 2);
            if (!(key < kv_len && mask.visible(qi, key))) x = neg_inf;
          }
          s[4 * j + c] = arch::fast_exp2(fmaf(x, scale_log2, -(c % 2 ? l2.y : l2.x)));
        }
      }
      arch::wgmma_wait<0>();
      arch::fence_operands(dp);
      KVTILE_PRAGMA_UNROLL
      for (int j = 0; j < 8; ++j) {
        const float2 dl = *reinterpret_cast<const float2*>(delta_slot + j * 8 + 2 * t);
        KVTILE_PRAGMA_UNROLL
        for (int c = 0; c < 4; ++c) {
          float ds = s[4 * j + c] * (dp[4 * j + c] - (c % 2 ? dl.y : dl.x));
          if constexpr (has_logit_transform<Mask>) ds *= grad[4 * j + c];
          dp[4 * j + c] = ds;
        }
      }

      // dV += P^T dO and dK += dS^T Q: the fragments of 16 queries are the A of one k-step;
      // dO and Q are MN-major B operands (rows = queries, the k dimension).
      std::uint32_t pa[G::q_steps][4], da[G::q_steps][4];
      fragment_to_a<T>(s, pa);
      fragment_to_a<T>(dp, da);
      arch::fence_operands(dv);
      arch::fence_operands(dk);
      arch::wgmma_fence();
      KVTILE_PRAGMA_UNROLL
      for (int j = 0; j < G::q_steps; ++j)
        acc_op::template rs<1>(dv, pa[j], arch::sw128_desc(do_slot + j * 16 * 128, G::block_q * 128, sbo), 1);
      KVTILE_PRAGMA_UNROLL
      for (int j = 0; j < G::q_steps; ++j)
        acc_op::template rs<1>(dk, da[j], arch::sw128_desc(q_slot + j * 16 * 128, G::block_q * 128, sbo), 1);
      arch::wgmma_commit();

      if (with_dq) {
        // dS^T rows (keys) of this thread into the [block_kv keys][64 queries] swizzled tile:
        // da[j][0 / 1] are rows key_row / + 8 at queries 16j + 2t, da[j][2 / 3] at 16j + 8 + 2t.
        const int r0 = wg * 64 + key_row;
        KVTILE_PRAGMA_UNROLL
        for (int j = 0; j < G::q_steps; ++j) {
          KVTILE_PRAGMA_UNROLL
          for (int x = 0; x < 4; ++x) {
            const int r = r0 + (x % 2) * 8, c = 2 * j + x / 2;
            *reinterpret_cast<std::uint32_t*>(smem + (ds_base - k_base) + arch::sw128_offset(G::block_kv, r, c) + 4 * t) =
                da[j][x];
          }
        }
      }
    };
    // A step no key of this warpgroup sees: its dS^T rows are 0 where the other warpgroup reads
    // them (dQ's columns split over the warpgroups).
    auto zero_ds = [&] {
      if (with_dq && !G::dq_split_keys)
        for (int id = tid % 128; id < 64 * 8; id += 128) {
          const int r = wg * 64 + id / 8, c = id % 8;
          *reinterpret_cast<uint4*>(smem + (ds_base - k_base) + arch::sw128_offset(G::block_kv, r, c)) =
              make_uint4(0u, 0u, 0u, 0u);
        }
    };
    // dQ += dS K: A = dS^T read transposed (MN-major), B = K read transposed (rows are keys,
    // the k dimension); the step's 64 x 64 product, columns [64 col_block, + 64), after the
    // barrier that completes dS^T. One commit group (none when the product is 0).
    const std::uint32_t col_block = G::dq_split_keys ? 0 : wg;
    auto dq_product = [&](const step_t& st) { return with_dq && (!G::dq_split_keys || st.vis != tile_visibility::empty); };
    auto issue_dq = [&](float (&acc)[32], const step_t& st) {
      arch::fence_proxy_async_shared();
      if constexpr (G::dq_split_keys)
        arch::named_barrier_sync(1 + wg, 128);
      else
        __syncthreads();
      if (!dq_product(st)) return;
      const std::uint32_t key0 = G::dq_split_keys ? wg * 64 : 0;  // first key row of the product
      arch::fence_operands(acc);
      arch::wgmma_fence();
      KVTILE_PRAGMA_UNROLL
      for (int ks = 0; ks < G::dq_k_steps; ++ks) {
        const std::uint32_t row = (key0 + ks * 16) * 128;
        sq_op::template ss_t<1, 1>(acc, arch::sw128_desc(ds_base + row, G::block_kv * 128, sbo),
                                   arch::sw128_desc(k_base + col_block * G::block_kv * 128 + row, G::block_kv * 128, sbo),
                                   ks > 0 ? 1 : 0);
      }
      arch::wgmma_commit();
    };
    // The completed product to the staging slot `sl`: acc[4j + 2 half + {0, 1}] is tile row
    // 16 wq + g + 8 half (token q_start + row), column 8j + 2t of the 64 at 64 col_block, i.e.
    // 16-byte chunk 2j + t / 2 of the row (box j / 4); rows r and r + 8 share the swizzle phase
    // r % 8 = g, so a thread's offsets are the same every step. The box covers the tile's rows
    // as loaded: rows that are not the step's queries (a varlen tail tile's rows before q0,
    // rows past q_len) have lse2 = +inf, so P = dS = 0 in their columns and their product rows
    // are 0 (they add nothing to the rows they land on). With no product (this warpgroup sees
    // none of the step) the box is staged as 0 and added all the same. Then made visible to the
    // TMA (the async proxy).
    auto stage_dq = [&](float (&acc)[32], int sl, bool product) {
      arch::fence_operands(acc);
      // At D = 128 the thread's index is opaque to the compiler: the addresses below are
      // computed here, each step, instead of being hoisted out of the step loop into registers
      // held across it (they would spill there; at D = 64 the registers are there).
      int me = tid;
      if constexpr (D > 64) asm volatile("" : "+r"(me));
      const int mg = (me % 32) / 4, mt = me % 4, mwq = (me / 32) % 4, mwg = me / 128;
      const std::uint32_t row_base = dq_base - k_base + sl * G::dq_slot_bytes + mwg * G::dq_wg_bytes +
                                     std::uint32_t(mwq * 16 + mg) * 128 + 8 * (mt % 2);
      if (!product) {
        KVTILE_PRAGMA_UNROLL
        for (int x = 0; x < 32; ++x) acc[x] = 0.f;
      }
      KVTILE_PRAGMA_UNROLL
      for (int half = 0; half < 2; ++half) {
        KVTILE_PRAGMA_UNROLL
        for (int j = 0; j < 8; ++j) {
          const std::uint32_t at = row_base + (j / 4) * G::dq_box_bytes + half * 8 * 128 +
                                   std::uint32_t(((2 * (j % 4) + mt / 2) ^ mg) * 16);
          *reinterpret_cast<float2*>(smem + at) = make_float2(acc[4 * j + 2 * half], acc[4 * j + 2 * half + 1]);
        }
      }
      arch::fence_proxy_async_shared();
    };
    // Thread 0, after the barrier that follows a step's stage_dq: its staging slot `sl` added to
    // the workspace, a box per warpgroup and 32 columns (one bulk group).
    auto reduce_dq = [&](const step_t& st, int sl) {
      const int row = G::dq_pad_rows + int(q_row0) + st.q_start;
      KVTILE_PRAGMA_UNROLL
      for (int w = 0; w < G::warpgroups; ++w) {
        const int col0 = (G::dq_split_keys ? 0 : w) * 64;
        KVTILE_PRAGMA_UNROLL
        for (int c = 0; c < 2; ++c)
          arch::tma_reduce_add_3d(&P.dq_acc, col0 + c * G::dq_box_cols, st.h, row,
                                  dq_base + sl * G::dq_slot_bytes + w * G::dq_wg_bytes + c * G::dq_box_bytes);
      }
      arch::bulk_commit();
    };

    __syncthreads();  // the mbarriers are initialised
    int cur = next_step(0);
    fetch(cur, 0);
    // A step at a time: its own S^T and dP^T after the barrier that lands its tiles, the next
    // step's tiles fetched into the other slot. (Software-pipelining the steps, the next step's
    // S^T and dP^T issued before this step's dQ reductions, lost 14-19% at D = 64 and spills at
    // D = 128: docs/perf-log/backward.md, v5.)
    int slot = 0;
    step_t staged;         // the step whose dQ waits in staging slot slot ^ 1
    bool pending = false;  // whether it has one
    for (int it = 0; cur < total; ++it) {
      const int nxt = next_step(cur + 1);
      // The reduction issued a step ago has read staging slot `slot` (written again below).
      if (with_dq && tid == 0) arch::bulk_wait_read<0>();
      tiles_landed(it);  // this step's tiles; every warpgroup is past the previous step
      if (pending && tid == 0) reduce_dq(staged, slot ^ 1);
      fetch(nxt, slot ^ 1);
      const step_t st = step_info(cur);
      if (st.vis != tile_visibility::empty) {
        float s[32], dp[32];
        issue_sdp(s, dp, slot);
        grads(s, dp, st.vis, st.q_start, slot);
      } else {
        zero_ds();
      }
      if (with_dq) {
        float acc[32];
        issue_dq(acc, st);
        const bool product = dq_product(st);
        if (product) arch::wgmma_wait<0>();
        stage_dq(acc, slot, product);
        staged = st;
        pending = true;
      }
      // dV and dK of the step complete before the next barrier (their B operands are this
      // slot's Q and dO, refilled after it).
      arch::wgmma_wait<0>();
      arch::fence_operands(dv);
      arch::fence_operands(dk);
      slot ^= 1;
      cur = nxt;
    }
    arch::cp_async_wait<0>();
    if (pending) {
      __syncthreads();  // the last step's staging is complete
      if (tid == 0) reduce_dq(staged, slot ^ 1);
    }
    if (with_dq && tid == 0) arch::bulk_wait<0>();  // its shared memory is read before the CTA ends

    // Epilogue: dK = scale * dS^T Q and dV, through shared memory (the Q / dO ring and dS^T are
    // free once every warpgroup's last MMAs are done), so that each global store is a whole
    // 16-byte chunk of a key's row: from the fragments each thread holds 4-byte pieces of two rows
    // (at S 1k, 7 % of the D 128 kernel's stall samples were those stores; perf-log v19).
    // Rows of `pitch` elements, 16 bytes of padding: the fragment writes hit 32 banks. Not at D 128
    // without a mask: there the kernel ran 0.96-0.99x with it from S 2k (perf-log v19), so that
    // instantiation keeps storing from the fragments.
    if constexpr (D == 128 && std::is_same_v<Mask, no_mask>) {
      KVTILE_PRAGMA_UNROLL
      for (int half = 0; half < 2; ++half) {
        const int key = wk0 + key_row + half * 8;
        if (key < kv_len)
          store_dkv_row<T, D / 8>(
              p, b, key, hk, 2 * t, [&](int j, int c) { return dk[4 * j + 2 * half + c]; },
              [&](int j, int c) { return dv[4 * j + 2 * half + c]; });
      }
      return;
    }
    constexpr int pitch = D + 8;
    static_assert(2 * std::size_t(G::block_kv) * pitch * sizeof(T) <= 2 * std::size_t(G::stages) * G::q_bytes + G::ds_bytes,
                  "backward_sm90: the dK / dV tiles fit where the Q / dO ring and dS^T were");
    T* const s_dk = reinterpret_cast<T*>(smem + (q_base - k_base));
    T* const s_dv = s_dk + G::block_kv * pitch;
    __syncthreads();  // every warpgroup's last MMAs (reading Q, dO and dS^T) are done
    KVTILE_PRAGMA_UNROLL
    for (int half = 0; half < 2; ++half) {
      const int r = wg * 64 + key_row + half * 8;
      KVTILE_PRAGMA_UNROLL
      for (int j = 0; j < D / 8; ++j) {
        const int at = r * pitch + 8 * j + 2 * t;
        *reinterpret_cast<std::uint32_t*>(s_dk + at) =
            arch::pack2<T>(dk[4 * j + 2 * half] * p.scale, dk[4 * j + 2 * half + 1] * p.scale);
        *reinterpret_cast<std::uint32_t*>(s_dv + at) = arch::pack2<T>(dv[4 * j + 2 * half], dv[4 * j + 2 * half + 1]);
      }
    }
    __syncthreads();
    for (int id = tid; id < G::block_kv * G::chunks; id += G::threads) {
      const int r = id / G::chunks, c = id % G::chunks, key = k0 + r;
      if (key < kv_len) {
        *reinterpret_cast<uint4*>(p.dk + p.dk_layout.offset(b, key, hk) + 8 * c) =
            *reinterpret_cast<const uint4*>(s_dk + r * pitch + 8 * c);
        *reinterpret_cast<uint4*>(p.dv + p.dv_layout.offset(b, key, hk) + 8 * c) =
            *reinterpret_cast<const uint4*>(s_dv + r * pitch + 8 * c);
      }
    }
  }
};

// The tensor map of the fp32 dQ workspace [rows][heads][head_dim] for the kernel's reductions:
// boxes of 32 columns x box_rows rows of one head, 128-byte swizzle (stage_dq's layout). `base`
// and `rows` include the dq_pad_rows rows before the accumulator's first row.
inline CUtensorMap make_dq_acc_tma(float* base, std::int64_t rows, std::int32_t heads, int head_dim, int box_rows) {
  const cuuint64_t dims[3] = {cuuint64_t(head_dim), cuuint64_t(heads), cuuint64_t(rows)};
  const cuuint64_t strides[2] = {cuuint64_t(head_dim) * sizeof(float), cuuint64_t(heads) * head_dim * sizeof(float)};
  const cuuint32_t box[3] = {32, 1, cuuint32_t(box_rows)};
  const cuuint32_t unit[3] = {1, 1, 1};
  CUtensorMap map;
  const CUresult r = tensor_map_encoder()(&map, tensor_map_type<float>(), 3, base, dims, strides, box, unit,
                                          CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                          CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  KVTILE_REQUIRE(r == CUDA_SUCCESS, errc::unsupported, "cuTensorMapEncodeTiled refused the dQ workspace (error ", int(r),
                 "; ", rows, " rows of ", heads, " heads x ", head_dim, " fp32)");
  return map;
}

// (key blocks, kv_heads, batch).
template <class G>
dim3 backward_sm90_grid(const ragged_layout& kv, std::int32_t max_kv_len) {
  return dim3(unsigned((max_kv_len + G::block_kv - 1) / G::block_kv), unsigned(kv.heads), unsigned(kv.batch));
}

// Entry point; the body exists only in the sm_90a device pass (elsewhere an empty kernel that
// the host never launches: cuda::backward asks sm90_kernels_available first).
template <class Kernel>
KVTILE_KERNEL void __launch_bounds__(Kernel::G::threads, Kernel::G::min_ctas)
    backward_sm90_entry(const __grid_constant__ typename Kernel::params p) {
#if KVTILE_WGMMA_AVAILABLE
  extern __shared__ __align__(16) unsigned char backward_sm90_smem[];
  Kernel::run(p, backward_sm90_smem);
#else
  (void)p;
#endif
}

}  // namespace attention::cuda::detail
KVTILE_NAMESPACE_END
