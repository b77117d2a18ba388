// kvtile/attention/cuda/paged/decode_sm90_kernel.cuh: paged decode on Hopper, K/V pages copied
// by the Tensor Memory Accelerator (TMA).
//
// The decode shape of kernel.cuh (16 packed query rows per CTA, four warps splitting each 64-key
// tile, the same warp arithmetic: decode_warp.cuh); what differs is the loads. Each K and V
// pool is a 4-D tensor map (head_dim, heads, slots, blocks) -- (head_dim, slots, heads, blocks)
// for HND pools -- and a tile is a handful of box copies, each `box_rows` slots of one page
// (gcd(page_size, 64) rows, at least 8) x 64 columns, 128-byte swizzled. One lane per box issues
// it; the copies of a stage complete on that stage's mbarrier by transaction bytes. No thread
// computes an address per row, and the memory system sees 2 KB requests instead of 16-byte
// ones: on H100 a pure read of scattered 16-token pages ran at 3.05 TB/s this way against
// 2.89 with cp.async (docs/perf-log/decode.md, v10).
//
// Warps: four consumer warps share each 64-key tile (the decode shape's arithmetic) and one
// producer warp issues the copies into an ST-stage ring: per stage a `full` mbarrier (the copies'
// transaction bytes) and an `empty` one (one arrival per consumer warp); no CTA-wide barrier per
// tile. Block ids of the next tile are loaded while the producer waits for a free stage.
// Tiles start at multiples of 64 keys (the planner aligns each item's first key), so a box never
// crosses a page; keys past the item's end that a box brings in are masked, and their V rows
// zeroed, since a page's unwritten slots may hold anything.
//
// Two grid shapes (the planner picks): a CTA per work item, two per SM (large batches), or one
// CTA per SM running a contiguous run of items (small batches, keys cut evenly over the SMs):
// the producer then runs on into the next item while the consumers finish the current one, the
// next item's Q loads meanwhile, and the epilogue reduces in shared memory of its own.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "kvtile/attention/cuda/arch/cp_async.cuh"
#include "kvtile/attention/cuda/arch/mbarrier.cuh"
#include "kvtile/attention/cuda/arch/tma.cuh"
#include "kvtile/attention/cuda/arch/wgmma.cuh"
#include "kvtile/attention/cuda/paged/decode_warp.cuh"
#include "kvtile/core/fast_divmod.hpp"
#include "kvtile/memory/kv_codec.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda::paged {

// The K and V pools as the kernel's TMA sees them.
struct tma_pool {
  CUtensorMap k, v;
  std::int32_t box_rows;    // slots per box copy
  std::int32_t head_outer;  // 1: the map's dims are (D, slots, heads, blocks) (HND); 0: (D, heads, slots, blocks)
};

// EB: bytes per stored K/V element (2: fp16 / bf16, 1: fp8 e4m3).
template <int D, int EB = 2>
struct decode_sm90_config {
  static constexpr paged_kernel_shape shape = paged_shape_for(paged_kernel_kind::decode_sm90, D, EB);
  static constexpr int bm = shape.block_m, bn = shape.block_n, wn = shape.warps_n, stages = shape.stages;
  static constexpr int consumers = shape.threads();  // the warps that compute
  static constexpr int threads = consumers + 32;     // and one producer warp issuing the copies
  static constexpr int panel = 128 / EB;             // columns per swizzled panel (128 bytes)
  static_assert(D % panel == 0 && D <= 256, "decode_sm90: head_dim must be whole 128-byte panels, up to 256");
  static_assert(bm == 16 && shape.warps_m == 1 && bn % (16 * wn) == 0, "decode_sm90: one row group of 16, 16-key warp slices");
  static_assert(bn / 8 <= 32, "decode_sm90: one lane of warp 0 per box of a tile (box_rows >= 8)");
};

// The K and V tensor maps of a pool (host): boxes of 128 bytes of a row (64 fp16 / bf16
// elements, 128 fp8 ones) x box_rows slots. The pool's layout picks the order of the middle dims
// so strides grow outward; throws errc::unsupported for a pool TMA cannot describe. An fp8
// pool's per-token scales sit after each block's elements, outside what the maps cover.
template <class T>
tma_pool make_tma_pool(const paging::kv_pool_view<T>& pool) {
  const int box_rows = decode_sm90_box_rows(pool.page_size);
  constexpr int panel = 128 / int(sizeof(T));
  KVTILE_REQUIRE(box_rows >= 8 && pool.head_dim % panel == 0, errc::unsupported, "the TMA decode kernel needs head_dim % ", panel,
                 " == 0 (got ", pool.head_dim, ") and gcd(page_size, 64) >= 8 (page_size ", pool.page_size, ")");
  const std::uint64_t eb = sizeof(T);
  const bool head_outer = pool.stride_head > pool.stride_token;
  tma_pool m;
  m.box_rows = box_rows;
  m.head_outer = head_outer ? 1 : 0;
  const cuuint64_t heads = cuuint64_t(pool.num_kv_heads), slots = cuuint64_t(pool.page_size);
  const cuuint64_t dims[4] = {cuuint64_t(pool.head_dim), head_outer ? slots : heads, head_outer ? heads : slots,
                              cuuint64_t(pool.num_blocks)};
  const std::int64_t s1 = head_outer ? pool.stride_token : pool.stride_head;
  const std::int64_t s2 = head_outer ? pool.stride_head : pool.stride_token;
  const cuuint64_t strides[3] = {cuuint64_t(s1) * eb, cuuint64_t(s2) * eb, cuuint64_t(pool.stride_block) * eb};
  const cuuint32_t box[4] = {cuuint32_t(panel), head_outer ? cuuint32_t(box_rows) : 1u, head_outer ? 1u : cuuint32_t(box_rows), 1};
  const cuuint32_t unit[4] = {1, 1, 1, 1};
  const auto encode = detail::tensor_map_encoder();
  const auto type = detail::tensor_map_type<T>();
  for (int which = 0; which < 2; ++which) {
    CUtensorMap& map = which == 0 ? m.k : m.v;
    void* base = const_cast<T*>(which == 0 ? pool.k : pool.v);
    const CUresult r = encode(&map, type, 4, base, dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                              CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    KVTILE_REQUIRE(r == CUDA_SUCCESS, errc::unsupported, "cuTensorMapEncodeTiled refused the ", which == 0 ? "K" : "V",
                   " pool (error ", int(r), "; strides in bytes ", strides[0], ", ", strides[1], ", ", strides[2],
                   " must be multiples of 16 below 2^40, blocks ", pool.num_blocks, ")");
  }
  return m;
}

// The tensor maps of a pool, from a small per-thread cache of the pools run on lately (a serving
// step runs every layer's pool; encoding costs host time on every run otherwise).
template <class T>
const tma_pool& cached_tma_pool(const paging::kv_pool_view<T>& pool) {
  struct entry {
    paging::kv_pool_view<T> key;
    tma_pool maps;
    bool used = false;
  };
  auto same = [](const paging::kv_pool_view<T>& a, const paging::kv_pool_view<T>& b) {
    return a.k == b.k && a.v == b.v && a.stride_block == b.stride_block && a.stride_token == b.stride_token &&
           a.stride_head == b.stride_head && a.num_blocks == b.num_blocks && a.page_size == b.page_size &&
           a.num_kv_heads == b.num_kv_heads && a.head_dim == b.head_dim;
  };
  thread_local std::array<entry, 64> cache{};
  thread_local std::size_t next = 0;
  for (const entry& e : cache)
    if (e.used && same(e.key, pool)) return e.maps;
  const tma_pool maps = make_tma_pool(pool);  // throws before the cache changes
  entry& e = cache[next++ % cache.size()];
  e.key = pool;
  e.maps = maps;
  e.used = true;
  return e.maps;
}

// Runs: CTA c runs the items [p.cta_items[c], p.cta_items[c + 1]) (one CTA per SM); otherwise
// CTA c runs item c (two CTAs per SM up to D = 128).
//
// Codec: the pool's element format. fp8 e4m3 pages (memory/kv_codec.hpp) move as bytes, 128
// keys per tile so that a stage holds the bytes of a bf16 one; each consumer warp reads its 32
// keys' fragments straight from the swizzled byte tile and converts them in registers
// (decode_warp.cuh: scores_fp8, accumulate_fp8; Q in the matching head-dim order). Per-token
// scales come with the tile: a box's slots of one head have their scales contiguous in the
// block (kv_codec.hpp), so the lane that issues a box also copies its K and V scales with one
// bulk copy each, on the stage's `full` barrier like the boxes.
template <class T, int D, class Mask, class Table, bool Runs, class Codec = memory::identity>
KVTILE_KERNEL void __launch_bounds__(decode_sm90_config<D, int(sizeof(typename Codec::template storage<T>))>::threads,
                                     Runs ? 1 : 2)
    paged_decode_sm90_kernel(const kernel_params<T, Table, Mask, Codec> p, const __grid_constant__ tma_pool pool) {
  using S = typename Codec::template storage<T>;  // the stored element: T, or e4m3 bytes
  constexpr int EB = int(sizeof(S));
  constexpr bool FP8 = Codec::quantized;
  using C = decode_sm90_config<D, EB>;
  using F = std::conditional_t<FP8, fp8_compute_t, T>;  // the fragments' type
  static_assert(!FP8 || !has_rotary<Mask>, "decode_sm90: fp8 fragments come in a permuted head-dim order, no rotary");
  constexpr int BM = C::bm, BN = C::bn, WN = C::wn, ST = C::stages;
  constexpr int Q_TILE = BM * (D + 8);                    // elements of one padded Q tile
  constexpr int RED_BYTES = WN * 16 * ((D + 4) * 4 + 8);  // finish_rows' reduction area
  // The stages: K and V tiles, then (fp8) each stage's K and V scales.
  constexpr std::size_t STAGE_BYTES = std::size_t(2) * ST * BN * (D * EB + (FP8 ? sizeof(float) : 0));
  static_assert(1024 + (Runs ? STAGE_BYTES + 2 * Q_TILE * sizeof(T) + RED_BYTES
                             : (RED_BYTES > STAGE_BYTES ? RED_BYTES : STAGE_BYTES) + Q_TILE * sizeof(T)) +
                        16 * std::size_t(ST) <=
                    C::shape.decode_sm90_smem_bytes(D, EB, Runs),
                "decode_sm90: layout exceeds the shared memory the launch gives");
#if KVTILE_WGMMA_AVAILABLE
  if constexpr (merge_early == 1) arch::launch_dependents();  // the merge grid may start; it waits for this grid
  constexpr bool token_scales = memory::per_token_scales<Codec>;
  constexpr int NT = C::consumers;
  constexpr int TPW = BN / WN;  // keys per warp per tile
  constexpr int PANELS = D / C::panel;
  constexpr int CONSUMER_BAR = 1;  // named barrier of the NT consumer threads
  // Arrivals that free a stage: one per consumer warp after __syncwarp, or, where the threads
  // read per-token scales with plain loads from it, one per consumer thread, so that each
  // thread's reads are ordered before the copies that refill the stage by its own arrival.
  constexpr int EMPTY_ARRIVALS = token_scales ? NT : WN;
  using Bytes = swizzled_byte_tile<D * EB, BN>;  // byte offsets in a stage's K or V tile

  extern __shared__ __align__(16) unsigned char smem_raw[];
  // 128-byte swizzled boxes land on 1024-byte boundaries.
  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<std::uintptr_t>(smem_raw) + 1023) & ~std::uintptr_t(1023));
  S* k_s = reinterpret_cast<S*>(smem);
  S* v_s = k_s + ST * BN * D;
  float* ksc_s = reinterpret_cast<float*>(v_s + ST * BN * D);  // fp8 per-token scales: [ST][BN] for K, then V
  float* vsc_s = ksc_s + ST * BN;
  // Runs: two padded Q tiles (this item's and the next one's) and a reduction area of its own;
  // one item: one Q tile, and the epilogue reduces in the stages (every copy has landed by then).
  constexpr std::size_t RED_OVER_STAGES = RED_BYTES > STAGE_BYTES ? RED_BYTES - STAGE_BYTES : 0;
  T* q_s = reinterpret_cast<T*>(smem + STAGE_BYTES + (Runs ? 0 : RED_OVER_STAGES));
  unsigned char* red = Runs ? reinterpret_cast<unsigned char*>(q_s + 2 * Q_TILE) : smem;
  std::uint64_t* full = reinterpret_cast<std::uint64_t*>(Runs ? red + RED_BYTES : reinterpret_cast<unsigned char*>(q_s + Q_TILE));
  std::uint64_t* empty = full + ST;  // full: a stage's copies have landed; empty: every consumer warp is done with it

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int item_begin = Runs ? p.cta_items[blockIdx.x] : int(blockIdx.x);
  const int item_end = Runs ? p.cta_items[blockIdx.x + 1] : item_begin + 1;
  if (tid == 0) {
    KVTILE_PRAGMA_UNROLL
    for (int s = 0; s < ST; ++s) {
      // The copies' transaction bytes and the arrival that sets them.
      arch::mbarrier_init(arch::smem_addr(full + s), 1);
      arch::mbarrier_init(arch::smem_addr(empty + s), EMPTY_ARRIVALS);
    }
    arch::fence_barrier_init();
  }
  __syncthreads();  // barriers initialised

  using View = item_tiles<BM, BN, Mask>;
  if (warp == WN) {
    // The producer warp walks the CTA's items tile by tile, ST stages ahead of the consumers at
    // most: lane i issues box i of a tile (BN / box_rows <= 16 boxes); its block id and slot are
    // loaded for the next tile right after a tile is issued, while the warp waits for a stage.
    const int box = pool.box_rows;
    const fast_divmod page(p.kv.pool.page_size);
    int item = item_begin;
    View fv(p, item);
    int tile = fv.next_tile(0);
    auto seek = [&] {  // past items with no tile left
      while (tile >= fv.n_tiles && item + 1 < item_end) {
        fv = View(p, ++item);
        tile = fv.next_tile(0);
      }
    };
    seek();  // work items: the plan's, not written by the grid before this one
    // Launched early, the grid before this one may still be writing the page table, Q and K/V:
    // copies wait for it. Meanwhile a persistent CTA prefetches its first stages' boxes into L2,
    // from page ids read around L1; a stale id costs a wasted prefetch only, since that grid's
    // writes land in L2 and only copies issued after the wait reach shared memory. (One-item
    // CTAs skip it: most start long after the grid before has finished, where the second
    // page-id read only delays them; decode.md v15.)
    if (Runs && p.early) {
      int t = tile;
      for (int j = 0; j < ST && t < fv.n_tiles; ++j, t = fv.next_tile(t + 1)) {
        const int tok = fv.key0(t) + lane * box;
        if (tok < fv.key1(t)) {
          const std::int32_t b = __ldcg(page_row(p.kv.table, fv.w) + page.div(tok)), s = page.mod(tok);
          const int c1 = pool.head_outer ? s : fv.w.kv_head, c2 = pool.head_outer ? fv.w.kv_head : s;
          KVTILE_PRAGMA_UNROLL
          for (int pn = 0; pn < PANELS; ++pn) {
            arch::tma_prefetch_4d(&pool.k, pn * C::panel, c1, c2, b);
            arch::tma_prefetch_4d(&pool.v, pn * C::panel, c1, c2, b);
          }
        }
      }
    }
    arch::wait_primary_grid();
    std::int32_t blk = 0, slot = 0;
    auto fetch_blocks = [&] {
      const int tok = fv.key0(tile) + lane * box;
      if (tile < fv.n_tiles && tok < fv.key1(tile)) {
        blk = page_row(p.kv.table, fv.w)[page.div(tok)];
        slot = page.mod(tok);
      }
    };
    fetch_blocks();
    for (int j = 0; tile < fv.n_tiles; ++j) {
      const int stage = j % ST;
      if (j >= ST) arch::mbarrier_wait(arch::smem_addr(empty + stage), ((j / ST) - 1) & 1);
      const int k0 = fv.key0(tile), k1 = fv.key1(tile);
      const int boxes = (k1 - k0 + box - 1) / box;
      const std::uint32_t bar = arch::smem_addr(full + stage);
      constexpr int SCALE_BYTES = token_scales ? 2 * int(sizeof(float)) : 0;  // per row: its K and V scale
      if (lane == 0) arch::mbarrier_arrive_expect_tx(bar, std::uint32_t(boxes) * box * (D * EB * 2 + SCALE_BYTES));
      __syncwarp();
      const int kvh = fv.w.kv_head;
      if (lane < boxes) {
        const int c1 = pool.head_outer ? slot : kvh, c2 = pool.head_outer ? kvh : slot;
        KVTILE_PRAGMA_UNROLL
        for (int pn = 0; pn < PANELS; ++pn) {
          const int off = stage * BN * D + pn * BN * C::panel + lane * box * C::panel;
          arch::tma_load_4d(arch::smem_addr(k_s + off), &pool.k, pn * C::panel, c1, c2, blk, bar);
          arch::tma_load_4d(arch::smem_addr(v_s + off), &pool.v, pn * C::panel, c1, c2, blk, bar);
        }
        if constexpr (token_scales) {
          // The box's scales: box_rows (a multiple of 8) floats at a 16-byte aligned slot. Those
          // of slots past the item's keys are whatever the block holds; the consumers zero them
          // in the V scales (the K ones meet masked scores only).
          const auto& kv = p.kv.pool;
          const std::uint32_t sb = std::uint32_t(box) * sizeof(float);
          arch::bulk_load(arch::smem_addr(ksc_s + stage * BN + lane * box), kv.scale_ptr(kv.k, blk, slot, kvh), sb, bar);
          arch::bulk_load(arch::smem_addr(vsc_s + stage * BN + lane * box), kv.scale_ptr(kv.v, blk, slot, kvh), sb, bar);
        }
      }
      tile = fv.next_tile(tile + 1);
      seek();
      fetch_blocks();
    }
    if constexpr (merge_early == 2) arch::launch_dependents();
    return;
  }

  // The consumer warps: each computes TPW keys of every tile for the item's 16 rows.
  const int wn = warp;
  const int g = lane / 4;
  auto consumers_sync = [] { arch::named_barrier_sync(CONSUMER_BAR, NT); };
  // The packed query rows of an item into Q tile `buf`, as one cp.async group.
  auto load_q = [&](const View& it, int buf) {
    it.template q_chunks<D>(p, tid, NT, [&](int r, int c, const T* src, bool valid) {
      arch::cp_async_16(q_s + buf * Q_TILE + padded_tile<D>::at(r, c * 8), src, valid);
    });
    arch::cp_async_commit();
  };
  {
    const View first(p, item_begin);
    arch::wait_primary_grid();  // as in the producer: Q, and O / LSE / partials written below
    load_q(first, 0);
  }

  int i = 0;  // tiles consumed: stage i % ST, barrier phase (i / ST) & 1
  for (int item = item_begin; item < item_end; ++item) {
    const int buf = (item - item_begin) & 1;
    // A rotary variant's table for this item (the previous item's last reads of it are before
    // the first barrier of its epilogue).
    if constexpr (has_rotary<Mask>) fill_rotary_table<D>(View(p, item).mask, tid, NT);
    // The next item's Q goes into the other tile (its last reader, the previous item, is past
    // a barrier) while this item runs.
    if (item + 1 < item_end) {
      load_q(View(p, item + 1), buf ^ 1);
      arch::cp_async_wait<1>();
    } else {
      arch::cp_async_wait<0>();
    }
    consumers_sync();  // this item's Q and table are there; the previous item's epilogue is done with `red`
    const View it(p, item);
    const Mask& mask = it.mask;
    item_scales<F, Codec> scales(p.kv.pool, it.w.kv_head, p.scale_log2);
    warp_rows<F, D, TPW> st;
    st.init();
    int t_row[2];
    KVTILE_PRAGMA_UNROLL
    for (int r = 0; r < 2; ++r) t_row[r] = (it.w.row0 + g + 8 * r) / p.group;
    if constexpr (FP8) {
      scales.scale_log2 *= st.load_q_fp8_order(q_s + buf * Q_TILE, 0, lane);
    } else {
      st.load_q(q_s + buf * Q_TILE, 0, lane);
      st.rotate_q(mask, t_row, lane);
    }

    for (int cur = it.next_tile(0); cur < it.n_tiles; cur = it.next_tile(cur + 1), ++i) {
      const int stage = i % ST;
      arch::mbarrier_wait(arch::smem_addr(full + stage), (i / ST) & 1);
      const S* ks = k_s + stage * BN * D;
      S* vs = v_s + stage * BN * D;
      const int k0 = it.key0(cur), k1 = it.key1(cur);
      if (k1 - k0 < BN) {
        // The item's last tile: V rows past its end (a box's unwritten slots, or a stage's older
        // rows) become zeros, so that P = 0 times them stays 0, and so do their per-token V
        // scales (a tile's largest V scale is O's unit, item_scales). The consumers meet first (their
        // reads of this stage's previous tile are ordered through the mbarriers already, but
        // not visibly to a race checker); the copies that refill the stage are ordered after
        // these writes by the proxy fence and the empty barrier.
        constexpr int CPR = D * EB / 16;  // 16-byte chunks per row
        consumers_sync();
        for (int idx = tid; idx < (BN - (k1 - k0)) * CPR; idx += NT) {
          const int r = k1 - k0 + idx / CPR, c = (idx % CPR) * 16;
          *reinterpret_cast<uint4*>(reinterpret_cast<unsigned char*>(vs) + Bytes::at(r, c)) = make_uint4(0, 0, 0, 0);
        }
        if constexpr (token_scales)
          for (int r = k1 - k0 + tid; r < BN; r += NT) vsc_s[stage * BN + r] = 0.f;
        arch::fence_proxy_async_shared();
        consumers_sync();
      }
      typename warp_rows<F, D, TPW>::tile_scores s;
      if constexpr (FP8)
        st.template scores_fp8<Bytes>(s, reinterpret_cast<const std::uint8_t*>(ks), wn * TPW, lane);
      else
        st.template scores<swizzled_tile<D, BN>>(s, ks, wn * TPW, lane, mask, k0);
      const bool partial = k1 - k0 < BN || it.visibility(cur) != tile_visibility::full;
      st.tile_softmax(s, scales, ksc_s + stage * BN + wn * TPW, vsc_s + stage * BN + wn * TPW, partial, k0 + wn * TPW, k1, mask,
                      t_row, lane);
      if constexpr (FP8)
        st.template accumulate_fp8<Bytes>(s, reinterpret_cast<const std::uint8_t*>(vs), wn * TPW, lane);
      else
        st.template accumulate<swizzled_tile<D, BN>>(s, vs, wn * TPW, lane);
      if constexpr (token_scales) {
        arch::mbarrier_arrive(arch::smem_addr(empty + stage));  // this thread is done with the stage
      } else {
        __syncwarp();
        if (lane == 0) arch::mbarrier_arrive(arch::smem_addr(empty + stage));  // this warp is done with the stage
      }
    }

    if constexpr (merge_early == 2)
      if (item + 1 == item_end) arch::launch_dependents();
    if constexpr (!Runs) consumers_sync();  // the reduction area overlays the stages: every warp is past its last tile
    scales.finish(st);
    finish_rows<BM, NT, WN, FP8>(p, it.w, it.rows, st, red, consumers_sync);
  }
#else
  (void)p;
  (void)pool;
#endif
}

}  // namespace attention::cuda::paged
KVTILE_NAMESPACE_END
