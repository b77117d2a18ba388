// kvtile/core/fast_divmod.hpp against plain division: every divisor up to 4096 and some large
// ones, numerators at the edges (0, multiples +-1, 2^31 - 1) and at random.
#include <doctest/doctest.h>

#include <cstdint>
#include <random>

#include "kvtile/core/fast_divmod.hpp"
#include "support/test_util.hpp"

TEST_CASE("fast_divmod: equals / and % for divisors 1..4096 and large ones, numerators up to 2^31 - 1") {
  const auto seed = kvtile_test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<std::int32_t> any(0, INT32_MAX);
  auto check = [&](std::int32_t d) {
    const kvtile::fast_divmod f(d);
    CHECK(f.divisor() == d);
    auto one = [&](std::int32_t n) {
      const std::int32_t q = f.div(n);
      if (q != n / d || f.mod(n, q) != n % d || f.mod(n) != n % d) {
        INFO("d " << d << " n " << n << " got " << q);
        CHECK(q == n / d);
        CHECK(f.mod(n) == n % d);
      }
    };
    const std::int64_t dd = d;
    for (std::int64_t n : {std::int64_t(0), std::int64_t(1), dd - 1, dd, dd + 1, 2 * dd - 1, 2 * dd, std::int64_t(INT32_MAX),
                           std::int64_t(INT32_MAX) - 1, std::int64_t(INT32_MAX) - dd})
      if (n >= 0 && n <= INT32_MAX) one(std::int32_t(n));
    for (std::int64_t m = INT32_MAX / d - 2; m <= INT32_MAX / d; ++m)
      for (std::int64_t e = -1; e <= 1; ++e) {
        const std::int64_t n = m * d + e;
        if (n >= 0 && n <= INT32_MAX) one(std::int32_t(n));
      }
    for (int i = 0; i < 200; ++i) one(any(rng));
    for (std::int32_t n = 0; n < 3 * dd && n < 5000; ++n) one(n);  // 3 * d in 64 bits: d may be near 2^31
  };
  for (std::int32_t d = 1; d <= 4096; ++d) check(d);
  for (std::int32_t d : {4097, 65535, 65536, 65537, 1 << 20, (1 << 30) - 1, 1 << 30, (1 << 30) + 1, INT32_MAX - 1, INT32_MAX})
    check(d);
}
