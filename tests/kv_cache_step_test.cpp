// kvtile/kv_cache.hpp, the step API: can_append(requests) and append_batch, all or nothing,
// with a watermark; a failing batch leaves the bookkeeping and the pools' bytes unchanged.
#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kvtile/kv_cache.hpp"
#include "support/test_util.hpp"

using namespace kvtile;

namespace {
using cache_t = paged_kv_cache<float>;

// Everything observable: tables, lengths, refcounts, pending copies, counts, and the pool bytes.
struct snapshot {
  std::vector<sequence_id> ids;
  std::vector<std::vector<memory::block_id>> tables;
  std::vector<std::int64_t> lengths, refcounts;
  std::vector<memory::block_copy> pending;
  std::int32_t free = 0;
  std::vector<unsigned char> k, v;
  explicit snapshot(const cache_t& c) : ids(c.blocks().sequences()), free(c.stats().free) {
    for (auto id : ids) {
      const auto b = c.table(id).blocks();
      tables.emplace_back(b.begin(), b.end());
      lengths.push_back(c.num_tokens(id));
    }
    for (memory::block_id b = 0; b < c.blocks().num_blocks(); ++b) refcounts.push_back(c.blocks().refcount(b));
    pending.assign(c.pending_copies().begin(), c.pending_copies().end());
    const auto n = c.storage().bytes_per_pool();
    k.assign(reinterpret_cast<const unsigned char*>(c.storage().k_data()), reinterpret_cast<const unsigned char*>(c.storage().k_data()) + n);
    v.assign(reinterpret_cast<const unsigned char*>(c.storage().v_data()), reinterpret_cast<const unsigned char*>(c.storage().v_data()) + n);
  }
  bool operator==(const snapshot&) const = default;
};

template <class F>
void expect_unchanged(cache_t& c, errc code, const std::string& text, F&& f) {
  const snapshot before(c);
  kvtile_test::expect_error(code, text, f);
  CHECK(snapshot(c) == before);
  c.check_invariants();
}

void fill(cache_t& c, sequence_id id, const std::vector<std::int64_t>& slots, float base) {
  std::vector<float> k(slots.size() * 4), v(slots.size() * 4);
  for (std::size_t i = 0; i < k.size(); ++i) k[i] = base + float(i), v[i] = -base - float(i);
  c.write(0, k.data(), v.data(), 4, slots.data(), std::int32_t(slots.size()));
  (void)id;
}
}  // namespace

TEST_CASE("append_batch: the fifth append does not fit, so none of the five is applied") {
  cache_t c(memory::kv_shape{1, 10, 4, 1, 4});
  const auto p = c.create();
  fill(c, p, c.append(p, 6), 1.f);  // 2 blocks, the last half full
  std::vector<sequence_id> s{p, c.fork(p), c.fork(p), c.create(), c.create()};
  const memory::block_id shared_tail = c.table(p).last_block();
  // Sequences 1 and 2 share p's half-full tail: appending to p, 1 and 2 copies it twice (the
  // third holder keeps the original). 3 and 4 are empty.
  const std::vector<append_request> batch{{s[0], 1}, {s[1], 1}, {s[2], 1}, {s[3], 8}, {s[4], 13}};
  CHECK(c.blocks().blocks_needed(batch) == 2 + 2 + 4);  // 2 copies, then 2 and 4 fresh blocks
  CHECK(c.stats().free == 8);
  CHECK(c.can_append(batch));
  CHECK(!c.can_append(batch, /*watermark=*/1));
  expect_unchanged(c, errc::out_of_blocks, "needs 8 blocks, 8 are free, watermark 1", [&] { c.append_batch(batch, 1); });
  const std::vector<append_request> bigger{{s[0], 1}, {s[1], 1}, {s[2], 1}, {s[3], 8}, {s[4], 17}};
  CHECK(!c.can_append(bigger));
  expect_unchanged(c, errc::out_of_blocks, "needs 9 blocks, 8 are free", [&] { c.append_batch(bigger); });

  // The batch that fits runs whole, in order: the slots follow the requests.
  const auto slots = c.append_batch(batch);
  CHECK(slots.size() == 1 + 1 + 1 + 8 + 13);
  CHECK(c.stats().free == 0);
  CHECK(c.pending_copies().size() == 2);
  c.check_invariants();
  // One request's slots equal what a single append would have given: the table's last slots.
  CHECK(slots[0] == c.table(s[0]).slot(6));
  CHECK(slots[2] == c.table(s[2]).slot(6));
  CHECK(slots[3] == c.table(s[3]).slot(0));
  CHECK(slots.back() == c.table(s[4]).slot(12));
  // Copy-on-write ran exactly as sequential appends would: the last holder kept the shared tail.
  CHECK(c.table(s[2]).last_block() == shared_tail);
  CHECK(c.blocks().refcount(c.table(s[2]).last_block()) == 1);
  c.run_pending_copies();
  for (auto id : {s[0], s[1], s[2]}) {
    const auto& t = c.table(id);
    CHECK(c.layer(0).k_at(t.block(1), 1, 0)[0] == 1.f + 20.f);  // token 5 of the prompt, copied
  }
}

TEST_CASE("append_batch: malformed requests are errors that change nothing") {
  cache_t c(memory::kv_shape{1, 6, 4, 1, 4});
  const auto a = c.create(), b = c.create();
  c.append(a, 3);
  const auto gone = c.create();
  c.free(gone);
  std::vector<append_request> r{{a, 1}, {b, 2}, {gone, 1}};
  expect_unchanged(c, errc::unknown_sequence, "it was freed", [&] { c.append_batch(r); });
  r[2] = {b, 1};
  expect_unchanged(c, errc::invalid_argument, "more than once", [&] { c.append_batch(r); });
  r[2] = {a, -1};
  r.erase(r.begin());
  expect_unchanged(c, errc::invalid_argument, "cannot append -1 tokens", [&] { c.append_batch(r); });
  const std::vector<append_request> ok{{a, 2}, {b, 2}};
  std::vector<std::int64_t> small(3);
  expect_unchanged(c, errc::invalid_argument, "cannot hold the batch's 4 new tokens", [&] { c.append_batch(ok, small); });
  expect_unchanged(c, errc::invalid_argument, "watermark must be >= 0", [&] { c.append_batch(ok, -1); });
  const std::vector<append_request> huge{{a, std::int64_t(1) << 62}, {b, std::int64_t(1) << 62}};
  expect_unchanged(c, errc::out_of_blocks, "blocks, 5 are free", [&] { c.append_batch(huge); });
  CHECK(!c.can_append(huge));
  const std::vector<append_request> wrap{{a, std::numeric_limits<std::int64_t>::max()}};
  expect_unchanged(c, errc::invalid_argument, "overflows", [&] { c.append_batch(wrap); });
  // Zero-token requests allocate nothing and copy nothing.
  const auto f = c.fork(a);
  const std::vector<append_request> zeros{{a, 0}, {f, 0}, {b, 0}};
  CHECK(c.blocks().blocks_needed(zeros) == 0);
  CHECK(c.append_batch(zeros).empty());
  CHECK(c.pending_copies().empty());
  c.check_invariants();
}

TEST_CASE("append_batch against sequential appends: same tables, same slots, random batches") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (int round = 0; round < 200; ++round) {
    cache_t c(memory::kv_shape{1, 24, 4, 1, 4});
    std::vector<sequence_id> ids{c.create()};
    c.append(ids[0], std::int64_t(rng() % 9));
    for (int i = 0; i < 5; ++i) {
      const auto parent = ids[rng() % ids.size()];
      ids.push_back(rng() % 2 ? c.fork(parent) : c.create());
      if (rng() % 2) c.append(ids.back(), std::int64_t(rng() % 5));
      c.run_pending_copies();
    }
    std::vector<append_request> batch;
    for (auto id : ids)
      if (rng() % 3) batch.push_back({id, std::int64_t(rng() % 7)});
    cache_t::manager_type ref = c.blocks();  // sequential appends on a copy
    std::vector<std::int64_t> want;
    bool fits = true;
    try {
      for (const auto& r : batch) {
        const auto s = ref.append(r.id, r.num_tokens);
        want.insert(want.end(), s.begin(), s.end());
      }
    } catch (const kvtile::error& e) {
      CHECK(e.code() == errc::out_of_blocks);
      fits = false;
    }
    const std::int32_t wm = std::int32_t(rng() % 3);
    CHECK(c.can_append(batch) == fits);
    if (!fits) {
      expect_unchanged(c, errc::out_of_blocks, "blocks", [&] { c.append_batch(batch); });
      continue;
    }
    const bool fits_wm = c.stats().free - c.blocks().blocks_needed(batch) >= wm;
    CHECK(c.can_append(batch, wm) == fits_wm);
    if (!fits_wm) {
      expect_unchanged(c, errc::out_of_blocks, "watermark", [&] { c.append_batch(batch, wm); });
      continue;
    }
    CHECK(c.append_batch(batch, wm) == want);
    for (auto id : ids) CHECK(c.table(id).blocks().size() == ref.table(id).blocks().size());
    CHECK(c.stats().free == ref.stats().free);
    CHECK(c.pending_copies().size() == ref.pending_copies().size());
    c.check_invariants();
  }
}
