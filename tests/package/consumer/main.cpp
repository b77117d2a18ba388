// A user's program: include the umbrella header, instantiate a piece, use it, and check the
// error macro with a qualified code and the run-time version.
#include <kvtile/kvtile.hpp>

#include <cstdio>
#include <string>

int main() {
  kvtile::attention::softmax_state<1> s;
  s.init();
  const float base = s.enter_tile(1.f);
  s.l += kvtile::attention::exp2_approx(1.f - base);
  try {
    KVTILE_REQUIRE(s.lse() < 0.f, kvtile::errc::invalid_argument, "lse ", s.lse());
    return 1;
  } catch (const kvtile::error& e) {
    if (e.code() != kvtile::errc::invalid_argument) return 1;
  }
  if (kvtile::version_string != KVTILE_EXPECTED_VERSION) return 1;
  std::printf("kvtile %s consumer ok: lse %.3f\n", std::string(kvtile::version_string).c_str(), s.lse());
  return s.lse() > 0.f ? 0 : 1;
}
