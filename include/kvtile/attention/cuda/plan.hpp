// kvtile/attention/cuda/plan.hpp: the host-side planner of paged attention (decode and append).
//
// Plain C++ (no CUDA needed): from the batch shape -- query lengths, the HOST copy of the page
// table, the mask, and the device's SM count -- it picks the kernel shape and cuts the work
// into CTA-sized items, splitting long sequences along the keys (split-KV, "flash decoding")
// when the batch alone would not fill the GPU. Everything the run needs is in the plan:
//
//   work item   (request, KV head, packed query-row tile, key range [kv_begin, kv_end))
//   merge item  a row tile whose key range was split: partial states [first, first + count)
//
// Query rows are packed GQA-style: packed row r of request b holds query token r / group of
// query head kv_head * group + r % group, so one CTA reads each K/V page once for every query
// head of its group and every query token of its tile.
//
// The run (decode.cuh / append.cuh) launches plan.ctas() CTAs (one per work item, or for the TMA
// decode kernel one per SM, each running a contiguous run of items) and, when split,
// plan.merges.size() merge CTAs, reading the lists from a caller-owned device workspace that
// upload_plan fills. Nothing in the run allocates, synchronises or depends on host data, so a
// run can be captured in a CUDA graph and replayed as long as the lengths stay those planned.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "kvtile/attention/cuda/tuning.hpp"
#include "kvtile/attention/mask.hpp"
#include "kvtile/attention/variant.hpp"
#include "kvtile/core/error.hpp"
#include "kvtile/paging/paged_view.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cuda {

// Which kernel shape runs the batch. decode: 16 packed rows per CTA, four warps splitting each
// key tile (few rows, many keys); append: 128 packed rows per CTA, one warp per 32 rows (64 rows,
// 16 per warp, for head dims above 128); append_sm90: the Hopper wgmma kernel (head dims 64 and
// 128, binaries with sm_90a code), 64 packed rows per warpgroup; decode_sm90: the decode shape
// with K/V pages copied by the Tensor Memory Accelerator (decode_sm90_supported: head dims 64,
// 128, 192, 256 -- 128 and 256 for fp8 pages -- and page sizes sharing a factor of 8 with the
// 64-key tile; sm_90a binaries). fp8 pages run on decode, decode_sm90 and (head dims up to 128)
// append.
enum class paged_kernel_kind : std::int32_t { decode, append, append_sm90, decode_sm90 };

constexpr const char* to_string(paged_kernel_kind k) {
  switch (k) {
    case paged_kernel_kind::decode: return "decode";
    case paged_kernel_kind::append: return "append";
    case paged_kernel_kind::append_sm90: return "append_sm90";
    case paged_kernel_kind::decode_sm90: return "decode_sm90";
  }
  return "unknown";
}

struct paged_kernel_shape {
  paged_kernel_kind kind;
  int block_m;  // packed query rows per CTA
  int block_n;  // keys per tile
  int warps_m;  // warps along rows (block_m / warps_m rows each: 16 or 32)
  int warps_n;  // warps along the keys of a tile
  int stages;   // K/V pipeline depth

  constexpr int threads() const { return 32 * warps_m * warps_n; }
  // The TMA decode kernel: aligned base, swizzled K/V stages, padded Q tile(s), the reduction
  // area, full and empty mbarriers. CTAs that run several items (`runs`) keep two Q tiles and a
  // reduction area of their own (the next item's tiles are in flight meanwhile); a CTA of one
  // item reduces in its stages, free by then.
  // fp8 pages (elem_bytes 1) add each stage's per-token K and V scales; Q is 2-byte always.
  constexpr std::size_t decode_sm90_smem_bytes(int head_dim, int elem_bytes, bool runs) const {
    const std::size_t stage_bytes =
        2 * std::size_t(stages) * block_n * (std::size_t(head_dim) * elem_bytes + (elem_bytes == 1 ? sizeof(float) : 0));
    const std::size_t q_tile = std::size_t(block_m) * (head_dim + 8) * 2;
    const std::size_t reduce = std::size_t(warps_m) * warps_n * 16 * (std::size_t(head_dim + 4) * 4 + 8);
    return 1024 + (runs ? stage_bytes + 2 * q_tile + reduce : std::max(stage_bytes, reduce) + q_tile) + 16 * std::size_t(stages);
  }
  // The cp.async fp8 decode kernel (paged/decode_fp8_kernel.cuh): a 2-byte Q tile and converted K and
  // V tiles (rows padded by 8 elements), byte stages of K and V, and per-token scales; or the
  // reduction area, whichever is larger.
  constexpr std::size_t decode_fp8_smem_bytes(int head_dim) const {
    const std::size_t row = std::size_t(head_dim + 8) * 2;
    const std::size_t tiles = row * (block_m + 2 * std::size_t(block_n)) +
                              2 * std::size_t(stages) * block_n * (std::size_t(head_dim) + sizeof(float));
    const std::size_t reduce = std::size_t(warps_m) * warps_n * 16 * (std::size_t(head_dim + 4) * 4 + 8);
    return std::max(tiles, reduce);
  }
  // Dynamic shared memory: Q tile + K and V stages (rows padded by 8 elements), or the
  // cross-warp reduction area (fp32 rows padded by 4), whichever is larger: they share space.
  // elem_bytes: of the K/V pages (1: fp8; the decode kernels and the 32-row append kernel).
  constexpr std::size_t smem_bytes(int head_dim, int elem_bytes) const {
    if (kind == paged_kernel_kind::decode && elem_bytes == 1) return decode_fp8_smem_bytes(head_dim);
    // Unpadded swizzled 2-byte tiles (fp8 pages land in the upper half of their 2-byte slots and
    // are converted in place), aligned base, mbarriers (fp8: two more per stage).
    if (kind == paged_kernel_kind::append_sm90)
      return std::size_t(block_m + 2 * stages * block_n) * head_dim * 2 + 1024 + 8 * (1 + 4 * std::size_t(stages)) +
             (elem_bytes == 1 ? 16 * std::size_t(stages) : 0);
    const std::size_t row = std::size_t(head_dim + 8) * elem_bytes;
    const std::size_t warps = std::size_t(warps_m) * warps_n;
    const std::size_t reduce = warps * 16 * (std::size_t(head_dim + 4) * 4 + 8);
    if (kind == paged_kernel_kind::decode_sm90) return decode_sm90_smem_bytes(head_dim, elem_bytes, true);
    // The 32-rows-per-warp append kernel also keeps two rings of block_n key row offsets (four
    // with fp8 pages: their per-token scales' too). On fp8 pages its K and V stages are bytes
    // (rows of head_dim, and each row's two scales), converted per tile into one 2-byte K and V
    // tile (paged/append_kernel.cuh).
    const bool wide = kind == paged_kernel_kind::append && block_m / warps_m >= 32;
    const std::size_t offsets = wide ? std::size_t(elem_bytes == 1 ? 4 : 2) * block_n * 8 : 0;
    if (wide && elem_bytes == 1) {
      const std::size_t row2 = std::size_t(head_dim + 8) * 2;
      return row2 * (block_m + 2 * std::size_t(block_n)) + 2 * std::size_t(stages) * block_n * (std::size_t(head_dim) + 4) +
             offsets;
    }
    const std::size_t tiles = row * (block_m + 2 * std::size_t(stages) * block_n);
    return std::max(tiles + offsets, reduce);
  }
};

// The shapes kvtile ships (tuning lives here, one place). Keys per tile shrink for head dims
// above 128 to keep the K/V stages within shared memory.
// elem_bytes: of the K/V pages (1: fp8).
constexpr paged_kernel_shape paged_shape_for(paged_kernel_kind kind, int head_dim, int elem_bytes = 2) {
  // Decode: 3 stages measured +2-8% over 2 on H100 (docs/perf-log/decode.md v4); at D > 128
  // three stages would exceed sm_80's 163 KB per CTA.
  if (kind == paged_kernel_kind::decode) return {kind, 16, 64, 1, 4, head_dim > 128 ? 2 : 3};
  // TMA decode: one persistent CTA per SM (227 KB); D = 256 fits two stages beside the
  // reduction area. fp8 pages: 128 keys per tile, so that a stage moves the bytes of a bf16
  // one (decode.md v17).
  if (kind == paged_kernel_kind::decode_sm90)
    return {kind, 16, elem_bytes == 1 ? 128 : 64, 1, 4, head_dim > 128 ? 2 : tuning::decode_sm90_stages};
  // Hopper: the warp-specialised prefill kernel's default tiles (prefill_sm90/ws_kernel.cuh: a
  // producer warpgroup and 128 / 192 query rows of consumers), 3 stages. The cp.async kernel
  // that runs pools without tensor maps takes the same rows and keys per item.
  if (kind == paged_kernel_kind::append_sm90) {
    using t64 = tuning::prefill_sm90_tile<64>::type;
    using t128 = tuning::prefill_sm90_tile<128>::type;
    return head_dim <= 64 ? paged_kernel_shape{kind, t64::block_q, t64::block_kv, t64::warps, 1, t64::stages}
                          : paged_kernel_shape{kind, t128::block_q, t128::block_kv, t128::warps, 1, t128::stages};
  }
  // Append: 32 rows per warp (each K/V fragment feeds two MMA row tiles), 2 CTAs per SM
  // (docs/perf-log/decode.md v5); above D = 128 the O accumulators of 32 rows do not fit.
  if (head_dim <= 128) return {kind, 128, 64, 4, 1, 2};
  return {kind, 64, 32, 4, 1, 2};
}

// What the planner needs to know about the device (decode.cuh: query_device_limits()).
struct device_limits {
  int num_sms = 132;
  std::size_t smem_per_sm = 228 * 1024;  // shared memory per multiprocessor
  std::size_t smem_per_cta = 227 * 1024; // opt-in maximum per CTA
  int max_ctas_per_sm = 32;
  bool wgmma = false;  // runs this binary's sm_90a kernels (query_device_limits asks the device)
};

// The most multiprocessors a plan is made for (device_limits::num_sms).
inline constexpr int max_plan_sms = 1024;

struct plan_options {
  bool split_kv = true;    // allow splitting a row tile's keys over several CTAs
  int max_splits = 128;    // at most this many partial states per row tile
  bool force_append = false;  // use the append shape even when every request is a decode
  bool use_wgmma = true;      // the sm_90a kernels where device_limits::wgmma: wgmma append (D 64,
                              // 128) and TMA decode (decode_sm90_supported)
  int max_ctas = 0;           // TMA decode of small batches: at most this many CTAs (0: one per SM)
  // fp8 pages: K and V fragments converted in registers from the byte tiles (ldmatrix over
  // bytes, head-dim order permuted consistently in Q and K; head_dim % 32 == 0, no rotary)
  // instead of through per-warp T tiles in shared memory. On by default: on the H200 it read
  // 1.05-1.44x faster than the shared tiles on every decode row (docs/perf-log/decode.md v16);
  // configurations it cannot take use the shared tiles.
  bool fp8_registers = true;
  // sm_90a append on the warp-specialised mainloop (paged/append_sm90_ws_kernel.cuh: TMA page
  // boxes issued by the producer warp, ping-pong consumer warpgroups) instead of the cp.async
  // wgmma one, where the pool has TMA tensor maps: on the H200 1.19-1.25x the cp.async kernel
  // on the 512-token append over a 4k / 16k prefix at head dims 64 and 128 (docs/perf-log/
  // prefill.md, sm90 v10). false:
  // the cp.async kernel for fp16 / bf16 pages without rotary (rotary variants and fp8 pages run
  // only on the warp-specialised one).
  bool warp_specialised_append = true;
  // TMA decode of small batches (persistent runs) on compute capability 9+: launch the attention
  // grid with programmatic stream serialisation, so that its CTAs are placed and set up
  // (barriers, work items, L2 prefetch of their first copies) while the kernel before it on the
  // stream finishes; they wait for that kernel on the device before reading Q, the page table
  // or K/V through shared memory and before writing anything. Plans of one CTA per row tile
  // (larger batches) launch plainly: early, 16 x 4k read 7% slower at pages of 64 and 256
  // (docs/perf-log/decode.md v15).
  bool early_launch = true;
};

// Head dims the sm_90a append kernel is built for.
constexpr bool append_sm90_head_dim(int head_dim) { return head_dim == 64 || head_dim == 128; }

// Problems the sm_90a decode kernel takes: head dims of whole 128-byte swizzled panels (64
// elements of 2 bytes, 128 fp8 ones), and page sizes whose every 64-key tile splits into TMA
// boxes of at least 8 rows (1 KB of 2-byte rows, the swizzle's period) that never cross a page:
// gcd(page_size, 64) >= 8. fp8 tiles of 128 keys are two such runs of boxes.
constexpr int decode_sm90_box_rows(int page_size) {
  int a = page_size, b = 64;
  while (b != 0) {
    const int t = a % b;
    a = b;
    b = t;
  }
  return a;
}
constexpr bool decode_sm90_supported(int head_dim, int page_size, int elem_bytes = 2) {
  return head_dim % (128 / elem_bytes) == 0 && head_dim <= 256 && page_size >= 1 && decode_sm90_box_rows(page_size) >= 8;
}

// The attention problem, as the planner sees it.
struct paged_problem {
  std::int32_t num_qo_heads = 0;
  std::int32_t num_kv_heads = 0;
  std::int32_t head_dim = 0;
  std::int32_t page_size = 0;
  std::int32_t pool_blocks = 0;  // blocks in the K/V pool: valid block ids are [0, pool_blocks)
  int elem_bytes = 2;             // bytes per stored K/V element: 2 (fp16, bf16) or 1 (fp8 e4m3)
  // fp8 pages: scales per token-head (memory::per_token_head) rather than per head. A planning
  // hint, not a layout: such pages cost the decode consumers more work per byte, which the
  // planner gives more CTAs (tuning::decode_sm90_token_scales_fill). paged_attention::plan sets
  // it from the codec.
  bool token_scales = false;
};

struct paged_work_item {
  std::int32_t batch, kv_head, row0, kv_begin, kv_end, partial;  // partial < 0: write O directly
  // The request's lengths and (CSR tables) the offset of its page row, as planned: a CTA starts
  // its page-table reads without first reading the table's lengths.
  std::int32_t q_len, kv_len, page_base;
};
struct paged_merge_item {
  std::int32_t batch, kv_head, row0, first, count;
};

struct paged_plan {
  paged_problem problem;
  paged_kernel_shape shape{};
  std::int32_t batch = 0;
  std::int32_t max_q_len = 0;
  std::int64_t total_q = 0;        // query tokens over the batch
  std::vector<std::int32_t> q_len; // [batch], what the run must be given
  std::vector<std::int32_t> kv_len;
  std::vector<paged_work_item> work;
  std::vector<paged_merge_item> merges;
  // TMA decode of small batches: CTA c runs work items [cta_items[c], cta_items[c + 1]) in order
  // (empty otherwise: CTA c runs work item c).
  std::vector<std::int32_t> cta_items;
  std::int32_t num_partials = 0;
  std::int32_t merge_rows = 0;  // the most packed rows of any merge item (the merge grid's extent)
  int ctas_per_sm = 1;
  int chunk_tiles = 0;  // key tiles per split chunk (0: no split; TMA decode: the most tiles of a CTA)
  bool early_launch = false;  // launch with programmatic serialisation (plan_options::early_launch)
  bool fp8_registers = false;  // fp8 pages: fragments converted in registers (always on the TMA kernel; plan_options::fp8_registers)
  bool warp_specialised_append = false;  // append_sm90 on the warp-specialised kernel (plan_options)
  // Why the planner chose shape.kind (the alternatives it had and what ruled them out); the run
  // reports it to the dispatch log (dispatch.hpp).
  std::string reason;

  const char* kernel() const { return to_string(shape.kind); }

  // CTAs of the attention grid.
  std::size_t ctas() const { return cta_items.empty() ? work.size() : cta_items.size() - 1; }

  // Device workspace layout: [work items][CTA item offsets][merge items][partial O fp32][partial LSE fp32].
  static constexpr std::size_t align(std::size_t n) { return (n + 255) / 256 * 256; }
  std::size_t work_offset() const { return 0; }
  std::size_t cta_items_offset() const { return align(work.size() * sizeof(paged_work_item)); }
  std::size_t merge_offset() const { return cta_items_offset() + align(cta_items.size() * sizeof(std::int32_t)); }
  std::size_t partial_o_offset() const { return merge_offset() + align(merges.size() * sizeof(paged_merge_item)); }
  std::size_t partial_lse_offset() const {
    return partial_o_offset() + align(std::size_t(num_partials) * shape.block_m * problem.head_dim * sizeof(float));
  }
  std::size_t workspace_bytes() const {
    return partial_lse_offset() + align(std::size_t(num_partials) * shape.block_m * sizeof(float));
  }
  std::int32_t group() const { return problem.num_qo_heads / problem.num_kv_heads; }
};

namespace detail {

inline std::int32_t table_blocks(const paging::csr_page_table& t, std::int32_t b, std::int32_t) { return t.num_blocks(b); }
// Where request b's page row starts in the table's id array (padded tables: computed on the GPU).
inline std::int32_t table_page_base(const paging::csr_page_table& t, std::int32_t b) { return t.indptr[b]; }
inline std::int32_t table_page_base(const paging::padded_page_table&, std::int32_t) { return 0; }
inline std::int32_t table_blocks(const paging::padded_page_table& t, std::int32_t b, std::int32_t page_size) {
  return t.num_blocks(b, page_size);
}

inline std::int32_t last_page_len(const paging::csr_page_table& t, std::int32_t b) { return t.last_page_len[b]; }
inline std::int32_t last_page_len(const paging::padded_page_table&, std::int32_t) { return 0; }

// Request b's block ids, in logical order.
inline const std::int32_t* table_row(const paging::csr_page_table& t, std::int32_t b) { return t.indices + t.indptr[b]; }
inline const std::int32_t* table_row(const paging::padded_page_table& t, std::int32_t b) {
  return t.block_table + std::int64_t(b) * t.max_blocks;
}

// Lengths and block ids of a HOST page table, checked against the pool before any work.
template <class Table>
void check_page_table(const Table& t, const paged_problem& pr) {
  const std::int32_t ps = pr.page_size;
  // CSR: the whole indptr before any page id, so nothing past indices[indptr[batch]] (the
  // array's length) is read before a later, decreasing entry is seen.
  if constexpr (std::is_same_v<Table, paging::csr_page_table>) {
    if (t.batch > 0)
      for (std::int32_t b = 0; b <= t.batch; ++b)
        KVTILE_REQUIRE(t.indptr[b] >= 0 && (b == 0 || t.indptr[b] >= t.indptr[b - 1]), errc::invalid_argument,
                       "page table indptr[", b, "] = ", t.indptr[b], " is negative or decreasing");
  }
  for (std::int32_t b = 0; b < t.batch; ++b) {
    if constexpr (std::is_same_v<Table, paging::csr_page_table>) {
      KVTILE_REQUIRE(t.indptr[b + 1] >= t.indptr[b], errc::invalid_argument, "page table indptr decreases at request ", b,
                     ": ", t.indptr[b], " then ", t.indptr[b + 1]);
      if (t.num_blocks(b) > 0)
        KVTILE_REQUIRE(t.last_page_len[b] >= 1 && t.last_page_len[b] <= ps, errc::invalid_argument,
                       "last_page_len of request ", b, " is ", t.last_page_len[b], ", outside [1, page_size=", ps, "]");
    } else {
      KVTILE_REQUIRE(t.kv_lens[b] >= 0, errc::invalid_argument, "kv length of request ", b, " is negative: ", t.kv_lens[b]);
      KVTILE_REQUIRE(t.num_blocks(b, ps) <= t.max_blocks, errc::invalid_argument, "request ", b, " has kv length ",
                     t.kv_lens[b], " needing ", t.num_blocks(b, ps), " pages but its block-table row holds ", t.max_blocks);
    }
    // One branch-free pass over the row (a serving step checks every page of the batch), then the
    // offending page found only if there is one.
    const std::int32_t n = table_blocks(t, b, ps);
    const std::int32_t* row = table_row(t, b);
    const auto pool = std::uint32_t(pr.pool_blocks);
    std::uint32_t outside = 0;
    for (std::int32_t i = 0; i < n; ++i) outside |= std::uint32_t(row[i]) >= pool ? 1u : 0u;
    if (outside == 0) continue;
    for (std::int32_t i = 0; i < n; ++i)
      KVTILE_REQUIRE(row[i] >= 0 && row[i] < pr.pool_blocks, errc::out_of_range, "page ", i, " of request ", b,
                     " is block ", row[i], ", outside the pool [0, ", pr.pool_blocks, ")");
  }
}

constexpr std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

// A packed query-row tile of one KV head and the hull of keys its rows see, in key tiles.
struct tile_task {
  std::int32_t b, kvh, row0, kv_begin, kv_end;
  std::int64_t tiles;
};

}  // namespace detail

// How many CTAs of `shape` fit on one SM, judged by shared memory and a register budget of
// 64K registers at the kernels' launch bound (a lead for the split heuristic, not a promise).
inline int estimate_ctas_per_sm(const paged_kernel_shape& shape, const paged_problem& pr, const device_limits& dev) {
  if (shape.kind == paged_kernel_kind::append_sm90) return 1;  // ~220 registers x 256-384 threads, ~225 KB
  const std::size_t smem = shape.smem_bytes(pr.head_dim, pr.elem_bytes) + 1024;
  const int by_smem = int(dev.smem_per_sm / smem);
  const bool wide_rows = shape.block_m / shape.warps_m >= 32;  // 32 rows per warp: ~255 registers
  const int regs_per_thread = pr.head_dim > 128 || wide_rows ? 255 : 128;
  const int by_regs = 65536 / (regs_per_thread * shape.threads());
  return std::max(1, std::min({by_smem, by_regs, dev.max_ctas_per_sm}));
}

namespace detail {

// How many persistent CTAs share `total` flat tiles of bn keys (count: each row tile's visible
// tiles). The rules are in keys (tuning::decode_runs_min_keys), so that an fp8 tile of 128 keys,
// which moves the bytes of a 64-key bf16 one, counts as two.
inline std::int64_t run_ctas(const std::vector<std::int64_t>& count, std::int64_t total, const device_limits& dev,
                             const plan_options& opt, int bn) {
  // No CTA gets fewer than min_tiles_per_cta tiles.
  const std::int64_t min_tiles_per_cta = std::max(1, tuning::decode_runs_min_keys / bn);
  const std::int64_t max_ctas = opt.max_ctas > 0 ? std::min(opt.max_ctas, dev.num_sms) : dev.num_sms;
  std::int64_t n_ctas = std::clamp<std::int64_t>(ceil_div(total, min_tiles_per_cta), 1, max_ctas);
  // At most max_splits pieces per task: shares of at least 1 / (max_splits - 1) of the largest.
  std::int64_t largest = 1;
  for (const std::int64_t n : count) largest = std::max(largest, n);
  if (opt.split_kv && opt.max_splits >= 2)
    n_ctas = std::clamp<std::int64_t>(total * (opt.max_splits - 1) / largest, 1, n_ctas);
  // A CTA whose run holds a cut costs about switch_tiles more than its tiles (an epilogue, a
  // partial state, a longer merge): 1 x 32k ran 9% faster as 128 CTAs of 32 tiles, one piece
  // each, than as 132 CTAs of 31, most holding two pieces (decode.md v13). From half the
  // CTAs up, take the count whose longest run, so counted, is shortest (ties: more CTAs).
  if (opt.split_kv) {
    const std::int64_t switch_tiles = std::max(1, tuning::decode_runs_switch_keys / bn);
    std::vector<std::int64_t> ends;  // task ends in the flat order
    std::int64_t at = 0;
    for (const std::int64_t n : count) ends.push_back(at += std::max<std::int64_t>(n, 1));
    auto longest = [&](std::int64_t n) {
      std::int64_t worst = 0;
      std::size_t e = 0;
      for (std::int64_t c = 0; c < n; ++c) {
        const std::int64_t lo = c * total / n, hi = (c + 1) * total / n;
        while (ends[e] <= lo) ++e;
        std::int64_t items = 1;
        for (std::size_t f = e; ends[f] < hi; ++f) ++items;
        worst = std::max(worst, hi - lo + switch_tiles * (items - 1));
      }
      return worst;
    };
    // No run is shorter than ceil(total / n), which only grows as n shrinks: stop there.
    std::int64_t best_n = n_ctas, best = longest(n_ctas);
    for (std::int64_t n = n_ctas - 1; n >= std::max<std::int64_t>(1, (n_ctas + 1) / 2) && ceil_div(total, n) < best; --n) {
      const std::int64_t l = longest(n);
      if (l < best) best = l, best_n = n;
    }
    n_ctas = best_n;
  }
  return n_ctas;
}

// The TMA decode kernel's plan for a small batch (fewer row tiles than ~0.9 per SM): one
// persistent CTA per SM (one CTA's pipeline streams at the card's rate: decode.md v12), each
// running a contiguous run of the visible key tiles of all row tiles in order; a row tile cut
// between CTAs becomes split items and a merge. Fills plan.work, cta_items, merges.
template <mask_policy Mask, class Table>
void plan_decode_runs(paged_plan& plan, const std::vector<tile_task>& tasks, const Table& table,
                      typename Mask::params mask_params, const device_limits& dev, const plan_options& opt) {
  const std::int32_t group = plan.group();
  const int bm = plan.shape.block_m, bn = plan.shape.block_n;
  plan.ctas_per_sm = 1;
  // The key tiles of each task the mask leaves visible, what the cut counts: count[i] of them,
  // hull tile indices vis[vis_first[i] ...] (vis_first -1: all hull tiles). The KV heads of a
  // row tile follow each other and share the list.
  std::vector<std::int32_t> vis;
  std::vector<std::int64_t> vis_first, count;
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    const tile_task& t = tasks[i];
    if (i > 0 && t.b == tasks[i - 1].b && t.row0 == tasks[i - 1].row0) {
      vis_first.push_back(vis_first.back());
      count.push_back(count.back());
      continue;
    }
    const std::int32_t ql = plan.q_len[t.b], rows = ql * group;
    const std::int32_t t0 = t.row0 / group, t1 = (std::min(t.row0 + bm, rows) - 1) / group + 1;
    const Mask mask(mask_params, ql, plan.kv_len[t.b]);
    const std::size_t first = vis.size();
    for (std::int64_t k = 0; k < t.tiles; ++k) {
      const std::int32_t k0 = std::int32_t(t.kv_begin + k * bn), k1 = std::min(t.kv_end, std::int32_t(k0 + bn));
      if (mask.classify(t0, t1, k0, k1) != tile_visibility::empty) vis.push_back(std::int32_t(k));
    }
    const std::int64_t n = std::int64_t(vis.size() - first);
    if (n == t.tiles) vis.resize(first);
    vis_first.push_back(n == t.tiles ? -1 : std::int64_t(first));
    count.push_back(n);
  }
  std::int64_t total = 0;  // a task with no visible tile still writes its rows: it counts one
  for (const std::int64_t n : count) total += std::max<std::int64_t>(n, 1);
  const std::int64_t n_ctas = run_ctas(count, total, dev, opt, bn);
  // CTA boundaries in the flat tile order, increasing, the last one `total`: CTA c runs flat
  // tiles [cut[c - 1], cut[c]). A task that may not be cut (split_kv off, or more pieces than
  // max_splits) moves the cuts inside it to its end.
  std::vector<std::int64_t> cut;
  for (std::int64_t c = 1; c <= n_ctas; ++c) cut.push_back(c * total / n_ctas);
  plan.cta_items.push_back(0);
  std::size_t next_cut = 0;  // the first cut past the current task's start
  std::int64_t pos = 0, most = 0, cta_start = 0;
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    const tile_task& t = tasks[i];
    const std::int64_t cost = std::max<std::int64_t>(count[i], 1), end = pos + cost;
    std::size_t last = next_cut;  // cuts [next_cut, last) fall inside the task
    while (cut[last] < end) ++last;
    if (last > next_cut && (!opt.split_kv || std::int64_t(last - next_cut) + 1 > std::max(1, opt.max_splits))) {
      // The first inside cut moves to the task's end, the others go.
      cut.erase(cut.begin() + std::ptrdiff_t(next_cut) + (cut[last] == end ? 0 : 1), cut.begin() + std::ptrdiff_t(last));
      if (cut[next_cut] != end) cut[next_cut] = end;
      last = next_cut;
    }
    const std::int32_t ql = plan.q_len[t.b], kl = plan.kv_len[t.b], base = table_page_base(table, t.b);
    // The hull key where visible tile v of this task starts (v == count: the hull's end).
    auto key_at = [&](std::int64_t v) {
      if (v >= count[i]) return t.kv_end;
      return std::int32_t(t.kv_begin + (vis_first[i] < 0 ? v : vis[std::size_t(vis_first[i] + v)]) * bn);
    };
    std::int32_t partial = -1;
    if (last > next_cut) {
      const std::int32_t pieces = std::int32_t(last - next_cut) + 1;
      plan.merges.push_back({t.b, t.kvh, t.row0, plan.num_partials, pieces});
      plan.merge_rows = std::max(plan.merge_rows, std::min(bm, ql * group - t.row0));
      partial = plan.num_partials;
      plan.num_partials += pieces;
    }
    for (std::int64_t a = pos; a < end;) {
      const std::int64_t e = std::min(end, cut[next_cut]);
      const std::int32_t kb = a == pos ? t.kv_begin : key_at(a - pos), ke = key_at(e - pos);
      plan.work.push_back({t.b, t.kvh, t.row0, kb, ke, partial < 0 ? -1 : partial++, ql, kl, base});
      if (e == cut[next_cut]) {  // the CTA's run ends here
        plan.cta_items.push_back(std::int32_t(plan.work.size()));
        most = std::max(most, e - cta_start);
        cta_start = e;
        ++next_cut;
      }
      a = e;
    }
    pos = end;
  }
  plan.chunk_tiles = plan.merges.empty() ? 0 : int(most);
}

}  // namespace detail

// Plan attention of ragged query chunks against paged K/V. q_indptr [batch+1] and the page
// table are HOST arrays (the host mirror of what the run reads on the device). Query token t of
// request b sits at key position t + kv_len(b) - q_len(b) (the chunk is the cache's tail), so
// q_len(b) <= kv_len(b) is required (except with no_mask). Throws kvtile::error before any work on bad input.
// ---- the paged kernels, as the planner asks them ------------------------------------------------
//
// Each kernel the paged entry points launch is a type here: its kind (what run_paged_attention
// dispatches on), its shape (paged_shape_for: tiles, warps, stages), its dynamic shared memory,
// and can_implement: empty when it runs a batch, else why not. The planner takes the first type
// of paged_decode_kernels (every request packs at most 16 query rows) or paged_append_kernels
// (the others) that can, and its reason names what each faster one could not take. A new kernel
// is a type here, its place in one of the lists, and its launch (paged/launch.cuh).

// What a batch asks of a kernel.
struct paged_request {
  const paged_problem& problem;
  std::int64_t max_rows;     // packed query rows of its largest request
  const device_limits& dev;
  const plan_options& opt;
  bool rotary;               // the variant rotates K as it is loaded
};

namespace paged_kernels {

// Common parts: the shape and shared memory of a kind; why the sm_90a kernels are out, if so.
template <paged_kernel_kind Kind>
struct kernel_base {
  static constexpr paged_kernel_kind kind = Kind;
  static constexpr paged_kernel_shape shape(const paged_problem& pr) { return paged_shape_for(Kind, pr.head_dim, pr.elem_bytes); }
  static constexpr std::size_t smem_bytes(const paged_problem& pr) { return shape(pr).smem_bytes(pr.head_dim, pr.elem_bytes); }
};
inline std::string no_sm90(const paged_request& r) {
  if (!r.opt.use_wgmma) return "plan_options::use_wgmma is off";
  if (!r.dev.wgmma) return "the device does not run this binary's sm_90a code (device_limits::wgmma)";
  return {};
}

// The TMA decode kernel (paged/decode_sm90_kernel.cuh).
struct decode_sm90 : kernel_base<paged_kernel_kind::decode_sm90> {
  static std::string can_implement(const paged_request& r) {
    if (std::string why = no_sm90(r); !why.empty()) return why;
    const paged_problem& pr = r.problem;
    if (pr.elem_bytes == 1 && r.rotary)
      return "fp8 K/V pages with a rotary variant (the TMA kernel's fp8 fragments are in a permuted head-dim order)";
    if (!decode_sm90_supported(pr.head_dim, pr.page_size, pr.elem_bytes))
      return std::string("the TMA decode kernel needs a head_dim multiple of ") + (pr.elem_bytes == 1 ? "128 (fp8 pages)" : "64") +
             " and gcd(page_size, 64) >= 8";
    return {};
  }
};
// The cp.async decode kernels (paged/kernel.cuh; fp8 pages: paged/decode_fp8_kernel.cuh).
struct decode : kernel_base<paged_kernel_kind::decode> {
  static std::string can_implement(const paged_request&) { return {}; }
};
// The sm_90a append kernel (paged/append_sm90_kernel.cuh; its warp-specialised twin where
// plan_options::warp_specialised_append asks and the pool has tensor maps, and for a rotary
// variant or fp8 pages, which only the warp-specialised one takes: its producer warps rotate
// each K tile, or convert each fp8 K and V tile, in shared memory as it lands).
struct append_sm90 : kernel_base<paged_kernel_kind::append_sm90> {
  static std::string can_implement(const paged_request& r) {
    if (std::string why = no_sm90(r); !why.empty()) return why;
    if (!append_sm90_head_dim(r.problem.head_dim)) return "the sm_90a append kernel takes head_dim 64 and 128";
    if (r.problem.elem_bytes == 1 && r.rotary)
      return "fp8 K/V pages with a rotary variant (the warp-specialised append kernel's producer warps convert fp8 "
             "tiles or rotate keys, not both)";
    if (r.problem.elem_bytes == 1 && !(r.problem.head_dim == 128 && decode_sm90_supported(128, r.problem.page_size, 1)))
      return "fp8 K/V pages need head_dim 128 (128-byte rows) and TMA tensor maps of the pool (gcd(page_size, 64) >= 8) "
             "on the warp-specialised sm_90a append kernel";
    if (r.rotary && !decode_sm90_supported(r.problem.head_dim, r.problem.page_size))
      return "a rotary variant on pages without TMA tensor maps (only the warp-specialised sm_90a append kernel rotates "
             "keys, and it needs gcd(page_size, 64) >= 8)";
    return {};
  }
};
// The mma.sync append kernels (paged/append_kernel.cuh: 32 rows per warp up to head_dim 128,
// fp8 pages too; paged/kernel.cuh: 16 rows per warp above).
struct append : kernel_base<paged_kernel_kind::append> {
  static std::string can_implement(const paged_request& r) {
    if (r.problem.elem_bytes == 1 && r.problem.head_dim > 128)
      return "fp8 K/V pages above head_dim 128 (only the 32-row append kernel converts fp8 tiles)";
    return {};
  }
};

}  // namespace paged_kernels

// The candidates, fastest first.
template <class... Kernels>
struct paged_kernel_list {};
using paged_decode_kernels = paged_kernel_list<paged_kernels::decode_sm90, paged_kernels::decode>;
// decode last: the 16-row kernels run any number of rows, and take fp8 pages of every head dim.
using paged_append_kernels = paged_kernel_list<paged_kernels::append_sm90, paged_kernels::append, paged_kernels::decode>;

namespace detail {

struct kernel_pick {
  paged_kernel_shape shape;  // the kernel's shape (and kind) for this problem
  std::string reason;
  std::size_t smem_bytes;    // its shared memory for this problem
};

// The first kernel of the list that can run the request; `rows` says why the list was chosen.
template <class... Kernels>
kernel_pick pick_from(paged_kernel_list<Kernels...>, const paged_request& r, const std::string& rows) {
  const paged_problem& pr = r.problem;
  const std::string d = "head_dim " + std::to_string(pr.head_dim) + ", page_size " + std::to_string(pr.page_size);
  std::string skipped;  // what the faster kernels could not take
  kernel_pick out{};
  bool found = false;
  auto ask = [&](auto kernel) {
    using K = decltype(kernel);
    if (found) return;
    const std::string why = K::can_implement(r);
    if (why.empty()) {
      out = {K::shape(pr), rows + "; " + skipped + (pr.elem_bytes == 1 ? "fp8 K/V pages; " : "") + d, K::smem_bytes(pr)};
      found = true;
    } else {
      skipped += std::string(to_string(K::kind)) + ": " + why + "; ";
    }
  };
  (ask(Kernels{}), ...);
  KVTILE_REQUIRE(found, errc::unsupported, rows, ": no paged kernel takes the batch (", skipped, d, ")");
  return out;
}

inline kernel_pick pick_paged_kernel(const paged_request& r) {
  if (!r.opt.force_append && r.max_rows <= 16)
    return pick_from(paged_decode_kernels{}, r,
                     "every request packs at most 16 query rows (" + std::to_string(r.max_rows) + ")");
  return pick_from(paged_append_kernels{}, r,
                   r.opt.force_append ? std::string("plan_options::force_append")
                                      : "a request packs " + std::to_string(r.max_rows) + " query rows (> 16)");
}

}  // namespace detail

template <mask_policy Mask, class Table>
paged_plan plan_paged_attention(const std::int32_t* q_indptr, const Table& table, const paged_problem& pr,
                                typename Mask::params mask_params, const device_limits& dev, const plan_options& opt = {}) {
  static_assert(paging::page_table_format<Table>, "plan_paged_attention: Table must be a page-table format");
  KVTILE_REQUIRE(pr.num_kv_heads > 0 && pr.num_qo_heads > 0 && pr.num_qo_heads % pr.num_kv_heads == 0,
                 errc::invalid_argument, "query heads (", pr.num_qo_heads, ") must be a positive multiple of KV heads (",
                 pr.num_kv_heads, ")");
  KVTILE_REQUIRE(pr.head_dim > 0 && pr.head_dim % 16 == 0 && pr.head_dim <= 256, errc::unsupported, "head_dim ",
                 pr.head_dim, " is not a multiple of 16 in [16, 256]");
  KVTILE_REQUIRE(pr.page_size >= 1, errc::invalid_argument, "page_size must be positive, got ", pr.page_size);
  KVTILE_REQUIRE(pr.pool_blocks >= 0, errc::invalid_argument, "pool_blocks is negative: ", pr.pool_blocks);
  KVTILE_REQUIRE(pr.elem_bytes == 2 || pr.elem_bytes == 1, errc::unsupported,
                 "paged attention kernels take 2-byte (fp16, bf16) or 1-byte (fp8 e4m3) K/V elements, got ", pr.elem_bytes);
  KVTILE_REQUIRE(table.batch >= 0, errc::invalid_argument, "batch is negative: ", table.batch);
  // The bound keeps a plan's size and the CTA-count search linear in the batch: a small batch is
  // cut into up to num_sms runs, and the search tries half of them (no GPU has 1024 SMs).
  KVTILE_REQUIRE(dev.num_sms > 0 && dev.num_sms <= max_plan_sms, errc::invalid_argument,
                 "device_limits.num_sms must be in [1, ", max_plan_sms, "], got ", dev.num_sms);
  KVTILE_REQUIRE(q_indptr != nullptr && q_indptr[0] == 0, errc::invalid_argument, "q_indptr must start at 0");
  detail::check_page_table(table, pr);

  paged_plan plan;
  plan.problem = pr;
  plan.batch = table.batch;
  const std::int32_t group = pr.num_qo_heads / pr.num_kv_heads;
  std::int64_t max_rows = 0;
  for (std::int32_t b = 0; b < table.batch; ++b) {
    // Lengths from untrusted int32 arrays, in 64 bits: their differences and products may wrap.
    const std::int64_t ql64 = std::int64_t(q_indptr[b + 1]) - q_indptr[b];
    const std::int64_t kl64 = std::is_same_v<Table, paging::csr_page_table>
                                  ? (detail::table_blocks(table, b, pr.page_size) == 0
                                         ? 0
                                         : std::int64_t(detail::table_blocks(table, b, pr.page_size) - 1) * pr.page_size +
                                               detail::last_page_len(table, b))
                                  : std::int64_t(table.kv_len(b, pr.page_size));
    KVTILE_REQUIRE(ql64 >= 1 && ql64 <= std::numeric_limits<std::int32_t>::max(), errc::invalid_argument, "request ", b,
                   " has query length ", ql64, " (needs >= 1)");
    KVTILE_REQUIRE(kl64 <= std::numeric_limits<std::int32_t>::max(), errc::invalid_argument, "request ", b,
                   " has kv length ", kl64, " (at most 2^31 - 1)");
    const std::int32_t ql = std::int32_t(ql64), kl = std::int32_t(kl64);
    // With a mask, the chunk must be the cache's tail; without one (a cascade level of shared
    // keys, say), any number of queries may attend to the keys.
    if constexpr (!std::is_same_v<Mask, no_mask>)
      KVTILE_REQUIRE(ql <= kl, errc::invalid_argument, "request ", b, " has ", ql,
                   " new queries but only ", kl, " keys in its page table (its chunk must already be in the cache)");
    plan.q_len.push_back(ql);
    plan.kv_len.push_back(kl);
    plan.max_q_len = std::max(plan.max_q_len, ql);
    plan.total_q += ql;
    max_rows = std::max<std::int64_t>(max_rows, std::int64_t(ql) * group);
  }
  KVTILE_REQUIRE(max_rows < (std::int64_t(1) << 30), errc::unsupported, "packed query rows per request (", max_rows,
                 ") exceed 2^30");
  const detail::kernel_pick pick = detail::pick_paged_kernel({pr, max_rows, dev, opt, has_rotary<Mask>});
  const paged_kernel_kind kind = pick.shape.kind;
  plan.reason = pick.reason;
  plan.shape = pick.shape;
  const std::size_t smem = pick.smem_bytes;
  KVTILE_REQUIRE(smem <= dev.smem_per_cta, errc::unsupported, "head_dim ", pr.head_dim, " needs ", smem,
                 " bytes of shared memory per CTA; the device allows ", dev.smem_per_cta);
  plan.ctas_per_sm = estimate_ctas_per_sm(plan.shape, pr, dev);
  if (kind == paged_kernel_kind::append_sm90 && has_rotary<Mask>) {
    plan.warp_specialised_append = true;
    plan.reason += "; a rotary variant: the warp-specialised mainloop, whose producer warps rotate each K tile in shared "
                   "memory";
  } else if (kind == paged_kernel_kind::append_sm90 && pr.elem_bytes == 1) {
    plan.warp_specialised_append = true;
    plan.reason += "; fp8 pages: the warp-specialised mainloop, whose producer warps convert each K and V tile to 2-byte "
                   "elements in shared memory (per-token scales applied as they convert)";
  } else if (kind == paged_kernel_kind::append_sm90 && opt.warp_specialised_append &&
             decode_sm90_supported(pr.head_dim, pr.page_size, pr.elem_bytes)) {
    plan.warp_specialised_append = true;
    plan.reason += "; the warp-specialised mainloop (the pool has TMA tensor maps; plan_options::warp_specialised_append)";
  } else if (kind == paged_kernel_kind::append_sm90) {
    plan.reason += opt.warp_specialised_append
                       ? "; the cp.async mainloop (no TMA tensor maps of the pool: gcd(page_size, 64) < 8)"
                       : "; the cp.async mainloop (plan_options::warp_specialised_append = false)";
  }
  if (pr.elem_bytes == 1 && kind == paged_kernel_kind::decode_sm90) {
    plan.fp8_registers = true;  // the TMA kernel's only path
  } else if (pr.elem_bytes == 1 && kind == paged_kernel_kind::append) {
    plan.reason += "; fp8 tiles converted to 2-byte tiles in shared memory once per tile (the append kernel's only path)";
  } else if (pr.elem_bytes == 1 && kind == paged_kernel_kind::decode) {  // (append_sm90: its reason above)
    plan.fp8_registers = opt.fp8_registers && pr.head_dim % 32 == 0 && !has_rotary<Mask>;
    if (plan.fp8_registers)
      plan.reason += "; fp8 fragments converted in registers (plan_options::fp8_registers)";
    else if (opt.fp8_registers)
      plan.reason += "; fp8 fragments through shared tiles: the register path needs head_dim % 32 == 0 and no rotary";
  }
  const int bm = plan.shape.block_m, bn = plan.shape.block_n;

  // Row tiles and the key hull each one needs. Their number is checked before any is stored:
  // a plan holds fewer than 2^31 work items (a grid's and the items' int32 indices).
  std::int64_t num_tasks = 0;
  for (std::int32_t b = 0; b < table.batch; ++b)
    num_tasks += detail::ceil_div(std::int64_t(plan.q_len[b]) * group, bm) * pr.num_kv_heads;
  KVTILE_REQUIRE(num_tasks < (std::int64_t(1) << 31), errc::unsupported, "the batch has ", num_tasks,
                 " row tiles x KV heads (a plan holds fewer than 2^31 work items)");
  std::vector<detail::tile_task> tasks;
  tasks.reserve(std::size_t(num_tasks));
  std::int64_t max_tiles = 0;
  for (std::int32_t b = 0; b < table.batch; ++b) {
    const std::int32_t ql = plan.q_len[b], kl = plan.kv_len[b];
    const std::int32_t rows = ql * group;
    const Mask mask(mask_params, ql, kl);
    for (std::int32_t row0 = 0; row0 < rows; row0 += bm) {
      const std::int32_t t0 = row0 / group, t1 = (std::min(row0 + bm, rows) - 1) / group + 1;
      std::int32_t kb = std::max(0, mask.kv_begin(t0, t1));
      // TMA boxes never cross a page when tiles start at multiples of the tile; the keys before
      // the mask's first visible one are masked in the first tile.
      if (kind == paged_kernel_kind::decode_sm90 || kind == paged_kernel_kind::append_sm90) kb -= kb % bn;
      const std::int32_t ke = std::max(kb, std::min(kl, mask.kv_end(t0, t1)));
      const std::int64_t tiles = detail::ceil_div(ke - kb, bn);
      max_tiles = std::max(max_tiles, tiles);
      for (std::int32_t h = 0; h < pr.num_kv_heads; ++h) tasks.push_back({b, h, row0, kb, ke, tiles});
    }
  }

  if (tasks.empty()) return plan;  // an empty batch: nothing to compute, an empty plan (the run does nothing)
  if (kind == paged_kernel_kind::decode_sm90) {
    const int one_item_ctas =
        std::max<int>(1, int(dev.smem_per_sm / (plan.shape.decode_sm90_smem_bytes(pr.head_dim, pr.elem_bytes, false) + 1024)));
    const std::int64_t row_tiles_x10 = std::int64_t(tasks.size()) * 10;
    // Batches of at least ~0.9 row tiles per SM: a CTA per row tile, two per SM, never split:
    // the block scheduler and the shared DRAM balance them, where cut row tiles would pay for
    // merges (decode.md v13: 16 x 4k 2.82 TB/s unsplit, 2.57 cut evenly over 132 CTAs).
    const bool one_wave = row_tiles_x10 >= std::int64_t(dev.num_sms) * 9;
    // But a rotary variant's consumers rotate every key, and those of fp8 pages with per-token
    // scales scale every key: where such a batch would run one one-item CTA per SM, their work,
    // not the bytes, sets the pace, so it is split below as the cp.async kernel's plans are,
    // until every SM holds one_item_ctas CTAs of one item each. Smaller batches keep the
    // persistent runs (tuning::decode_sm90_rotary_fill, decode_sm90_token_scales_fill).
    const bool consumer_bound = (has_rotary<Mask> && tuning::decode_sm90_rotary_fill) ||
                                (pr.elem_bytes == 1 && pr.token_scales && tuning::decode_sm90_token_scales_fill);
    const bool fill_two = consumer_bound && one_wave && row_tiles_x10 < std::int64_t(dev.num_sms) * one_item_ctas * 9;
    if (one_wave) plan.ctas_per_sm = one_item_ctas;
    if (one_wave && !fill_two) {
      for (const auto& t : tasks)
        plan.work.push_back({t.b, t.kvh, t.row0, t.kv_begin, t.kv_end, -1, plan.q_len[t.b], plan.kv_len[t.b],
                             detail::table_page_base(table, t.b)});
      return plan;
    }
    if (!one_wave) {
      detail::plan_decode_runs<Mask>(plan, tasks, table, mask_params, dev, opt);
      plan.early_launch = opt.early_launch;
      KVTILE_REQUIRE(plan.work.size() < (std::size_t(1) << 31), errc::unsupported, "plan has ", plan.work.size(),
                     " work items (more than 2^31)");
      return plan;
    }
  }

  // Split-KV: choose keys-per-chunk c (in tiles) minimising the estimated makespan
  // ceil(items(c) / slots) * (c + overhead), where a CTA's fixed cost (Q load, pipeline fill,
  // partial write and merge) is counted as `overhead` tiles; ties keep fewer splits.
  const std::int64_t slots = std::int64_t(dev.num_sms) * plan.ctas_per_sm;
  std::int64_t chunk = std::max<std::int64_t>(max_tiles, 1);
  if (opt.split_kv && max_tiles > 1 && std::int64_t(tasks.size()) < 4 * slots) {
    const double overhead = 2.0;
    // Row tiles by key-tile count (a batch has few distinct lengths): (tiles, how many).
    std::vector<std::pair<std::int64_t, std::int64_t>> lengths;
    for (const auto& t : tasks) lengths.push_back({t.tiles, 1});
    std::sort(lengths.begin(), lengths.end());
    std::size_t distinct = 0;
    for (std::size_t i = 0; i < lengths.size(); ++i) {
      if (distinct > 0 && lengths[distinct - 1].first == lengths[i].first) ++lengths[distinct - 1].second;
      else lengths[distinct++] = lengths[i];
    }
    lengths.resize(distinct);
    auto items_for = [&](std::int64_t c) {
      std::int64_t n = 0;
      for (const auto& [tiles, many] : lengths) n += many * std::max<std::int64_t>(1, detail::ceil_div(tiles, c));
      return n;
    };
    // Measured on H100 (docs/perf-log/decode.md): splitting 128 x 4k three ways ran at 2.77 TB/s,
    // unsplit at 2.60, so any estimated gain is taken.
    double best = double(detail::ceil_div(std::int64_t(tasks.size()), slots)) * (double(max_tiles) + overhead);
    const int max_splits = std::max(1, opt.max_splits);
    for (std::int64_t k = 1; k <= std::min<std::int64_t>(max_tiles, max_splits); ++k) {
      const std::int64_t c = detail::ceil_div(max_tiles, k);
      if (k > 1 && c == detail::ceil_div(max_tiles, k - 1)) continue;
      const std::int64_t items = items_for(c);
      const double cost = double(detail::ceil_div(items, slots)) * (double(c) + overhead);
      if (cost < best - 1e-9) {
        best = cost;
        chunk = c;
      }
    }
  }
  plan.chunk_tiles = chunk < max_tiles ? int(chunk) : 0;

  for (const auto& t : tasks) {
    const std::int64_t n = std::max<std::int64_t>(1, detail::ceil_div(t.tiles, chunk));
    const std::int32_t ql = plan.q_len[t.b], kl = plan.kv_len[t.b], base = detail::table_page_base(table, t.b);
    if (n == 1) {
      plan.work.push_back({t.b, t.kvh, t.row0, t.kv_begin, t.kv_end, -1, ql, kl, base});
      continue;
    }
    plan.merges.push_back({t.b, t.kvh, t.row0, plan.num_partials, std::int32_t(n)});
    plan.merge_rows = std::max(plan.merge_rows, std::min(bm, ql * group - t.row0));
    for (std::int64_t k = 0; k < n; ++k) {
      const std::int64_t a = k * t.tiles / n, e = (k + 1) * t.tiles / n;
      const std::int32_t kb = std::int32_t(t.kv_begin + a * bn);
      const std::int32_t ke = std::int32_t(std::min<std::int64_t>(t.kv_end, t.kv_begin + e * bn));
      plan.work.push_back({t.b, t.kvh, t.row0, kb, ke, plan.num_partials++, ql, kl, base});
    }
  }
  KVTILE_REQUIRE(plan.work.size() < (std::size_t(1) << 31), errc::unsupported, "plan has ", plan.work.size(),
                 " work items (more than a grid holds)");
  return plan;
}

}  // namespace attention::cuda
KVTILE_NAMESPACE_END
