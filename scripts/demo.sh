#!/usr/bin/env bash
# README's first command: builds and runs kvtile's demo (serving a mix of requests through the
# paged KV cache). Installs what a fresh machine lacks; uses the GPU when one is present.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
build=${KVTILE_DEMO_BUILD:-build-demo}
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DKVTILE_BUILD_TESTS=OFF -DKVTILE_BUILD_BENCHMARKS=OFF \
  -DCMAKE_CUDA_ARCHITECTURES="${KVTILE_CUDA_ARCHS:-80;90a}" >"$build.log" 2>&1 || { cat "$build.log"; exit 1; }
cmake --build "$build" -j "$(nproc)" --target example_demo >>"$build.log" 2>&1 || { cat "$build.log"; exit 1; }
"$build/examples/example_demo" "$@"
