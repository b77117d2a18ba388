#!/usr/bin/env bash
# Builds a tiny consumer three ways against the kvtile tree in $1 (work folder $2):
# find_package after cmake --install, add_subdirectory, and FetchContent from a local path.
# The two subproject modes also check that a CXX-only parent gets no CUDA (language, cudart)
# and no kvtile install rules, and a parent that enables CUDA gets kvtile's CUDA requirements.
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
version=$(sed -n 's/^set(PACKAGE_VERSION "\(.*\)")$/\1/p' "$(find "$work/prefix" -name kvtileConfigVersion.cmake)")
[ -n "$version" ] || { echo "package check failed: no PACKAGE_VERSION in the installed kvtileConfigVersion.cmake"; exit 1; }
for mode in find_package add_subdirectory fetchcontent; do
  run cmake -S "$here/consumer" -B "$work/$mode" -DMODE=$mode -DKVTILE_SOURCE="$src" -DEXPECTED_VERSION="$version" \
    -DCMAKE_PREFIX_PATH="$work/prefix"
  run cmake --build "$work/$mode" -j 2
  run "$work/$mode/consumer"
  if [ "$mode" != find_package ]; then
    # The subproject case: a CXX-only parent links no CUDA runtime and installs no kvtile files.
    if grep -rqs cudart "$work/$mode/CMakeFiles/consumer.dir/link.txt"; then
      echo "package check failed: $mode: cudart on a CXX-only parent's link line"; exit 1
    fi
    run cmake --install "$work/$mode" --prefix "$work/$mode-prefix"
    if [ -n "$(find "$work/$mode-prefix" -path '*kvtile*' -print -quit)" ]; then
      echo "package check failed: $mode: a subproject kvtile installed its files"; exit 1
    fi
  fi
  echo "package: $mode ok"
done

# 2. a parent that enables CUDA itself: kvtile as a subproject follows it (when nvcc is here)
if command -v nvcc >/dev/null; then
  run cmake -S "$here/consumer" -B "$work/parent_cuda" -DMODE=add_subdirectory -DPARENT_CUDA=ON \
    -DKVTILE_SOURCE="$src" -DEXPECTED_VERSION="$version" -DCMAKE_CUDA_ARCHITECTURES=80
  run cmake --build "$work/parent_cuda" -j 2
  run "$work/parent_cuda/consumer"
  echo "package: add_subdirectory under a CUDA parent ok"
fi
