// fuzz/cache_ops_fuzz.cpp: the paged KV cache driven by an operation stream decoded from bytes,
// checked against a reference model after every operation.
//
// The model holds each live sequence's tokens (a distinct tag per token). Every operation's
// outcome is predicted first (success, or which error); an error must leave the cache exactly
// as it was; after each operation the cache's invariants hold and every length matches. Steps
// follow the serving order: mutate, run the pending copies, then write the new tokens' K/V;
// after each step every token of every sequence is read back through its page table.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "byte_reader.hpp"
#include "kvtile/caching/prefix_cache.hpp"
#include "kvtile/kv_cache.hpp"
#include "kvtile/memory/lowest_id_allocator.hpp"

namespace {
using namespace kvtile;
using kvtile_fuzz::byte_reader;

template <class Cache>
struct harness {
  struct seq {
    sequence_id id;
    std::vector<std::int32_t> tags;  // token i holds tags[i]
  };
  struct pending_write {
    sequence_id id;
    std::int64_t token;
    std::int64_t slot;
  };

  Cache cache;
  std::vector<seq> live;
  std::vector<sequence_id> dead;
  std::vector<pending_write> writes;  // appended this step, written after the copies
  std::int32_t next_tag = 1;

  explicit harness(memory::kv_shape shape) : cache(shape) {}

  // Everything observable, for "an error changed nothing".
  struct snapshot {
    std::vector<sequence_id> ids;
    std::vector<std::vector<memory::block_id>> tables;
    std::vector<std::int64_t> lengths, refcounts;
    std::vector<memory::block_copy> pending;
    memory::allocator_stats stats;
    bool operator==(const snapshot& o) const {
      return ids == o.ids && tables == o.tables && lengths == o.lengths && refcounts == o.refcounts &&
             pending == o.pending && stats.free == o.stats.free && stats.used == o.stats.used &&
             stats.capacity == o.stats.capacity;
    }
  };
  snapshot snap() const {
    snapshot s{cache.blocks().sequences(), {}, {}, {}, {}, cache.stats()};
    for (auto id : s.ids) {
      const auto b = cache.table(id).blocks();
      s.tables.emplace_back(b.begin(), b.end());
      s.lengths.push_back(cache.num_tokens(id));
    }
    for (memory::block_id b = 0; b < cache.blocks().num_blocks(); ++b) s.refcounts.push_back(cache.blocks().refcount(b));
    s.pending.assign(cache.pending_copies().begin(), cache.pending_copies().end());
    return s;
  }

  // Runs f; `expected` empty means it must succeed, else it must throw that code and change nothing.
  template <class F>
  bool run(std::optional<errc> expected, F&& f) {
    const snapshot before = snap();
    try {
      f();
    } catch (const kvtile::error& e) {
      KVTILE_FUZZ_CHECK(expected.has_value());
      KVTILE_FUZZ_CHECK(e.code() == *expected);
      KVTILE_FUZZ_CHECK(snap() == before);
      return false;
    }
    KVTILE_FUZZ_CHECK(!expected.has_value());
    return true;
  }

  std::int64_t blocks_for(std::int64_t n) const {
    const std::int64_t ps = cache.shape().page_size;
    return n / ps + (n % ps != 0);
  }
  // What an append of n tokens to s needs, predicted from the model and the public refcounts.
  std::int64_t need(const seq& s, std::int64_t n, std::int64_t copied_away = 0) const {
    const std::int64_t len = std::int64_t(s.tags.size());
    const bool cow = n > 0 && len % cache.shape().page_size != 0 &&
                     cache.blocks().refcount(cache.table(s.id).last_block()) - copied_away > 1;
    return blocks_for(len + n) - blocks_for(len) + (cow ? 1 : 0);
  }
  void record_writes(const seq& s, std::int64_t from, const std::vector<std::int64_t>& slots) {
    for (std::size_t i = 0; i < slots.size(); ++i) writes.push_back({s.id, from + std::int64_t(i), slots[i]});
  }
  seq* find(sequence_id id) {
    for (auto& s : live)
      if (s.id == id) return &s;
    return nullptr;
  }

  void op_create() {
    sequence_id id = 0;
    run(std::nullopt, [&] { id = cache.create(); });
    for (auto d : dead) KVTILE_FUZZ_CHECK(d != id);  // never an id handed out before
    for (auto& s : live) KVTILE_FUZZ_CHECK(s.id != id);
    live.push_back({id, {}});
  }
  void op_append(seq& s, std::int64_t n) {
    const std::int64_t len = std::int64_t(s.tags.size());
    std::optional<errc> want;
    if (n < 0) want = errc::invalid_argument;
    else if (n > std::numeric_limits<std::int64_t>::max() - len) want = errc::invalid_argument;
    else if (need(s, n) > cache.stats().free) want = errc::out_of_blocks;
    std::vector<std::int64_t> slots;
    if (!run(want, [&] { slots = cache.append(s.id, n); })) return;
    KVTILE_FUZZ_CHECK(std::int64_t(slots.size()) == n);
    for (std::int64_t i = 0; i < n; ++i) s.tags.push_back(next_tag++);
    record_writes(s, len, slots);
  }
  void op_append_batch(byte_reader& in) {
    std::vector<append_request> reqs;
    const int k = int(in.range(0, 4));
    for (int i = 0; i < k && !live.empty(); ++i)
      reqs.push_back({live[std::size_t(in.range(0, std::int64_t(live.size()) - 1))].id, in.edgy(12)});
    const std::int32_t watermark = std::int32_t(in.range(0, 3));
    // The oracle: every request checked in order (id, count, length), then no sequence twice,
    // then the same appends one by one on a copy of the bookkeeping, then the watermark.
    std::optional<errc> want;
    for (const auto& r : reqs) {
      const seq* s = find(r.id);
      if (!s) want = errc::unknown_sequence;
      else if (r.num_tokens < 0 || r.num_tokens > std::numeric_limits<std::int64_t>::max() - std::int64_t(s->tags.size()))
        want = errc::invalid_argument;
      if (want) break;
    }
    for (std::size_t i = 0; i < reqs.size() && !want; ++i)
      for (std::size_t j = 0; j < i; ++j)
        if (reqs[i].id == reqs[j].id) want = errc::invalid_argument;
    std::vector<std::int64_t> want_slots;
    if (!want) {
      auto ref = cache.blocks();
      try {
        for (const auto& r : reqs) {
          const auto s = ref.append(r.id, r.num_tokens);
          want_slots.insert(want_slots.end(), s.begin(), s.end());
        }
        if (ref.stats().free < watermark) want = errc::out_of_blocks;
      } catch (const kvtile::error& e) {
        KVTILE_FUZZ_CHECK(e.code() == errc::out_of_blocks);
        want = errc::out_of_blocks;
      }
      KVTILE_FUZZ_CHECK(cache.can_append(reqs, watermark) == !want);
    }
    std::vector<std::int64_t> slots;
    if (!run(want, [&] { slots = cache.append_batch(reqs, watermark); })) return;
    KVTILE_FUZZ_CHECK(slots == want_slots);
    std::size_t at = 0;
    for (const auto& r : reqs) {
      seq& s = *find(r.id);
      const std::int64_t len = std::int64_t(s.tags.size());
      for (std::int64_t i = 0; i < r.num_tokens; ++i) {
        s.tags.push_back(next_tag++);
        writes.push_back({s.id, len + i, slots[at++]});
      }
    }
  }
  // The caller forks after the step's K/V are written (the child shares the written slots).
  void op_fork(std::size_t i) {
    if (!writes.empty()) op_step();
    const std::optional<errc> want =
        cache.pending_copies().empty() ? std::nullopt : std::optional<errc>(errc::invalid_argument);
    sequence_id child = 0;
    if (!run(want, [&] { child = cache.fork(live[i].id); })) return;
    for (auto d : dead) KVTILE_FUZZ_CHECK(d != child);
    const auto tags = live[i].tags;
    live.push_back({child, tags});
  }
  void op_truncate(seq& s, std::int64_t n) {
    const std::int64_t len = std::int64_t(s.tags.size());
    const std::optional<errc> want = n < 0 || n > len ? std::optional<errc>(errc::out_of_range) : std::nullopt;
    if (!run(want, [&] { cache.truncate(s.id, n); })) return;
    s.tags.resize(std::size_t(n));
    std::erase_if(writes, [&](const pending_write& w) { return w.id == s.id && w.token >= n; });
  }
  void op_free(std::size_t i) {
    const sequence_id id = live[i].id;
    run(std::nullopt, [&] { cache.free(id); });
    std::erase_if(writes, [&](const pending_write& w) { return w.id == id; });
    live.erase(live.begin() + std::ptrdiff_t(i));
    dead.push_back(id);
  }
  void op_stale(sequence_id id, std::uint8_t what) {
    switch (what % 4) {
      case 0: run(errc::double_free, [&] { cache.free(id); }); break;
      case 1: run(errc::unknown_sequence, [&] { cache.append(id, 1); }); break;
      case 2: run(errc::unknown_sequence, [&] { cache.truncate(id, 0); }); break;
      default: {
        const std::vector<sequence_id> ids{id};
        run(errc::unknown_sequence, [&] { (void)cache.to_csr(ids); });
      }
    }
  }
  // End of a step: copies, then the step's writes, then every token read back.
  void op_step() {
    run(std::nullopt, [&] { cache.run_pending_copies(); });
    KVTILE_FUZZ_CHECK(cache.pending_copies().empty());
    for (const auto& w : writes) {
      const seq* s = find(w.id);
      KVTILE_FUZZ_CHECK(s != nullptr);
      const std::int32_t tag = s->tags[std::size_t(w.token)];
      cache.write(0, &tag, &tag, 1, &w.slot, 1);
    }
    writes.clear();
    check_contents();
  }
  void check_contents() {
    std::vector<sequence_id> ids;
    for (const auto& s : live) ids.push_back(s.id);
    const auto csr = cache.to_csr(ids);
    const auto kv = paging::bind(cache.layer(0), csr);
    for (std::size_t b = 0; b < live.size(); ++b) {
      KVTILE_FUZZ_CHECK(kv.kv_len(std::int32_t(b)) == std::int64_t(live[b].tags.size()));
      for (std::size_t t = 0; t < live[b].tags.size(); ++t) {
        const std::int64_t off = kv.token_offset(std::int32_t(b), std::int32_t(t), 0);
        KVTILE_FUZZ_CHECK(kv.pool.k[off] == live[b].tags[t]);
        KVTILE_FUZZ_CHECK(kv.pool.v[off] == live[b].tags[t]);
      }
    }
  }
  void check() {
    cache.check_invariants();
    const auto st = cache.stats();
    KVTILE_FUZZ_CHECK(st.free + st.used == st.capacity);
    KVTILE_FUZZ_CHECK(cache.blocks().num_sequences() == std::int64_t(live.size()));
    for (const auto& s : live) KVTILE_FUZZ_CHECK(cache.num_tokens(s.id) == std::int64_t(s.tags.size()));
  }
};

template <class Cache>
void drive(byte_reader& in) {
  memory::kv_shape shape{1, std::int32_t(in.range(0, 24)), std::int32_t(in.range(1, 8)), 1, 1};
  harness<Cache> h(shape);
  for (int steps = 0; steps < 400 && !in.empty(); ++steps) {
    const std::uint8_t op = in.u8() % 10;
    auto pick = [&]() -> std::size_t { return std::size_t(in.range(0, std::int64_t(h.live.size()) - 1)); };
    switch (op) {
      case 0: h.op_create(); break;
      case 1:
      case 2:
        if (!h.live.empty()) h.op_append(h.live[pick()], in.edgy(20));
        break;
      case 3:
        if (!h.live.empty()) h.op_fork(pick());
        break;
      case 4:
        if (!h.live.empty()) {
          auto& s = h.live[pick()];
          h.op_truncate(s, in.range(-1, std::int64_t(s.tags.size()) + 1));
        }
        break;
      case 5:
        if (!h.live.empty()) h.op_free(pick());
        break;
      case 6:
        if (!h.dead.empty()) h.op_stale(h.dead[std::size_t(in.range(0, std::int64_t(h.dead.size()) - 1))], in.u8());
        break;
      case 7: h.op_append_batch(in); break;
      case 8: h.op_step(); break;
      case 9: {
        // Move the whole cache out and back: the moved-from one is empty and refuses create().
        Cache other = std::move(h.cache);
        KVTILE_FUZZ_CHECK(h.cache.stats().capacity == 0);
        KVTILE_FUZZ_CHECK(h.cache.blocks().sequences().empty());
        h.cache.check_invariants();
        h.run(errc::invalid_argument, [&] { h.cache.create(); });
        h.cache = std::move(other);
        break;
      }
    }
    h.check();
  }
  h.op_step();
  h.check();
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  byte_reader in(data, size);
  switch (in.u8() % 3) {
    case 0: drive<paged_kv_cache<std::int32_t>>(in); break;
    case 1: drive<paged_kv_cache<std::int32_t>::with_allocator<memory::lowest_id_allocator>>(in); break;
    default: drive<paged_kv_cache<std::int32_t>::with_allocator<caching::prefix_caching_allocator<>>>(in);
  }
  return 0;
}
