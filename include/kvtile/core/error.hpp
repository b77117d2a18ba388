// kvtile/core/error.hpp: the one exception type, its codes, and the checking macros.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

#include "kvtile/core/config.hpp"

KVTILE_NAMESPACE_BEGIN

// What kind of mistake an error reports; callers branch on this, people read the message.
enum class errc {
  invalid_argument,  // a value the operation cannot accept (shape, length, tile, ...)
  out_of_blocks,     // the pool has fewer free blocks than the operation needs
  unknown_sequence,  // a sequence id that was never created or is already freed
  double_free,       // a block or sequence released twice
  out_of_range,      // an index (block, slot, page, token) outside its valid range
  unsupported,       // a configuration this build or device cannot run
  cuda,              // the CUDA runtime reported an error
  internal,          // an invariant of kvtile itself is broken (a bug)
};

constexpr std::string_view to_string(errc c) noexcept {
  switch (c) {
    case errc::invalid_argument: return "invalid argument";
    case errc::out_of_blocks: return "out of blocks";
    case errc::unknown_sequence: return "unknown sequence";
    case errc::double_free: return "double free";
    case errc::out_of_range: return "out of range";
    case errc::unsupported: return "unsupported";
    case errc::cuda: return "CUDA error";
    case errc::internal: return "internal error";
  }
  return "error";
}

// Every kvtile failure throws this. Operations that throw leave their object unchanged
// (strong guarantee) unless they say otherwise.
class error : public std::runtime_error {
 public:
  error(errc code, const std::string& what)
      : std::runtime_error("kvtile: " + std::string(to_string(code)) + ": " + what), code_(code) {}
  errc code() const noexcept { return code_; }

 private:
  errc code_;
};

namespace detail {
template <class... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}
template <class... Args>
[[noreturn]] void fail(errc code, Args&&... args) {
  throw error(code, concat(std::forward<Args>(args)...));
}
// Whether `check()` returns without throwing: a can_implement() made from a check().
template <class Check>
bool passes(Check&& check) noexcept {
  try {
    check();
    return true;
  } catch (...) {
    return false;
  }
}
}  // namespace detail

KVTILE_NAMESPACE_END

// KVTILE_REQUIRE(cond, code, message parts...): throw kvtile::error(code, message) when !cond.
// The message names the offending value, e.g. KVTILE_REQUIRE(n > 0, errc::invalid_argument,
// "n must be positive, got ", n). `code` may be written bare (errc::invalid_argument) or
// qualified (kvtile::errc::invalid_argument, ::kvtile::errc::...): the block-scope
// using-declaration makes the bare name resolve from any namespace, and leaves qualified names
// untouched.
#define KVTILE_REQUIRE(cond, code, ...)                                                           \
  do {                                                                                            \
    if (!(cond)) {                                                                                \
      using ::kvtile::errc;                                                                       \
      ::kvtile::detail::fail(code, __VA_ARGS__);                                                  \
    }                                                                                             \
  } while (0)

#define KVTILE_FAIL(code, ...)                                                                    \
  do {                                                                                            \
    using ::kvtile::errc;                                                                         \
    ::kvtile::detail::fail(code, __VA_ARGS__);                                                    \
  } while (0)
