// kvtile/core/checked.hpp: exact results, or an error naming the operands.
#include <doctest/doctest.h>

#include <cstdint>
#include <limits>
#include <string>

#include "kvtile/core/checked.hpp"

using namespace kvtile;

namespace {
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const kvtile::error& e) {
    CHECK(e.code() == errc::invalid_argument);
    return e.what();
  }
  FAIL("expected a kvtile::error");
  return {};
}
}  // namespace

TEST_CASE("checked_mul / checked_add: exact in range, an error naming the operands past it") {
  constexpr auto max64 = std::numeric_limits<std::int64_t>::max();
  CHECK(checked_mul(std::int64_t(65536) * 65536, std::int64_t(65536), "x") == std::int64_t(1) << 48);
  CHECK(checked_mul(std::int64_t(-3), std::int64_t(7), "x") == -21);
  CHECK(checked_add(max64 - 5, std::int64_t(5), "x") == max64);
  // 65536^4 wraps to 0 in 64 bits: the product a pool size check would otherwise accept.
  const std::int64_t a = std::int64_t(65536) * 65536 * 65536;
  const auto m = error_of([&] { checked_mul(a, std::int64_t(65536), "pool bytes"); });
  CHECK(m.find("pool bytes: 281474976710656 * 65536 overflows") != std::string::npos);
  const auto s = error_of([&] { checked_add(max64, std::int64_t(1), "tokens"); });
  CHECK(s.find("tokens: 9223372036854775807 + 1 overflows") != std::string::npos);
  CHECK(error_of([] { checked_mul(std::int32_t(1) << 16, std::int32_t(1) << 15, "i32"); }).find("65536 * 32768") !=
        std::string::npos);
  CHECK(error_of([] { checked_add(std::uint32_t(0xffffffffu), std::uint32_t(1), "u32"); }).find("4294967295 + 1") !=
        std::string::npos);
}

TEST_CASE("checked_cast refuses what does not fit; ceil_div_nonneg does not overflow near the maximum") {
  CHECK(checked_cast<std::int32_t>(std::int64_t(2147483647), "x") == 2147483647);
  CHECK(error_of([] { checked_cast<std::int32_t>(std::int64_t(1) << 31, "head_bytes"); }).find("head_bytes: 2147483648") !=
        std::string::npos);
  CHECK(error_of([] { checked_cast<std::size_t>(std::int64_t(-1), "bytes"); }).find("bytes: -1") != std::string::npos);
  constexpr auto max64 = std::numeric_limits<std::int64_t>::max();
  CHECK(ceil_div_nonneg(max64, std::int64_t(16)) == max64 / 16 + 1);
  CHECK(ceil_div_nonneg(std::int64_t(0), std::int64_t(16)) == 0);
  CHECK(ceil_div_nonneg(std::int64_t(32), std::int64_t(16)) == 2);
  CHECK(ceil_div_nonneg(std::int64_t(33), std::int64_t(16)) == 3);
  constexpr auto max32 = std::numeric_limits<std::int32_t>::max();
  CHECK(ceil_div_nonneg(max32, max32) == 1);
  CHECK(ceil_div_nonneg(max32, std::int32_t(2)) == (std::int32_t(1) << 30));
}
