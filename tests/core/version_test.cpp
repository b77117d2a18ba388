// The version is queryable at run time and agrees with the CMake package version.
#include <doctest/doctest.h>

#include <string>

#include "kvtile/core/version.hpp"

TEST_CASE("version() and version_string agree with each other and with the CMake project") {
  constexpr kvtile::version_info v = kvtile::version();
  static_assert(v.major == KVTILE_VERSION_MAJOR && v.minor == KVTILE_VERSION_MINOR && v.patch == KVTILE_VERSION_PATCH);
  const std::string joined = std::to_string(v.major) + "." + std::to_string(v.minor) + "." + std::to_string(v.patch);
  CHECK(std::string(kvtile::version_string) == joined);
  // tests/CMakeLists.txt passes the version CMake's project() declared (read from config.hpp).
  CHECK(std::string(kvtile::version_string) == KVTILE_TEST_PROJECT_VERSION);
}
