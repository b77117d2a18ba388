// kvtile/core/fast_divmod.hpp: division by a divisor that is fixed for a kernel's lifetime
// (a page size, a GQA group size) as one multiply-high, an add and a shift instead of the
// ~20-instruction integer division the compiler emits for a runtime divisor.
//
// With s = ceil(log2 d) and m = floor(2^32 (2^s - d) / d) + 1, the quotient of n in [0, 2^31)
// is (umulhi(n, m) + n) >> s: the round-up method of Granlund and Montgomery ("Division by
// invariant integers using multiplication", 1994), exact here because 2^s >= d.
#pragma once

#include <cstdint>

#include "kvtile/core/config.hpp"

KVTILE_NAMESPACE_BEGIN

class fast_divmod {
 public:
  KVTILE_HOST_DEVICE fast_divmod() : fast_divmod(1) {}
  // d >= 1.
  KVTILE_HOST_DEVICE explicit fast_divmod(std::int32_t d) : divisor_(d) {
    while ((std::int64_t(1) << shift_) < d) ++shift_;
    multiplier_ = std::uint32_t(((std::uint64_t(1) << 32) * ((std::uint64_t(1) << shift_) - std::uint64_t(d))) /
                                    std::uint64_t(d) + 1);
  }
  KVTILE_HOST_DEVICE KVTILE_FORCEINLINE std::int32_t divisor() const { return divisor_; }
  // n / d for n in [0, 2^31).
  KVTILE_HOST_DEVICE KVTILE_FORCEINLINE std::int32_t div(std::int32_t n) const {
    const std::uint32_t u = std::uint32_t(n);
#if defined(__CUDA_ARCH__)
    const std::uint32_t hi = __umulhi(u, multiplier_);
#else
    const std::uint32_t hi = std::uint32_t((std::uint64_t(u) * multiplier_) >> 32);
#endif
    return std::int32_t((hi + u) >> shift_);
  }
  // n % d, with the quotient.
  KVTILE_HOST_DEVICE KVTILE_FORCEINLINE std::int32_t mod(std::int32_t n, std::int32_t q) const { return n - q * divisor_; }
  KVTILE_HOST_DEVICE KVTILE_FORCEINLINE std::int32_t mod(std::int32_t n) const { return mod(n, div(n)); }

 private:
  std::int32_t divisor_ = 1;
  std::uint32_t multiplier_ = 0;
  std::int32_t shift_ = 0;
};

KVTILE_NAMESPACE_END
