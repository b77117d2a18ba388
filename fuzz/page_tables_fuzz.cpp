// fuzz/page_tables_fuzz.cpp: page tables (CSR and padded) and query layouts decoded from bytes,
// given to the CPU attention. Either its checks refuse them with a kvtile::error before any
// work, or the kernel runs and reads only inside the pool (AddressSanitizer watches every read)
// and writes outputs that are convex combinations of V rows.
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "byte_reader.hpp"
#include "kvtile/attention/cpu/forward.hpp"
#include "kvtile/paging/paged_view.hpp"

namespace {
using namespace kvtile;
using kvtile_fuzz::byte_reader;
constexpr int head_dim = 16;
using tile = attention::tile_shape<16, 16>;

attention::cpu::thread_pool& one_thread() {
  static attention::cpu::thread_pool pool(1);
  return pool;
}

template <class Table>
void run(byte_reader& in, const paging::kv_pool_view<float>& pool, const Table& table, std::int32_t num_kv_heads,
         std::int32_t group, bool causal) {
  // Query lengths: mostly sensible, sometimes anything (negative, larger than the keys, huge).
  const std::int32_t batch = table.batch;
  std::vector<std::int32_t> q_indptr(std::size_t(std::max(batch, 0)) + 1, 0);
  for (std::int32_t b = 0; b < batch; ++b)  // wraps like an untrusted int32 array may
    q_indptr[std::size_t(b) + 1] = std::int32_t(std::uint32_t(q_indptr[std::size_t(b)]) +
                                                std::uint32_t(in.u8() < 240 ? in.range(0, 4) : in.edgy(4)));
  const std::int64_t rows = batch > 0 ? q_indptr.back() : 0;
  if (rows < 0 || rows > 4096) return;  // the query array's own length: the caller's contract
  const std::int32_t heads = num_kv_heads * group;
  std::vector<float> q(std::size_t(rows * heads * head_dim)), o(q.size(), -7.f), lse(std::size_t(rows * heads));
  for (auto& x : q) x = float(std::int32_t(in.u8()) - 128) / 64.f;
  const bool null_q = rows == 0 && in.u8() % 2;  // nothing read: a null pointer is allowed
  const attention::dense_tensor<float> qt{null_q ? nullptr : q.data(),
                                          attention::ragged_layout::varlen(q_indptr.data(), batch, heads, head_dim)};
  const attention::dense_tensor<float> ot{null_q ? nullptr : o.data(), qt.layout};
  const paging::paged_kv<float, Table> kv{pool, table};
  try {
    if (causal)
      attention::cpu::attention_forward<tile, head_dim, attention::causal_mask>(qt, kv, num_kv_heads, {}, 0.25f, ot,
                                                                                lse.data(), one_thread());
    else
      attention::cpu::attention_forward<tile, head_dim, attention::no_mask>(qt, kv, num_kv_heads, {}, 0.25f, ot,
                                                                            lse.data(), one_thread());
  } catch (const kvtile::error&) {
    for (float x : o) KVTILE_FUZZ_CHECK(x == -7.f);  // refused before any write
    return;
  }
  // V entries are in [-2, 2): so is every output (a softmax-weighted mean, or 0 for no keys)
  // (fp32 rounding of the weights' sum allows a few ulps past the bound.)
  for (float x : o) KVTILE_FUZZ_CHECK(std::isfinite(x) && std::fabs(x) <= 2.f * (1.f + 1e-5f));
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  byte_reader in(data, size);
  const std::int32_t num_blocks = std::int32_t(in.range(0, 12));
  const std::int32_t page_size = std::int32_t(in.u8() < 250 ? in.range(1, 8) : in.edgy(8));
  const std::int32_t num_kv_heads = std::int32_t(in.range(1, 2));
  const std::int32_t group = std::int32_t(in.range(1, 2));
  const auto layout = in.u8() % 2 ? kv_layout::nhd : kv_layout::hnd;
  const bool causal = in.u8() % 2;
  const bool csr = in.u8() % 2;
  const std::int32_t batch = std::int32_t(in.u8() < 250 ? in.range(0, 4) : in.edgy(4));
  if (batch < 0 || batch > 64) {
    // The arrays would have batch entries: only the refusal of a negative batch is testable.
    if (batch < 0) {
      const paging::padded_page_table t{nullptr, nullptr, batch, 0};
      const auto pool = paging::kv_pool_view<float>::make(nullptr, nullptr, layout, 0, 1, num_kv_heads, head_dim);
      bool refused = false;
      try {
        attention::cpu::detail::check_kv_source(paging::paged_kv<float, paging::padded_page_table>{pool, t}, num_kv_heads,
                                                head_dim);
      } catch (const kvtile::error&) {
        refused = true;
      }
      KVTILE_FUZZ_CHECK(refused);
    }
    return 0;
  }
  const std::int64_t elems = page_size > 0 && page_size <= 8 ? std::int64_t(num_blocks) * page_size * num_kv_heads * head_dim : 0;
  std::vector<float> k(static_cast<std::size_t>(elems)), v(static_cast<std::size_t>(elems));
  for (std::size_t i = 0; i < k.size(); ++i) {
    k[i] = float(std::int32_t(in.u8()) - 128) / 64.f;
    v[i] = float(std::int32_t(in.u8()) - 128) / 64.f;
  }
  // A pool with a page size past 8 has no storage: the checks must refuse every table that reads it.
  const auto pool = paging::kv_pool_view<float>::make(elems ? k.data() : nullptr, elems ? v.data() : nullptr, layout,
                                                      elems ? num_blocks : 0, page_size, num_kv_heads, head_dim);
  auto block_id = [&] { return std::int32_t(in.u8() < 245 ? in.range(0, std::max(num_blocks, 1) - 1) : in.edgy(16)); };
  if (csr) {
    std::vector<std::int32_t> indptr(static_cast<std::size_t>(batch) + 1, 0), last(static_cast<std::size_t>(batch));
    for (std::int32_t b = 0; b < batch; ++b) {
      indptr[std::size_t(b) + 1] = indptr[std::size_t(b)] + std::int32_t(in.range(0, 4));
      last[std::size_t(b)] = std::int32_t(in.u8() < 240 ? in.range(1, std::max(page_size, 1)) : in.edgy(8));
    }
    if (in.u8() >= 224)  // one entry anywhere: decreasing, negative, huge
      indptr[std::size_t(in.range(0, batch))] = std::int32_t(in.edgy(20));
    bool monotone = indptr[0] >= 0;
    for (std::int32_t b = 0; b < batch; ++b) monotone = monotone && indptr[std::size_t(b) + 1] >= indptr[std::size_t(b)];
    // A well-formed indptr promises indices of indptr[batch] entries: past a few thousand the
    // fuzzer cannot keep that promise.
    if (monotone && indptr.back() > 4096) return 0;
    std::vector<std::int32_t> indices(std::size_t(std::max(indptr.back(), 0)));
    for (auto& x : indices) x = block_id();
    run(in, pool, paging::csr_page_table{indptr.data(), indices.data(), last.data(), batch}, num_kv_heads, group, causal);
  } else {
    const std::int32_t max_blocks = std::int32_t(in.u8() < 245 ? in.range(0, 6) : in.edgy(6));
    if (max_blocks > 64) return 0;  // the block table's own size
    std::vector<std::int32_t> table(static_cast<std::size_t>(batch) * std::size_t(std::max(max_blocks, 0))), lens(static_cast<std::size_t>(batch));
    for (auto& x : table) x = block_id();
    for (auto& x : lens) x = std::int32_t(in.u8() < 240 ? in.range(0, std::int64_t(std::max(max_blocks, 0)) * std::max(page_size, 1)) : in.edgy(40));
    run(in, pool, paging::padded_page_table{table.data(), lens.data(), batch, max_blocks}, num_kv_heads, group, causal);
  }
  return 0;
}
