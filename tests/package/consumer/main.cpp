// A user's program: include the umbrella header, instantiate a piece, use it.
#include <kvtile/kvtile.hpp>

#include <cstdio>

int main() {
  kvtile::attention::softmax_state<1> s;
  s.init();
  const float base = s.enter_tile(1.f);
  s.l += kvtile::attention::exp2_approx(1.f - base);
  std::printf("kvtile consumer ok: lse %.3f\n", s.lse());
  return s.lse() > 0.f ? 0 : 1;
}
