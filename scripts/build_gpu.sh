#!/usr/bin/env bash
# Builds every GPU test, benchmark and example for one architecture (default sm_90a) and gathers
# the binaries, with Google Benchmark's shared library, into one folder that can be copied to a
# GPU machine and run there by scripts/gpu_bench.sh.
# usage: scripts/build_gpu.sh [arch=90a] [out=gpu-bin]
set -euo pipefail
cd "$(dirname "$0")/.."
arch=${1:-90a}
out=${2:-gpu-bin}
build=build-gpu-$arch
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$arch" >/dev/null
# GPU targets only: tests and benchmarks built from .cu sources, CUDA examples and the demo.
targets=""
for f in $(find tests -name '*_test.cu'); do
  rel=${f#tests/}; rel=${rel%.cu}; targets+=" test.${rel//\//.}"
done
for f in bench/*_bench.cu; do n=$(basename "$f" .cu); targets+=" $n"; done
targets+=" kvtile_bench"  # the configuration CLI (bench/cli), with its CUDA configurations
for f in examples/*.cu; do n=$(basename "$f" .cu); targets+=" example_$n"; done
targets+=" example_demo"
cmake --build "$build" -j "${KVTILE_JOBS:-2}" --target $targets
rm -rf "$out" && mkdir -p "$out"
for t in $targets; do
  f=$(find "$build" -type f -name "$t" -perm -u+x | head -n 1)
  [ -n "$f" ] && cp "$f" "$out/"
done
lib=$(ldconfig -p | sed -n 's/.*libbenchmark.so.1debian.*=> \(.*\)/\1/p' | head -n 1)
[ -n "$lib" ] && cp "$lib" "$out/"
du -sh "$out"
