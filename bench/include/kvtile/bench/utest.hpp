// kvtile/bench/utest.hpp: the Mann-Whitney U test that kvtile_bench's A/B mode reports.
//
// Two-sided, normal approximation with the tie correction and a continuity correction (what
// scipy.stats.mannwhitneyu(method="asymptotic") and Google Benchmark's compare.py compute).
// Below about 9 samples per side the approximation is rough and a p-value under 0.05 is hard
// to reach at all; kvtile_bench says so next to the result.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

#include "kvtile/core/config.hpp"

KVTILE_NAMESPACE_BEGIN
namespace bench {

struct u_test_result {
  double u = 0;  // U of the first sample
  double z = 0;
  double p = 1;  // two-sided
};

inline u_test_result mann_whitney_u(const std::vector<double>& a, const std::vector<double>& b) {
  const double n1 = double(a.size()), n2 = double(b.size()), n = n1 + n2;
  u_test_result r;
  if (a.empty() || b.empty()) return r;
  std::vector<std::pair<double, int>> all;
  for (double x : a) all.push_back({x, 0});
  for (double x : b) all.push_back({x, 1});
  std::sort(all.begin(), all.end(), [](const auto& l, const auto& r) { return l.first < r.first; });
  double rank_a = 0, ties = 0;
  for (std::size_t i = 0; i < all.size();) {
    std::size_t j = i;
    while (j < all.size() && all[j].first == all[i].first) ++j;
    const double t = double(j - i), avg = (double(i) + double(j) + 1) / 2;  // ranks are 1-based
    ties += t * t * t - t;
    for (std::size_t k = i; k < j; ++k)
      if (all[k].second == 0) rank_a += avg;
    i = j;
  }
  r.u = rank_a - n1 * (n1 + 1) / 2;
  const double mu = n1 * n2 / 2;
  const double var = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1)));
  if (var <= 0) return r;  // every value equal: no evidence either way
  const double d = r.u - mu;
  r.z = (d - (d > 0 ? 0.5 : d < 0 ? -0.5 : 0.0)) / std::sqrt(var);
  r.p = std::min(1.0, std::erfc(std::abs(r.z) / std::sqrt(2.0)));
  return r;
}

}  // namespace bench
KVTILE_NAMESPACE_END
