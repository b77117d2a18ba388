// kvtile/attention/cuda/paged/append_sm90_kernel.cuh: paged append (chunked prefill) on Hopper
// warpgroup MMA, for head dims 64 and 128 in binaries built for sm_90a.
//
// The sm_90a attention core of the dense prefill (prefill_sm90/kernel.cuh: 128-byte swizzled
// tiles, wgmma for Q K^T and P V, per-slot mbarriers) reads its rows through a source policy;
// this file gives it the paged one. One CTA runs one work item of an append plan:
//   rows   block_q packed query rows (GQA packing: token r / group, head kv_head * group +
//          r % group), so each K/V page is read once for the whole group
//   keys   [kv_begin, kv_end) of the request, gathered row by row through the page table; the
//          block ids of the next tile are loaded a tile ahead into registers
//   output O and LSE, or, for a split item, the fp32 partial state that merge_partials_kernel
//          folds (the same partial layout as the other paged kernels)
#pragma once

#include <cstdint>

#include "kvtile/attention/cuda/paged/kernel.cuh"
#include "kvtile/attention/cuda/plan.hpp"
#include "kvtile/attention/cuda/prefill_sm90/kernel.cuh"
#include "kvtile/core/fast_divmod.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda::paged {

// The tile of the cp.async sm_90a append kernel, which runs pools without TMA tensor maps (page
// sizes with gcd(page_size, 64) < 8): the cp.async wgmma prefill kernel's default for the head
// dim (its mainloop: prefill_sm90/kernel.cuh). Pools with tensor maps run the warp-specialised
// kernel of append_sm90_ws_kernel.cuh on the same plan.
template <int D>
using append_sm90_tile = detail::sm90_cp_async_default_tile_t<D>;

// The epilogue of a paged append CTA, for both sm_90a mainloops: the normalised row r of the
// source's work item (query token src.token(r), query head src.head(r)), o[2j], o[2j + 1] its
// columns 8j + 2t, 8j + 2t + 1 and lse in natural log, to O and the LSE, or for a split item to
// the fp32 partial state of its BM-row tile.
template <int D, int BM, class T, class Table, class Mask, class Codec, class Source>
KVTILE_DEVICE KVTILE_FORCEINLINE void store_append_row(const kernel_params<T, Table, Mask, Codec>& p, const paged_work_item& w,
                                                       const Source& src, int r, const float* o, float lse, int t) {
  if (w.partial < 0) {
    const int tok = src.token(r), h = src.head(r);
    if (p.lse != nullptr && t == 0) p.lse[p.q.layout.row(w.batch, tok) * p.num_qo_heads + h] = lse;
    T* dst = p.o.at(w.batch, tok, h) + 2 * t;
    KVTILE_PRAGMA_UNROLL
    for (int j = 0; j < D / 8; ++j) *reinterpret_cast<std::uint32_t*>(dst + j * 8) = arch::pack2<T>(o[2 * j], o[2 * j + 1]);
  } else {
    const std::int64_t prow = std::int64_t(w.partial) * BM + r;
    float* dst = p.partial_o + prow * D + 2 * t;
    KVTILE_PRAGMA_UNROLL
    for (int j = 0; j < D / 8; ++j) *reinterpret_cast<float2*>(dst + j * 8) = make_float2(o[2 * j], o[2 * j + 1]);
    if (t == 0) p.partial_lse[prow] = lse;
  }
}

template <class T, int D, class Mask, class Table>
struct append_sm90_source {
  using Tile = append_sm90_tile<D>;
  using G = detail::prefill_sm90_geometry<T, D, Tile>;
  using share = detail::row_share<G, G::block_kv>;  // the same step for Q rows
  static_assert(paged_shape_for(paged_kernel_kind::append_sm90, D).block_m == G::block_q &&
                    paged_shape_for(paged_kernel_kind::append_sm90, D).block_n == G::block_kv,
                "paged append_sm90: the planner's rows and keys per item must be the kernel's tile");

  const kernel_params<T, Table, Mask>& p;
  paged_work_item w;
  int rows, kv_lo, kv_hi, kv_limit;
  int group, first_row;
  fast_divmod page;  // division by the page size without a division
  Mask mask;
  const T* q;
  const T* k;
  const T* v;
  float scale_log2;
  const std::int32_t* pages;
  std::int64_t stride_block;
  std::int32_t head_offset, stride_token;  // within a block: fit 32 bits
  std::int32_t step_pages, step_slots;      // share::step keys = step_pages pages + step_slots slots
  std::int32_t blk[share::count];           // block ids of this thread's rows in the next tile fetched
  std::int32_t slot_off[share::count];      // and their offsets inside the block

  KVTILE_DEVICE explicit append_sm90_source(const kernel_params<T, Table, Mask>& pp)
      : p(pp), w(pp.work[blockIdx.x]), page(pp.kv.pool.page_size),
        mask(pp.mask, w.q_len, w.kv_len) {
    group = p.group;
    rows = min_i(G::block_q, w.q_len * group - w.row0);
    kv_lo = w.kv_begin;
    kv_hi = w.kv_end;
    kv_limit = w.kv_end;  // a split chunk ends on a tile boundary, the hull at or before kv_len
    first_row = share::first_row(int(threadIdx.x));
    head_offset = std::int32_t(p.kv.pool.offset(0, 0, w.kv_head));
    stride_block = p.kv.pool.stride_block;
    stride_token = std::int32_t(p.kv.pool.stride_token);
    step_pages = page.div(share::step);
    step_slots = page.mod(share::step, step_pages);
    q = p.q.data;
    k = p.kv.k_base();
    v = p.kv.v_base();
    scale_log2 = p.scale_log2;
    pages = page_row(p.kv.table, w);
  }

  KVTILE_DEVICE KVTILE_FORCEINLINE int token(int r) const { return (w.row0 + r) / group; }
  KVTILE_DEVICE KVTILE_FORCEINLINE int head(int r) const { return w.kv_head * group + (w.row0 + r) % group; }
  KVTILE_DEVICE KVTILE_FORCEINLINE void load_q(std::uint32_t smem) const {
    detail::copy_rows_sw128<T, G, G::block_q>(
        smem, q,
        [&](int i) {
          const int r = first_row + i * share::step;
          return p.q.layout.offset(w.batch, token(r), head(r));
        },
        rows, int(threadIdx.x));
  }
  // K and V rows of the tile at k0 (whose block ids and slots prefetch loaded): one offset per
  // row, shared by the K and the V copy.
  template <class Between>
  KVTILE_DEVICE KVTILE_FORCEINLINE void load_kv(std::uint32_t k_smem, std::uint32_t v_smem, int k0, Between&& between) const {
    std::int64_t off[share::count];
    KVTILE_PRAGMA_UNROLL
    for (int i = 0; i < share::count; ++i) off[i] = blk[i] * stride_block + slot_off[i];
    auto row = [&](int i) { return off[i]; };
    detail::copy_rows_sw128<T, G, G::block_kv>(k_smem, k, row, kv_limit - k0, int(threadIdx.x));
    between();
    detail::copy_rows_sw128<T, G, G::block_kv>(v_smem, v, row, kv_limit - k0, int(threadIdx.x));
  }
  // Block ids and in-page offsets of this thread's rows of the tile at k0 (k0 < 0: nothing is
  // fetched next). Rows are share::step keys apart: one division, then running quotients.
  KVTILE_DEVICE KVTILE_FORCEINLINE void prefetch(int k0) {
    if (k0 < 0) return;
    const int tok0 = k0 + first_row;
    int pg = page.div(tok0), slot = page.mod(tok0, pg);
    KVTILE_PRAGMA_UNROLL
    for (int i = 0; i < share::count; ++i) {
      const bool ok = share::in_tile(i, int(threadIdx.x)) && tok0 + i * share::step < kv_limit;
      blk[i] = ok ? pages[pg] : 0;
      slot_off[i] = slot * stride_token + head_offset;
      pg += step_pages;
      slot += step_slots;
      if (slot >= page.divisor()) {
        slot -= page.divisor();
        ++pg;
      }
    }
  }
  KVTILE_DEVICE KVTILE_FORCEINLINE void store(int r, const float* o, float lse, int t) const {
    store_append_row<D, G::block_q>(p, w, *this, r, o, lse, t);
  }
};

// Entry point; the body exists only in the sm_90a device pass (elsewhere an empty kernel that
// run_paged_attention never launches: plans pick this kernel only where device_limits::wgmma).
template <class T, int D, class Mask, class Table>
KVTILE_KERNEL void __launch_bounds__(append_sm90_source<T, D, Mask, Table>::G::threads, 1)
    paged_append_sm90_kernel(const kernel_params<T, Table, Mask> p) {
#if KVTILE_WGMMA_AVAILABLE
  if constexpr (merge_early != 0) arch::launch_dependents();  // the merge grid may start; it waits for this grid
  extern __shared__ __align__(16) unsigned char append_sm90_smem[];
  using S = append_sm90_source<T, D, Mask, Table>;
  S src(p);
  detail::sm90_attention_core<T, D, typename S::Tile, Mask>::run(src, append_sm90_smem);
#else
  (void)p;
#endif
}

}  // namespace attention::cuda::paged
KVTILE_NAMESPACE_END
