// Fault injection into one serving step on the GPU (the path of examples/serving_loop.cu: a
// device-memory paged cache, its CSR table, the paged decode kernel): the device pool exhausted
// in the middle of a step, a page table naming a block outside the pool, a kernel argument the
// run cannot accept. Each is a kvtile::error naming the value; afterwards the cache's
// bookkeeping, its pool bytes and the output are as they were, and the next step runs correctly
// (checked against the CPU attention over the same pools).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "kvtile/attention/cpu/forward.hpp"
#include "kvtile/attention/cuda/decode.cuh"
#include "kvtile/kv_cache.hpp"
#include "kvtile/memory/cuda/device_memory.cuh"
#include "support/device_buffer.cuh"

using namespace kvtile;
using namespace kvtile::attention;
namespace kc = kvtile::attention::cuda;
using kvtile_test::device_buffer;

namespace {
using T = bfloat16;
using cache_t = paged_kv_cache<T>::with_memory<memory::cuda::device_memory>;
constexpr int kD = 64, kKvHeads = 2, kQoHeads = 4, kPage = 16, kBlocks = 8;

struct snapshot {
  std::vector<std::vector<memory::block_id>> tables;
  std::vector<std::int64_t> lengths;
  memory::allocator_stats stats;
  std::vector<unsigned char> k, v;
  snapshot(const cache_t& c, const std::vector<sequence_id>& ids) : stats(c.stats()) {
    for (auto id : ids) {
      const auto b = c.table(id).blocks();
      tables.emplace_back(b.begin(), b.end());
      lengths.push_back(c.num_tokens(id));
    }
    const std::size_t n = c.storage().bytes_per_pool();
    k.resize(n);
    v.resize(n);
    KVTILE_CUDA_CHECK(cudaDeviceSynchronize());
    KVTILE_CUDA_CHECK(cudaMemcpy(k.data(), c.storage().k_data(), n, cudaMemcpyDeviceToHost));
    KVTILE_CUDA_CHECK(cudaMemcpy(v.data(), c.storage().v_data(), n, cudaMemcpyDeviceToHost));
  }
  bool operator==(const snapshot& o) const {
    return tables == o.tables && lengths == o.lengths && stats.free == o.stats.free && stats.used == o.stats.used &&
           k == o.k && v == o.v;
  }
};

template <class F>
std::string error_of(F&& f, errc code) {
  try {
    f();
  } catch (const kvtile::error& e) {
    CHECK(e.code() == code);
    return e.what();
  }
  FAIL("expected a kvtile::error");
  return {};
}

// Appends n tokens to id and writes their K/V (random bf16) through the device slot mapping.
void append_and_write(cache_t& c, sequence_id id, std::int64_t n, std::mt19937_64& rng) {
  const auto slots = c.append(id, n);
  c.run_pending_copies();
  std::uniform_real_distribution<float> dist(-1.f, 1.f);
  std::vector<T> k(std::size_t(n) * kKvHeads * kD), v(k.size());
  for (std::size_t i = 0; i < k.size(); ++i) k[i] = T(dist(rng)), v[i] = T(dist(rng));
  const device_buffer<T> dk(k), dv(v);
  const device_buffer<std::int64_t> ds(slots);
  c.write(0, dk.ptr, dv.ptr, kKvHeads * kD, ds.ptr, std::int32_t(n));
  KVTILE_CUDA_CHECK(cudaDeviceSynchronize());
}

// One cache of three sequences of 20 tokens (2 blocks each: 6 of 8 blocks used).
struct fixture {
  std::mt19937_64 rng{1234};
  cache_t cache{memory::kv_shape{1, kBlocks, kPage, kKvHeads, kD}};
  std::vector<sequence_id> ids;
  fixture() {
    for (int i = 0; i < 3; ++i) {
      ids.push_back(cache.create());
      append_and_write(cache, ids.back(), 20, rng);
    }
    cache.check_invariants();
  }
};
}  // namespace

TEST_CASE("serving fault: the device pool exhausted mid-step is refused whole; bookkeeping and pool bytes unchanged") {
  fixture f;
  auto& c = f.cache;
  const snapshot before(c, f.ids);
  // Every sequence grows past its second block: 3 blocks needed, 2 free. Appended one by one,
  // the third would fail after the first two were applied; as a step, none is.
  const std::vector<append_request> step{{f.ids[0], 13}, {f.ids[1], 13}, {f.ids[2], 13}};
  CHECK(!c.can_append(step));
  const auto msg = error_of([&] { c.append_batch(step); }, errc::out_of_blocks);
  CHECK(msg.find("needs 3 blocks, 2 are free") != std::string::npos);
  CHECK(snapshot(c, f.ids) == before);
  c.check_invariants();
  error_of([&] { c.append(f.ids[0], std::int64_t(1) << 40); }, errc::out_of_blocks);
  CHECK(snapshot(c, f.ids) == before);
  // The same step with a watermark of one block left free is refused too; a smaller one runs.
  const std::vector<append_request> smaller{{f.ids[0], 13}, {f.ids[1], 12}};
  CHECK(!c.can_append(smaller, /*watermark=*/2));
  CHECK(c.can_append(smaller, /*watermark=*/1));
  const auto slots = c.append_batch(smaller, 1);
  CHECK(slots.size() == 25);
  CHECK(c.stats().free == 1);
  c.check_invariants();
}

TEST_CASE("serving fault: a page table naming a block outside the pool is refused before any launch") {
  fixture f;
  auto& c = f.cache;
  const snapshot before(c, f.ids);
  auto table = c.to_csr(f.ids);
  table.indices[3] = kBlocks;  // one past the pool
  table.max_block_id = kBlocks;
  const std::vector<std::int32_t> q_indptr{0, 1, 2, 3};
  const kc::paged_problem pr{kQoHeads, kKvHeads, kD, kPage, kBlocks, 2};
  const auto msg = error_of(
      [&] { kc::plan_decode<causal_mask>(q_indptr.data(), table.view(), pr, {}, kc::query_device_limits()); },
      errc::out_of_range);
  CHECK(msg.find("is block 8, outside the pool [0, 8)") != std::string::npos);
  CHECK(error_of([&] { paging::bind(c.layer(0), table); }, errc::out_of_range).find("holds block 8") != std::string::npos);
  table.indices[3] = -1;
  error_of([&] { kc::plan_decode<causal_mask>(q_indptr.data(), table.view(), pr, {}, kc::query_device_limits()); },
           errc::out_of_range);
  CHECK(cudaGetLastError() == cudaSuccess);
  CHECK(snapshot(c, f.ids) == before);
  c.check_invariants();
}

TEST_CASE("serving fault: kernel argument errors leave the output untouched; the next step runs correctly") {
  fixture f;
  auto& c = f.cache;
  const int batch = 3;
  // The step: one new token per sequence, appended and written, then decode.
  for (auto id : f.ids) append_and_write(c, id, 1, f.rng);
  const snapshot before(c, f.ids);
  const auto table = c.to_csr(f.ids);
  const std::vector<std::int32_t> q_indptr{0, 1, 2, 3};
  const kc::paged_problem pr{kQoHeads, kKvHeads, kD, kPage, kBlocks, 2};
  const auto plan = kc::plan_decode<causal_mask>(q_indptr.data(), table.view(), pr, {}, kc::query_device_limits());
  device_buffer<unsigned char> ws(plan.workspace_bytes());
  kc::upload_plan(plan, ws.ptr);
  const device_buffer<std::int32_t> d_indptr(table.indptr), d_indices(table.indices), d_last(table.last_page_len),
      d_q_indptr(q_indptr);
  const paging::paged_kv<T, paging::csr_page_table> kv{
      c.layer(0), {d_indptr.ptr, d_indices.ptr, d_last.ptr, batch}};
  std::uniform_real_distribution<float> dist(-1.f, 1.f);
  std::vector<T> q(std::size_t(batch) * kQoHeads * kD);
  for (auto& x : q) x = T(dist(f.rng));
  const device_buffer<T> dq(q);
  const std::vector<T> poison(q.size(), T(std::nanf("")));
  device_buffer<T> dout(poison.size() + 8);
  KVTILE_CUDA_CHECK(cudaMemset(dout.ptr, 0xff, dout.n * sizeof(T)));
  const auto ql = ragged_layout::varlen(d_q_indptr.ptr, batch, kQoHeads, kD);
  const dense_tensor<T> qt{dq.ptr, ql}, ot{dout.ptr, ql};
  auto untouched = [&] {
    KVTILE_CUDA_CHECK(cudaDeviceSynchronize());
    for (const T& x : dout.download()) {
      std::uint16_t bits;
      std::memcpy(&bits, &x, 2);
      if (bits != 0xffff) return false;
    }
    return true;
  };
  // A negative scale, a misaligned output, a tensor with the wrong head count, a pool with a
  // different block count than planned: each refused before the launch.
  CHECK(error_of([&] { kc::run_decode<causal_mask, kD>(plan, ws.ptr, qt, kv, ot, nullptr, {}, -0.1f); },
                 errc::invalid_argument)
            .find("scale must be positive") != std::string::npos);
  const dense_tensor<T> misaligned{dout.ptr + 1, ql};
  CHECK(error_of([&] { kc::run_decode<causal_mask, kD>(plan, ws.ptr, qt, kv, misaligned, nullptr, {}, 0.125f); },
                 errc::invalid_argument)
            .find("16-byte aligned") != std::string::npos);
  const dense_tensor<T> wrong_heads{dout.ptr, ragged_layout::varlen(d_q_indptr.ptr, batch, 2, kD)};
  error_of([&] { kc::run_decode<causal_mask, kD>(plan, ws.ptr, qt, kv, wrong_heads, nullptr, {}, 0.125f); },
           errc::invalid_argument);
  auto small_pool = kv;
  small_pool.pool.num_blocks = kBlocks - 1;
  error_of([&] { kc::run_decode<causal_mask, kD>(plan, ws.ptr, qt, small_pool, ot, nullptr, {}, 0.125f); },
           errc::invalid_argument);
  error_of([&] { kc::run_decode<causal_mask, kD>(plan, nullptr, qt, kv, ot, nullptr, {}, 0.125f); },
           errc::invalid_argument);
  CHECK(untouched());
  CHECK(cudaGetLastError() == cudaSuccess);
  CHECK(snapshot(c, f.ids) == before);
  c.check_invariants();

  // The step as it should be: the result equals the CPU attention over the same pools.
  kc::run_decode<causal_mask, kD>(plan, ws.ptr, qt, kv, ot, nullptr, {}, 0.125f);
  KVTILE_CUDA_CHECK(cudaDeviceSynchronize());
  const auto got = dout.download();
  snapshot now(c, f.ids);  // the pools' bytes, on the host
  const auto host_pool = paging::kv_pool_view<T>::make(reinterpret_cast<T*>(now.k.data()), reinterpret_cast<T*>(now.v.data()),
                                                       kv_layout::nhd, kBlocks, kPage, kKvHeads, kD);
  const auto host_kv = paging::bind(host_pool, table);
  std::vector<T> want(q.size());
  const dense_tensor<T> hq{q.data(), ragged_layout::varlen(q_indptr.data(), batch, kQoHeads, kD)};
  const dense_tensor<T> ho{want.data(), hq.layout};
  cpu::attention_forward<tile_shape<16, 64>, kD, causal_mask>(hq, host_kv, kKvHeads, {}, 0.125f, ho);
  float worst = 0.f;
  for (std::size_t i = 0; i < want.size(); ++i) worst = std::max(worst, std::fabs(float(got[i]) - float(want[i])));
  CHECK(worst < 2e-2f);

  // An empty step is a no-op: an empty plan, null pointers.
  const std::vector<std::int32_t> no_q{0};
  const paging::csr_page_table empty_table{no_q.data(), nullptr, nullptr, 0};
  const auto empty_plan = kc::plan_decode<causal_mask>(no_q.data(), empty_table, pr, {}, kc::query_device_limits());
  CHECK(empty_plan.work.empty());
  kc::upload_plan(empty_plan, nullptr);
  const dense_tensor<T> none{nullptr, ragged_layout::varlen(nullptr, 0, kQoHeads, kD)};
  const paging::paged_kv<T, paging::csr_page_table> no_kv{c.layer(0), {nullptr, nullptr, nullptr, 0}};
  kc::run_decode<causal_mask, kD>(empty_plan, nullptr, none, no_kv, none, nullptr, {}, 0.125f);
  CHECK(cudaDeviceSynchronize() == cudaSuccess);
  c.check_invariants();
}
