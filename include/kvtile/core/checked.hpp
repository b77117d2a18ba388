// kvtile/core/checked.hpp: size arithmetic that cannot overflow unnoticed.
//
// Sizes, offsets and counts computed from user input (a model shape from a config file, a
// token count from a request) are multiplied and added with these: the result is exact, or a
// kvtile::error names the operands and what was being computed, before anything is allocated
// or written. A wrapped product would otherwise pass every later check (65536^4 is 0 in 64 bits).
//
//   checked_mul(a, b, "pool elements")      a * b in T, or errc::invalid_argument
//   checked_add(a, b, "tokens")             a + b in T, or errc::invalid_argument
//   checked_cast<To>(x, "head_bytes")       x as To when it fits, or errc::invalid_argument
//   ceil_div_nonneg(a, b)                   ceil(a / b) for a >= 0, b > 0, with no a + b - 1
#pragma once

#include <concepts>
#include <type_traits>
#include <utility>

#include "kvtile/core/error.hpp"

KVTILE_NAMESPACE_BEGIN

template <std::integral T>
constexpr T checked_mul(T a, T b, const char* what) {
  T r{};
  if (__builtin_mul_overflow(a, b, &r)) KVTILE_FAIL(errc::invalid_argument, what, ": ", +a, " * ", +b, " overflows");
  return r;
}

template <std::integral T>
constexpr T checked_add(T a, T b, const char* what) {
  T r{};
  if (__builtin_add_overflow(a, b, &r)) KVTILE_FAIL(errc::invalid_argument, what, ": ", +a, " + ", +b, " overflows");
  return r;
}

template <std::integral To, std::integral From>
constexpr To checked_cast(From x, const char* what) {
  KVTILE_REQUIRE(std::in_range<To>(x), errc::invalid_argument, what, ": ", +x, " does not fit its type");
  return To(x);
}

// ceil(a / b) without forming a + b - 1 (which overflows near the type's maximum).
template <std::integral T>
constexpr T ceil_div_nonneg(T a, T b) {
  return a / b + (a % b != 0 ? 1 : 0);
}

KVTILE_NAMESPACE_END
