// Shared helpers for kvtile's tests: fresh random inputs (the seed is printed on failure),
// error metrics, and poisoning.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kvtile/core/error.hpp"
#include "kvtile/core/numeric.hpp"

namespace kvtile_test {

// A generator with a fresh seed per call; the seed is attached to every failure message of the
// enclosing test case through doctest's INFO, so a failure can be replayed with KVTILE_TEST_SEED.
inline std::uint64_t fresh_seed() {
  if (const char* s = std::getenv("KVTILE_TEST_SEED")) return std::strtoull(s, nullptr, 10);
  static std::random_device rd;
  return (std::uint64_t(rd()) << 32) ^ rd();
}

template <class T>
std::vector<T> random_vector(std::size_t n, std::mt19937_64& rng, float lo = -1.f, float hi = 1.f) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<T> v(n);
  for (auto& x : v) x = kvtile::from_float<T>(dist(rng));
  return v;
}

// Runs f, which must throw a kvtile::error with `code` whose message contains `text` (callers
// check afterwards that nothing changed).
template <class F>
void expect_error(kvtile::errc code, const std::string& text, F&& f) {
  try {
    f();
    FAIL("expected a kvtile::error containing: " << text);
  } catch (const kvtile::error& e) {
    CHECK(e.code() == code);
    INFO("message: " << e.what());
    CHECK(std::string(e.what()).find(text) != std::string::npos);
  }
}

// A value that no correct kernel writes: NaN for floating types.
template <class T>
T poison() {
  return kvtile::from_float<T>(std::numeric_limits<float>::quiet_NaN());
}

struct error_stats {
  double max_abs = 0;
  double rel_l2 = 0;  // ||a - b|| / ||b||
  bool any_nan = false;
};

// Compare `got` (any storage type) with an fp64 reference.
template <class T>
error_stats compare(const std::vector<T>& got, const std::vector<double>& ref) {
  REQUIRE(got.size() == ref.size());
  error_stats s;
  double num = 0, den = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double g = kvtile::to_double(got[i]);
    if (std::isnan(g)) s.any_nan = true;
    const double d = std::abs(g - ref[i]);
    s.max_abs = std::max(s.max_abs, d);
    num += d * d;
    den += ref[i] * ref[i];
  }
  s.rel_l2 = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  return s;
}

}  // namespace kvtile_test
