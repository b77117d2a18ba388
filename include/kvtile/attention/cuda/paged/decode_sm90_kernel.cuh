// kvtile/attention/cuda/paged/decode_sm90_kernel.cuh: paged decode on Hopper, K/V pages copied
// by the Tensor Memory Accelerator (TMA).
//
// The decode shape of kernel.cuh (16 packed query rows per CTA, four warps splitting each 64-key
// tile, the same warp arithmetic: decode_warp.cuh), with one change: the loads. Each K and V
// pool is a 4-D tensor map (head_dim, heads, slots, blocks) -- (head_dim, slots, heads, blocks)
// for HND pools -- and a tile is a handful of box copies, each `box_rows` slots of one page
// (gcd(page_size, 64) rows, at least 8) x 64 columns, 128-byte swizzled. One lane per box issues
// it; the copies of a stage complete on that stage's mbarrier by transaction bytes. No thread
// computes an address per row, and the memory system sees 2 KB requests instead of 16-byte
// ones: on H100 a pure read of scattered 16-token pages ran at 3.05 TB/s this way against
// 2.89 with cp.async (docs/perf-log/decode.md, v10).
//
// Pipeline (ST stages): warp 0 fills all stages, then per tile every warp waits on the tile's
// barrier, computes, and meets at one __syncthreads, after which warp 0 refills the stage just
// consumed. Block ids of the next tile to fetch are loaded a tile ahead into warp 0's registers.
// Tiles start at multiples of 64 keys (the planner aligns each item's first key), so a box never
// crosses a page; keys past the item's end that a box brings in are masked, and their V rows
// zeroed, since a page's unwritten slots may hold anything.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "kvtile/attention/cuda/arch/cp_async.cuh"
#include "kvtile/attention/cuda/arch/mbarrier.cuh"
#include "kvtile/attention/cuda/arch/tma.cuh"
#include "kvtile/attention/cuda/paged/decode_warp.cuh"
#include "kvtile/core/fast_divmod.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda::paged {

// The K and V pools as the kernel's TMA sees them.
struct tma_pool {
  CUtensorMap k, v;
  std::int32_t box_rows;    // slots per box copy
  std::int32_t head_outer;  // 1: the map's dims are (D, slots, heads, blocks) (HND); 0: (D, heads, slots, blocks)
};

template <int D>
struct decode_sm90_config {
  static constexpr paged_kernel_shape shape = paged_shape_for(paged_kernel_kind::decode_sm90, D);
  static constexpr int bm = shape.block_m, bn = shape.block_n, wn = shape.warps_n, stages = shape.stages;
  static constexpr int threads = shape.threads();
  static constexpr int panel = 64;  // columns per swizzled panel (128 bytes of 2-byte elements)
  static_assert(D % panel == 0 && D <= 256, "decode_sm90: head_dim must be a multiple of 64 up to 256");
  static_assert(bm == 16 && shape.warps_m == 1 && bn % (16 * wn) == 0, "decode_sm90: one row group of 16, 16-key warp slices");
  static_assert(bn / 8 <= 32, "decode_sm90: one lane of warp 0 per box of a tile (box_rows >= 8)");
};

// The K and V tensor maps of a pool (host). The pool's layout picks the order of the middle
// dims so strides grow outward; throws errc::unsupported for a pool TMA cannot describe.
template <class T>
tma_pool make_tma_pool(const paging::kv_pool_view<T>& pool) {
  const int box_rows = decode_sm90_box_rows(pool.page_size);
  KVTILE_REQUIRE(box_rows >= 8 && pool.head_dim % 64 == 0, errc::unsupported, "the TMA decode kernel needs head_dim % 64 == 0 (got ",
                 pool.head_dim, ") and gcd(page_size, 64) >= 8 (page_size ", pool.page_size, ")");
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
  const cuuint32_t box[4] = {64, head_outer ? cuuint32_t(box_rows) : 1u, head_outer ? 1u : cuuint32_t(box_rows), 1};
  const cuuint32_t unit[4] = {1, 1, 1, 1};
  const auto encode = detail::tensor_map_encoder();
  const auto type = std::is_same_v<T, kvtile::bfloat16> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
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

template <class T, int D, class Mask, class Table>
KVTILE_KERNEL void __launch_bounds__(decode_sm90_config<D>::threads, 2)
    paged_decode_sm90_kernel(const kernel_params<T, Table, Mask> p, const __grid_constant__ tma_pool pool) {
#if KVTILE_WGMMA_AVAILABLE
  if constexpr (merge_early == 1) arch::launch_dependents();  // the merge grid may start; it waits for this grid
  using C = decode_sm90_config<D>;
  constexpr int BM = C::bm, BN = C::bn, WN = C::wn, ST = C::stages, NT = C::threads;
  constexpr int TPW = BN / WN;  // keys per warp per tile
  constexpr int CPR = D / 8;    // 16-byte chunks per Q row
  constexpr int PANELS = D / C::panel;
  using Layout = swizzled_tile<D, BN>;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  // 128-byte swizzled boxes land on 1024-byte boundaries.
  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<std::uintptr_t>(smem_raw) + 1023) & ~std::uintptr_t(1023));
  T* k_s = reinterpret_cast<T*>(smem);
  T* v_s = k_s + ST * BN * D;
  T* q_s = v_s + ST * BN * D;  // padded rows
  std::uint64_t* full = reinterpret_cast<std::uint64_t*>(q_s + BM * (D + 8));

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wn = warp;
  const int g = lane / 4, tq = lane % 4;

  const item_tiles<BM, BN, Mask> it(p);
  const paged_work_item& w = it.w;
  const int kvh = w.kv_head, row0 = w.row0, group = p.group, rows = it.rows;
  const int kv_begin = w.kv_begin, kv_end = w.kv_end, n_tiles = it.n_tiles;
  const Mask& mask = it.mask;

  it.template q_chunks<D>(p, tid, NT, [&](int r, int c, const T* src, bool valid) {
    arch::cp_async_16(q_s + padded_tile<D>::at(r, c * 8), src, valid);
  });
  arch::cp_async_commit();
  if (tid == 0) {
    KVTILE_PRAGMA_UNROLL
    for (int s = 0; s < ST; ++s) arch::mbarrier_init(arch::smem_addr(full + s), 1);
    arch::fence_barrier_init();
  }

  // Warp 0 issues the copies: lane i owns box i of a tile (BN / box_rows <= 8 boxes).
  const int box = pool.box_rows;
  const std::int32_t* pages = page_row(p.kv.table, w);
  const fast_divmod page(p.kv.pool.page_size);
  std::int32_t blk = 0, slot = 0;  // this lane's box of the next tile to fetch
  auto fetch_blocks = [&](int tile) {
    const int k0 = kv_begin + tile * BN, tok = k0 + lane * box;
    if (tile < n_tiles && tok < min_i(k0 + BN, kv_end)) {
      blk = pages[page.div(tok)];
      slot = page.mod(tok);
    }
  };
  auto issue = [&](int stage, int tile) {
    const int k0 = kv_begin + tile * BN, n = min_i(BN, kv_end - k0);
    const int boxes = (n + box - 1) / box;
    const std::uint32_t bar = arch::smem_addr(full + stage);
    if (lane == 0) arch::mbarrier_arrive_expect_tx(bar, std::uint32_t(boxes) * box * D * sizeof(T) * 2);
    __syncwarp();
    if (lane < boxes) {
      const int c1 = pool.head_outer ? slot : kvh, c2 = pool.head_outer ? kvh : slot;
      KVTILE_PRAGMA_UNROLL
      for (int pn = 0; pn < PANELS; ++pn) {
        const int off = stage * BN * D + pn * BN * C::panel + lane * box * C::panel;
        arch::tma_load_4d(arch::smem_addr(k_s + off), &pool.k, pn * C::panel, c1, c2, blk, bar);
        arch::tma_load_4d(arch::smem_addr(v_s + off), &pool.v, pn * C::panel, c1, c2, blk, bar);
      }
    }
  };

  warp_rows<T, D, TPW> st;
  st.init();
  int t_row[2];
  KVTILE_PRAGMA_UNROLL
  for (int i = 0; i < 2; ++i) t_row[i] = (row0 + g + 8 * i) / group;

  int cur = it.next_tile(0);
  int fetch = cur;
  __syncthreads();  // barriers initialised
  if (warp == 0) {
    fetch_blocks(fetch);
    KVTILE_PRAGMA_UNROLL
    for (int s = 0; s < ST; ++s)
      if (fetch < n_tiles) {
        issue(s, fetch);
        fetch = it.next_tile(fetch + 1);
        fetch_blocks(fetch);
      }
  }
  arch::cp_async_wait<0>();
  __syncthreads();  // Q has landed
  st.load_q(q_s, 0, lane);

  for (int i = 0; cur < n_tiles; ++i) {
    const int stage = i % ST;
    arch::mbarrier_wait(arch::smem_addr(full + stage), (i / ST) & 1);
    const T* ks = k_s + stage * BN * D;
    T* vs = v_s + stage * BN * D;
    const int k0 = kv_begin + cur * BN, k1 = min_i(k0 + BN, kv_end);
    if (k1 - k0 < BN) {
      // The last tile: V rows past the end (a box's unwritten slots, or a stage's older rows)
      // become zeros, so that P = 0 times them stays 0.
      for (int idx = tid; idx < (BN - (k1 - k0)) * CPR; idx += NT) {
        const int r = k1 - k0 + idx / CPR, c = (idx % CPR) * 8;
        *reinterpret_cast<uint4*>(vs + Layout::at(r, c)) = make_uint4(0, 0, 0, 0);
      }
      __syncthreads();
    }
    float s[TPW / 8][4];
    st.template scores<Layout>(s, ks, wn * TPW, lane);
    const bool partial = k1 - k0 < BN || it.visibility(cur) != tile_visibility::full;
    st.scale_mask(s, p.scale_log2, partial, k0 + wn * TPW, k1, mask, t_row, tq);
    st.softmax(s);
    st.template accumulate<Layout>(s, vs, wn * TPW, lane);
    __syncthreads();  // every warp is done with this stage
    if (warp == 0 && fetch < n_tiles) {
      issue(stage, fetch);
      fetch = it.next_tile(fetch + 1);
      fetch_blocks(fetch);
    }
    cur = it.next_tile(cur + 1);
  }

  if constexpr (merge_early == 2) arch::launch_dependents();
  finish_rows<BM, NT, WN>(p, w, rows, st, smem);
#else
  (void)p;
  (void)pool;
#endif
}

}  // namespace attention::cuda::paged
KVTILE_NAMESPACE_END
