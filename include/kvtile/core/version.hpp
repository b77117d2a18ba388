// kvtile/core/version.hpp: the version of the kvtile headers a program was compiled with,
// queryable at run time (a log line, a bug report, a check that two components agree).
//
//   kvtile::version()         -> {0, 1, 0}
//   kvtile::version_string    -> "0.1.0"
// The numbers come from core/config.hpp, which CMake's project() reads too: one source.
#pragma once

#include <string_view>

#include "kvtile/core/config.hpp"

KVTILE_NAMESPACE_BEGIN

struct version_info {
  int major, minor, patch;
  friend constexpr bool operator==(const version_info&, const version_info&) = default;
};

constexpr version_info version() noexcept {
  return {KVTILE_VERSION_MAJOR, KVTILE_VERSION_MINOR, KVTILE_VERSION_PATCH};
}

inline constexpr std::string_view version_string = KVTILE_STRINGIFY(KVTILE_VERSION_MAJOR) "." KVTILE_STRINGIFY(
    KVTILE_VERSION_MINOR) "." KVTILE_STRINGIFY(KVTILE_VERSION_PATCH);

KVTILE_NAMESPACE_END
