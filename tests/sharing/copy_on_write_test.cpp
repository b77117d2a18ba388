#include <doctest/doctest.h>

#include <vector>

#include "kvtile/sharing/copy_on_write.hpp"
#include "kvtile/sharing/sharing_policy.hpp"

using namespace kvtile;
using namespace kvtile::sharing;

TEST_CASE("copy_on_write: counts, sharing, and when a block goes back") {
  copy_on_write s;
  s.reset(8);
  std::vector<block_id> freed;
  auto to_pool = [&](block_id b) { freed.push_back(b); };
  s.on_allocate(3);
  CHECK(s.refcount(3) == 1);
  CHECK_FALSE(s.is_shared(3));
  s.share(3);
  s.share(3);
  CHECK(s.refcount(3) == 3);
  CHECK(s.is_shared(3));
  s.release(3, to_pool);
  s.release(3, to_pool);
  CHECK(freed.empty());
  s.release(3, to_pool);
  CHECK(freed == std::vector<block_id>{3});
}

TEST_CASE("copy_on_write: a pending copy pins its source; a freed destination cancels its copy") {
  copy_on_write s;
  s.reset(8);
  std::vector<block_id> freed;
  auto to_pool = [&](block_id b) { freed.push_back(b); };
  // Block 1 shared by two tables; one of them moves to block 5 (copy 1 -> 5, 3 tokens).
  s.on_allocate(1);
  s.share(1);
  s.on_allocate(5);
  s.record_copy(1, 5, 3);
  CHECK(s.refcount(1) == 1);
  CHECK(s.pins(1) == 1);
  REQUIRE(s.pending().size() == 1);
  CHECK(s.pending()[0] == block_copy{1, 5, 3});
  // The other table drops block 1: it must stay allocated until the copy ran.
  s.release(1, to_pool);
  CHECK(freed.empty());
  s.finish_pending(to_pool);
  CHECK(freed == std::vector<block_id>{1});
  CHECK(s.pending().empty());

  // Now a destination released before its copy ran: the copy disappears, its pinned source
  // (no holders left) goes back too.
  freed.clear();
  s.on_allocate(2);
  s.share(2);
  s.on_allocate(6);
  s.record_copy(2, 6, 1);
  s.on_allocate(4);
  s.share(4);
  s.on_allocate(7);
  s.record_copy(4, 7, 2);
  s.release(2, to_pool);  // last holder of 2; pinned by copy 2 -> 6
  CHECK(freed.empty());
  s.release(6, to_pool);  // cancels 2 -> 6, frees 2 and 6
  CHECK(freed == std::vector<block_id>{2, 6});
  REQUIRE(s.pending().size() == 1);
  CHECK(s.pending()[0] == block_copy{4, 7, 2});
  CHECK(s.pins(2) == 0);
  freed.clear();
  s.finish_pending(to_pool);
  CHECK(freed.empty());  // block 4 still held by one table
  CHECK(s.refcount(4) == 1);
}

TEST_CASE("no_sharing costs nothing and always frees") {
  static_assert(std::is_empty_v<no_sharing>);
  no_sharing s;
  std::vector<block_id> freed;
  s.release(4, [&](block_id b) { freed.push_back(b); });
  CHECK(freed == std::vector<block_id>{4});
  CHECK_FALSE(s.is_shared(4));
  CHECK(s.pending().empty());
}

TEST_CASE("copy_on_write: copies are independent, a moved-from policy holds nothing") {
  copy_on_write a;
  a.reset(4);
  a.on_allocate(0);
  a.share(0);
  a.on_allocate(1);
  a.record_copy(0, 1, 3);
  copy_on_write c(a);
  std::vector<block_id> freed;
  c.finish_pending([&](block_id b) { freed.push_back(b); });
  CHECK(c.pending().empty());
  CHECK(a.pending().size() == 1);  // the original's copy is still pending
  CHECK(a.pins(0) == 1);
  CHECK(c.pins(0) == 0);
  // The copy can record as many copies as it has blocks without reallocating.
  c.on_allocate(2);
  c.on_allocate(3);
  c.share(2);
  c.record_copy(2, 3, 1);
  CHECK(c.pending().size() == 1);

  copy_on_write m(std::move(a));
  CHECK(m.pending().size() == 1);
  CHECK(m.refcount(0) == 1);
  CHECK(a.pending().empty());
  CHECK(!a.has_pending());
  a.reset(2);  // usable again
  a.on_allocate(1);
  CHECK(a.refcount(1) == 1);
  a = std::move(m);
  CHECK(a.pending().size() == 1);
  CHECK(m.pending().empty());
}
