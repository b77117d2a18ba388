// KVTILE_REQUIRE / KVTILE_FAIL from user code: bare and qualified error codes, and the message.
#include <doctest/doctest.h>

#include <string>

#include "kvtile/core/error.hpp"

namespace user_code {  // outside kvtile: no using-directive, as in a user's program

kvtile::errc code_of(int which) {
  try {
    if (which == 0) KVTILE_REQUIRE(false, kvtile::errc::out_of_range, "index ", 7, " out of range");
    if (which == 1) KVTILE_REQUIRE(false, ::kvtile::errc::unsupported, "head dim ", 96);
    if (which == 2) KVTILE_REQUIRE(false, errc::double_free, "block ", 3);  // bare: still accepted
    KVTILE_FAIL(kvtile::errc::internal, "reached ", which);
  } catch (const kvtile::error& e) {
    return e.code();
  }
}

}  // namespace user_code

TEST_CASE("KVTILE_REQUIRE accepts bare and qualified error codes") {
  CHECK(user_code::code_of(0) == kvtile::errc::out_of_range);
  CHECK(user_code::code_of(1) == kvtile::errc::unsupported);
  CHECK(user_code::code_of(2) == kvtile::errc::double_free);
  CHECK(user_code::code_of(3) == kvtile::errc::internal);
}

TEST_CASE("a passing KVTILE_REQUIRE evaluates its condition once and throws nothing") {
  int evaluated = 0;
  CHECK_NOTHROW(KVTILE_REQUIRE(++evaluated == 1, kvtile::errc::invalid_argument, "never"));
  CHECK(evaluated == 1);
}

TEST_CASE("the message names the code and the value") {
  try {
    KVTILE_REQUIRE(2 < 1, kvtile::errc::unsupported, "head dim ", 96, " is not compiled in");
    FAIL("no throw");
  } catch (const kvtile::error& e) {
    CHECK(std::string(e.what()) == "kvtile: unsupported: head dim 96 is not compiled in");
  }
}
