#!/usr/bin/env bash
# Builds a tiny consumer three ways against the kvtile tree in $1 (work folder $2):
# find_package after cmake --install, add_subdirectory, and FetchContent from a local path.
set -euo pipefail
src=$(cd "$1" && pwd)
work=$(mkdir -p "$2" && cd "$2" && pwd)
here=$src/tests/package
log=$work/package.log
: >"$log"
run() { "$@" >>"$log" 2>&1 || { cat "$log"; echo "package check failed: $*"; exit 1; }; }

# 1. install, then find_package
run cmake -S "$src" -B "$work/kvtile-build" -DKVTILE_BUILD_TESTS=OFF -DKVTILE_BUILD_BENCHMARKS=OFF \
  -DKVTILE_BUILD_EXAMPLES=OFF -DCMAKE_INSTALL_PREFIX="$work/prefix"
run cmake --install "$work/kvtile-build"
for mode in find_package add_subdirectory fetchcontent; do
  run cmake -S "$here/consumer" -B "$work/$mode" -DMODE=$mode -DKVTILE_SOURCE="$src" \
    -DCMAKE_PREFIX_PATH="$work/prefix"
  run cmake --build "$work/$mode" -j 2
  run "$work/$mode/consumer"
  echo "package: $mode ok"
done
