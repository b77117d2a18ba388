// kvtile/attention/cuda/paged/append_sm90_ws_kernel.cuh: the paged append ("chunked prefill")
// on Hopper as a source of the warp-specialised wgmma mainloop (prefill_sm90/ws_kernel.cuh).
//
// A CTA runs one planned work item (a row tile of a request's GQA-packed query rows against a
// range of its keys, whole or a split chunk). What differs from the dense source:
//   Q     packed rows (token t, head h of the KV head's group) are no tensor map's box, so the
//         consumer threads copy them with cp.async once, before the first tile;
//   K, V  the producer warp copies each 128-key tile as TMA boxes of one page each through
//         the pool's 4-D tensor maps (those of the TMA decode kernel: box_rows slots x 64
//         columns), lane l box l, its block id looked up in the request's page row while the
//         warp waits for the tile's slot (a tile ahead of its copies); tiles start at
//         multiples of the tile (the planner aligns each item's first key), so a box never
//         crosses a page; keys past the request's end come from past its last page's written
//         slots, and their V rows are zeroed before the last P V;
//   O     straight to the output, or a split item's fp32 partial state for the merge.
// The plan is the cp.async append kernel's (same rows and keys per item); the launcher picks
// this kernel where the pool has tensor maps (decode_sm90_supported page sizes).
//
// Codec: fp8 e4m3 pages (memory/kv_codec.hpp) come as boxes of 128 bytes (the fp8 tensor maps
// of the TMA decode kernel) into the upper half of each T slot, and per-token scales as one bulk
// copy per box (a box's slots of one head have their scales contiguous in the block), on the same
// barrier; the core's producer warps convert them (sm90_ws_core::convert_tile). Per-head scales:
// the K scale joins the softmax scale, the V scale the output (o_factor).
#pragma once

#include <cstdint>

#include "kvtile/attention/cuda/arch/cp_async_shared.cuh"
#include "kvtile/attention/cuda/arch/tma.cuh"
#include "kvtile/attention/cuda/paged/append_sm90_kernel.cuh"
#include "kvtile/attention/cuda/paged/decode_sm90_kernel.cuh"
#include "kvtile/attention/cuda/paged/decode_warp.cuh"
#include "kvtile/attention/cuda/prefill_sm90/ws_kernel.cuh"
#include "kvtile/core/fast_divmod.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda::paged {

// The warp-specialised append tile: the dense prefill's default, whose rows and keys per CTA
// are the cp.async append kernel's (so one plan serves both).
template <int D>
using append_ws_tile = detail::sm90_default_tile_t<D>;

template <class T, int D, class Mask, class Table, class Codec = memory::identity>
struct append_ws_source {
  using Tile = append_ws_tile<D>;
  using G = detail::ws_geometry<T, D, Tile>;
  using core = detail::sm90_ws_core<T, D, Tile, Mask, Codec>;
  using S = typename Codec::template storage<T>;  // the stored element: T, or e4m3 bytes
  static constexpr int panel = 128 / int(sizeof(S));  // elements per 128-byte box row
  static constexpr bool q_by_consumers = true;
  static constexpr bool zero_v_tail = true;
  static_assert(paged_shape_for(paged_kernel_kind::append_sm90, D).block_m == G::block_q &&
                    paged_shape_for(paged_kernel_kind::append_sm90, D).block_n == G::block_kv,
                "paged append (warp-specialised): the planner's rows and keys per item must be the tile's");

  const kernel_params<T, Table, Mask, Codec>& p;
  const tma_pool& pool;
  paged_work_item w;
  int q_start = 0, row_lo = 0, row_hi, kv_lo, kv_hi, kv_limit;
  int group;
  Mask mask;
  float scale_log2;
  float o_factor = 1.f;  // per-head scales: the V scale
  const std::int32_t* pages;
  fast_divmod page;

  KVTILE_DEVICE append_ws_source(const kernel_params<T, Table, Mask, Codec>& pp, const tma_pool& maps)
      : p(pp), pool(maps), w(pp.work[blockIdx.x]), mask(pp.mask, w.q_len, w.kv_len), page(pp.kv.pool.page_size) {
    group = p.group;
    row_hi = min_i(G::block_q, w.q_len * group - w.row0);
    kv_lo = w.kv_begin;
    kv_hi = w.kv_end;
    kv_limit = w.kv_end;  // a split chunk ends on a tile boundary, the hull at or before kv_len
    scale_log2 = p.scale_log2;
    if constexpr (memory::per_head_scales<Codec>) {
      // The softmax folds its scale into exp2, which needs it positive: a zero K scale (a head of
      // zeros) is taken as the smallest normal float, the same weights.
      scale_log2 *= max_f(p.kv.pool.k_scale[w.kv_head], 1.17549435e-38f);
      o_factor = p.kv.pool.v_scale[w.kv_head];
    }
    pages = page_row(p.kv.table, w);
  }

  KVTILE_DEVICE KVTILE_FORCEINLINE int token(int r) const { return (w.row0 + r) / group; }
  KVTILE_DEVICE KVTILE_FORCEINLINE int head(int r) const { return w.kv_head * group + (w.row0 + r) % group; }
  KVTILE_DEVICE KVTILE_FORCEINLINE int k_start(int k0) const { return k0; }

  // The Q tile by the consumer threads (ctid of n): 16-byte chunks into the SW128 layout, rows
  // past the request's zero-filled.
  KVTILE_DEVICE KVTILE_FORCEINLINE void load_q(std::uint32_t smem, int ctid, int n) const {
    constexpr int chunks = D / 8;
    for (int x = ctid; x < G::block_q * chunks; x += n) {
      const int r = x / chunks, c = x % chunks;
      const bool ok = r < row_hi;
      const T* src = ok ? p.q.at(w.batch, token(r), head(r)) + c * 8 : p.q.data;
      arch::cp_async_16_to(smem + arch::sw128_offset(G::block_q, r, c), src, ok);
    }
  }
  // The producer warp shares a tile's copies: lane l copies box l (ws_warp_issue), whose page
  // it looks up while the warp waits for the tile's slot.
  static constexpr bool warp_issue = true;
  struct box_at {
    int box = -1;  // this lane's box of the tile, or -1 (a lane past the tile's boxes)
    int blk = 0, slot = 0;
  };
  KVTILE_DEVICE KVTILE_FORCEINLINE box_at locate(int k0, int lane) const {
    box_at a;
    if (lane < G::block_kv / pool.box_rows) {
      // A box past the request's pages reads block 0, whose rows are masked (K) and zeroed (V)
      // like any key past the end.
      const int key = k0 + lane * pool.box_rows, n_pages = (w.kv_len + page.divisor() - 1) / page.divisor();
      const int pg = page.div(key);
      a.box = lane;
      a.slot = key - pg * page.divisor();
      a.blk = pg < n_pages ? pages[pg] : 0;
    }
    return a;
  }
  KVTILE_DEVICE KVTILE_FORCEINLINE void issue_k(std::uint32_t dst, const box_at& a, std::uint32_t bar) const
    requires(!Codec::quantized)
  {
    issue_box(dst, 0u, a, bar, true);
  }
  KVTILE_DEVICE KVTILE_FORCEINLINE void issue_v(std::uint32_t dst, const box_at& a, std::uint32_t bar) const
    requires(!Codec::quantized)
  {
    issue_box(dst, 0u, a, bar, false);
  }
  // Quantized: the stored bytes to `dst`, the per-token scales (if any) to `scales`.
  KVTILE_DEVICE KVTILE_FORCEINLINE void issue_k(std::uint32_t dst, std::uint32_t scales, const box_at& a,
                                                std::uint32_t bar) const
    requires(Codec::quantized)
  {
    issue_box(dst, scales, a, bar, true);
  }
  KVTILE_DEVICE KVTILE_FORCEINLINE void issue_v(std::uint32_t dst, std::uint32_t scales, const box_at& a,
                                                std::uint32_t bar) const
    requires(Codec::quantized)
  {
    issue_box(dst, scales, a, bar, false);
  }
  KVTILE_DEVICE KVTILE_FORCEINLINE void store(int r, const float* o, float lse, int t) const {
    store_append_row<D, G::block_q>(p, w, *this, r, o, lse, t);
  }

 private:
  // Box a.box of a tile: box_rows slots of one page (all panels of 128 bytes), and with
  // per-token scales the box's scales.
  KVTILE_DEVICE KVTILE_FORCEINLINE void issue_box(std::uint32_t dst, std::uint32_t scales, const box_at& a,
                                                  std::uint32_t bar, bool is_k) const {
    if (a.box < 0) return;
    const CUtensorMap* map = is_k ? &pool.k : &pool.v;
    const int j = a.box * pool.box_rows;  // the box's first row in the tile
    const int c1 = pool.head_outer ? a.slot : w.kv_head, c2 = pool.head_outer ? w.kv_head : a.slot;
    KVTILE_PRAGMA_UNROLL
    for (int c = 0; c < D / panel; ++c)
      arch::tma_load_4d(dst + std::uint32_t(c * G::block_kv + j) * 128, map, c * panel, c1, c2, a.blk, bar);
    if constexpr (memory::per_token_scales<Codec>)
      arch::bulk_load(scales + std::uint32_t(j) * 4u,
                      p.kv.pool.scale_ptr(is_k ? p.kv.pool.k : p.kv.pool.v, a.blk, a.slot, w.kv_head),
                      std::uint32_t(pool.box_rows) * 4u, bar);
    (void)scales;
  }
};

// Entry point; the body exists only in the sm_90a device pass.
template <class T, int D, class Mask, class Table, class Codec = memory::identity>
KVTILE_KERNEL void __launch_bounds__(append_ws_source<T, D, Mask, Table, Codec>::G::threads, 1)
    paged_append_sm90_ws_kernel(const kernel_params<T, Table, Mask, Codec> p, const __grid_constant__ tma_pool pool) {
#if KVTILE_WGMMA_AVAILABLE
  if constexpr (merge_early != 0) arch::launch_dependents();  // the merge grid may start; it waits for this grid
  extern __shared__ __align__(1024) unsigned char append_ws_smem[];
  using Src = append_ws_source<T, D, Mask, Table, Codec>;
  const Src src(p, pool);
  Src::core::run(detail::ws_single_schedule<Src>{src}, append_ws_smem);
#else
  (void)p, (void)pool;
#endif
}

}  // namespace attention::cuda::paged
KVTILE_NAMESPACE_END
