// kvtile/kv_cache.hpp at the edges of its lifetime and sizes: copies and moves of the manager
// and the cache, ids never reused (a shrunk generation counter wraps in a few cycles), sizes
// that overflow, and zero-size work.
#include <doctest/doctest.h>

#include "support/test_util.hpp"

#include <cstdint>
#include <cstring>
#include <limits>
#include <set>
#include <string>
#include <vector>

#include "kvtile/kv_cache.hpp"
#include "kvtile/memory/lowest_id_allocator.hpp"

using namespace kvtile;

namespace {
template <class F>
void expect_code(errc code, const std::string& text, F&& f) {
  kvtile_test::expect_error(code, text, f);
}
}  // namespace

TEST_CASE("a moved-from cache is empty and valid: capacity 0, every call an error or a no-op") {
  paged_kv_cache<float> a(memory::kv_shape{1, 8, 4, 1, 4});
  const auto s = a.create();
  const auto slots = a.append(s, 6);  // 2 blocks
  std::vector<float> k(6 * 4, 1.5f), v(6 * 4, -2.f);
  a.write(0, k.data(), v.data(), 4, slots.data(), 6);

  paged_kv_cache<float> b = std::move(a);
  b.check_invariants();
  CHECK(b.num_tokens(s) == 6);
  CHECK(b.stats().used == 2);
  CHECK(b.layer(0).k_at(b.table(s).block(1), 1, 0)[3] == 1.5f);

  // Once: capacity 8, free 6, used 2 over null pools, create() returning an id live in b.
  CHECK(a.blocks().num_blocks() == 0);
  CHECK(a.stats().capacity == 0);
  CHECK(a.stats().free == 0);
  CHECK(a.stats().used == 0);
  CHECK(a.blocks().num_sequences() == 0);
  CHECK(a.blocks().sequences().empty());
  CHECK(a.layer(0).num_blocks == 0);
  CHECK(a.layer(0).k == nullptr);
  a.check_invariants();
  expect_code(errc::invalid_argument, "moved-from", [&] { a.create(); });
  expect_code(errc::unknown_sequence, "no such sequence", [&] { a.append(s, 1); });
  expect_code(errc::unknown_sequence, "no such sequence", [&] { a.fork(s); });
  expect_code(errc::unknown_sequence, "no such sequence", [&] { a.free(s); });
  expect_code(errc::unknown_sequence, "no such sequence", [&] { a.truncate(s, 0); });
  expect_code(errc::unknown_sequence, "no such sequence", [&] { a.num_tokens(s); });
  const std::vector<sequence_id> ids{s};
  expect_code(errc::unknown_sequence, "no such sequence", [&] { a.to_csr(ids); });
  expect_code(errc::out_of_range, "outside the pool's 0 slots", [&] { a.write(0, k.data(), v.data(), 4, slots.data(), 1); });
  CHECK(a.to_csr({}).batch() == 0);
  a.write(0, nullptr, nullptr, 4, nullptr, 0);  // nothing to write
  a.run_pending_copies();                      // nothing pending
  CHECK(!a.blocks().contains(s));
  CHECK(b.blocks().contains(s));  // b is untouched by all of that
  b.check_invariants();

  // Move assignment back into the moved-from cache makes it whole again.
  a = std::move(b);
  CHECK(a.num_tokens(s) == 6);
  const auto t = a.create();
  a.append(t, 9);
  a.check_invariants();
  expect_code(errc::invalid_argument, "moved-from", [&] { b.create(); });
}

TEST_CASE("a copy of the block manager is independent, and its no-throw paths stay no-throw") {
  kv_block_manager<> m(6, 4);
  const auto a = m.create();
  m.append(a, 5);
  const auto f = m.fork(a);
  const auto gone = m.create();
  m.free(gone);
  kv_block_manager<> c(m);
  c.check_invariants();
  c.append(f, 1);  // copy-on-write in the copy only
  CHECK(c.pending_copies().size() == 1);
  CHECK(m.pending_copies().empty());
  CHECK(m.num_tokens(f) == 5);
  c.finish_copies();
  // Fill the copy: creates reuse the freed slot, then new ones; frees never allocate.
  std::vector<sequence_id> more;
  for (int i = 0; i < 5; ++i) more.push_back(c.create());
  for (auto id : more) c.free(id);
  c.free(a);
  c.free(f);
  c.check_invariants();
  CHECK(c.stats().used == 0);
  CHECK(m.stats().used == 2);
  CHECK(m.contains(a));
  kv_block_manager<> assigned(1, 4);
  assigned = m;
  assigned.check_invariants();
  CHECK(assigned.num_tokens(a) == 5);
  CHECK(!assigned.contains(gone));

  kv_block_manager<memory::lowest_id_allocator> l(3, 2);
  const auto x = l.create();
  l.append(x, 3);
  kv_block_manager<memory::lowest_id_allocator> lm(std::move(l));
  CHECK(lm.num_tokens(x) == 3);
  CHECK(l.num_blocks() == 0);
  l.check_invariants();
  expect_code(errc::invalid_argument, "moved-from", [&] { l.create(); });
}

TEST_CASE("sequence ids are never reused: a slot past its last generation is retired") {
  // Two generation bits: ids of slot 0 are generations 0..3, then the slot retires.
  kv_block_manager<memory::lifo_allocator, sharing::copy_on_write, 2> m(4, 2);
  std::set<sequence_id> seen;
  std::vector<sequence_id> old;
  for (int cycle = 0; cycle < 20; ++cycle) {
    const auto id = m.create();
    CHECK(seen.insert(id).second);  // never an id handed out before
    m.append(id, 3);
    m.free(id);
    old.push_back(id);
  }
  CHECK(m.num_retired_slots() == 5);  // 20 cycles, 4 generations per slot
  // Every stale id is refused, as freed, by every operation.
  for (auto id : old) {
    CHECK(!m.contains(id));
    expect_code(errc::double_free, "already freed", [&] { m.free(id); });
    expect_code(errc::unknown_sequence, "it was freed", [&] { m.append(id, 1); });
  }
  m.check_invariants();
  CHECK(m.stats().used == 0);
  // The default width: generation 2^32 - 1 is the last; with the knob at 32 bits the id layout
  // is (generation << 32) | slot.
  CHECK(kv_block_manager<>::max_generation == 0xffffffffu);
  kv_block_manager<> d(1, 1);
  const auto first = d.create();
  d.free(first);
  CHECK(d.create() == ((sequence_id(1) << 32) | 0));
}

TEST_CASE("huge appends and shapes: the out-of-blocks error, never an allocation of the request") {
  paged_kv_cache<float> c(memory::kv_shape{1, 4, 16, 1, 4});
  const auto s = c.create();
  c.append(s, 5);
  const std::int64_t huge = std::int64_t(1) << 62;
  expect_code(errc::out_of_blocks, "needs 288230376151711744 blocks, 3 are free", [&] { c.append(s, huge); });
  expect_code(errc::invalid_argument, "overflows", [&] { c.append(s, std::numeric_limits<std::int64_t>::max()); });
  CHECK(c.num_tokens(s) == 5);
  c.check_invariants();
  // The shape is checked (pool bytes included) before the block manager is built.
  expect_code(errc::invalid_argument, "overflows",
              [] { paged_kv_cache<float>(memory::kv_shape{65536, 65536, 65536, 65536, 1}); });
  expect_code(errc::invalid_argument, "overflows",
              [] { paged_kv_cache<float>(memory::kv_shape{1 << 30, std::numeric_limits<std::int32_t>::max(), 1 << 30, 1, 1}); });
}

TEST_CASE("zero-size work is a no-op: zero tokens, empty batches, null pointers where nothing is read") {
  paged_kv_cache<float> c(memory::kv_shape{1, 4, 4, 1, 4});
  const auto s = c.create();
  CHECK(c.append(s, 0).empty());
  c.append(s, 0, {});
  c.write(0, nullptr, nullptr, 4, nullptr, 0);
  c.run_pending_copies();
  const auto csr = c.to_csr({});
  CHECK(csr.batch() == 0);
  CHECK(csr.indptr.size() == 1);
  CHECK(c.to_padded({}).batch() == 0);
  CHECK(c.append_batch({}).empty());
  CHECK(c.can_append({}));
  memory::copy_blocks_host(c.storage().pools(), {});
  c.truncate(s, 0);
  CHECK(c.stats().used == 0);
  c.check_invariants();
}
