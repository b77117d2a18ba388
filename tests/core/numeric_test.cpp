#include <doctest/doctest.h>

#include <cmath>

#include "kvtile/core/error.hpp"
#include "kvtile/core/numeric.hpp"

using namespace kvtile;

TEST_CASE("half: every finite value round-trips, midpoints round to even") {
  for (unsigned b = 0; b < 65536; ++b) {
    const float f = half::to_float(std::uint16_t(b));
    if (std::isnan(f)) continue;
    REQUIRE(half::from_float(f) == b);
  }
  for (unsigned b = 0; b < 0x7bff; ++b) {
    const float lo = half::to_float(std::uint16_t(b)), hi = half::to_float(std::uint16_t(b + 1));
    const unsigned want = (b & 1u) ? b + 1 : b;
    REQUIRE(half::from_float(0.5f * (lo + hi)) == want);
  }
  CHECK(std::isinf(float(half(70000.f))));
  CHECK(std::isnan(float(half(NAN))));
  CHECK(float(half(1e-9f)) == 0.f);
}

TEST_CASE("bfloat16: round-trip, ties to even, NaN kept") {
  for (unsigned b = 0; b < 65536; ++b) {
    bfloat16 x;
    x.bits = std::uint16_t(b);
    const float f = float(x);
    if (std::isnan(f)) {
      CHECK(std::isnan(float(bfloat16(f))));
      continue;
    }
    REQUIRE(bfloat16::from_float(f) == b);
  }
  CHECK(bfloat16::from_float(1.0f + 1.0f / 256) == bfloat16::from_float(1.0f));  // tie -> even
  CHECK(float(bfloat16(3.0f)) == 3.0f);
}

TEST_CASE("errors carry their code and a message naming the value") {
  try {
    KVTILE_REQUIRE(1 + 1 == 3, errc::invalid_argument, "head_dim must be a multiple of 16, got ", 70);
    FAIL("no throw");
  } catch (const kvtile::error& e) {
    CHECK(e.code() == errc::invalid_argument);
    CHECK(std::string(e.what()).find("got 70") != std::string::npos);
  }
}
