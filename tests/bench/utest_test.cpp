// The Mann-Whitney U test of kvtile_bench's A/B mode (bench/include/kvtile/bench/utest.hpp),
// against values worked by hand from the textbook formulas (scipy's asymptotic method agrees).
#include <doctest/doctest.h>

#include <vector>

#include "kvtile/bench/utest.hpp"

using kvtile::bench::mann_whitney_u;

TEST_CASE("separated samples: U = 0 and the normal approximation's p") {
  // n1 = n2 = 5: mu = 12.5, sigma = sqrt(25 * 11 / 12) = 4.7871, z = (0 - 12.5 + 0.5) / sigma.
  const auto r = mann_whitney_u({1, 2, 3, 4, 5}, {6, 7, 8, 9, 10});
  CHECK(r.u == 0);
  CHECK(r.z == doctest::Approx(-2.50672).epsilon(1e-4));
  CHECK(r.p == doctest::Approx(0.012186).epsilon(1e-3));
  // The test is symmetric: swapping the samples gives U = n1 n2 and the same p.
  const auto s = mann_whitney_u({6, 7, 8, 9, 10}, {1, 2, 3, 4, 5});
  CHECK(s.u == 25);
  CHECK(s.p == doctest::Approx(r.p));
}

TEST_CASE("ties get average ranks and shrink the variance") {
  // Ranks of {1, 2, 2 | 2, 3, 4}: 1, 3, 3 | 3, 5, 6 -> R1 = 7, U = 1; ties: one triple (t^3 - t = 24),
  // var = 9/12 * (7 - 24 / 30) = 4.65, z = (1 - 4.5 + 0.5) / sqrt(4.65).
  const auto r = mann_whitney_u({1, 2, 2}, {2, 3, 4});
  CHECK(r.u == 1);
  CHECK(r.z == doctest::Approx(-3.0 / 2.156386).epsilon(1e-4));
}

TEST_CASE("identical samples: no evidence of a difference") {
  const auto r = mann_whitney_u({5, 5, 5}, {5, 5, 5});
  CHECK(r.p == 1.0);
  const auto m = mann_whitney_u({1, 2, 3, 4}, {1, 2, 3, 4});
  CHECK(m.p == doctest::Approx(1.0));
}
