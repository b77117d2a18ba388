#!/usr/bin/env bash
# README's first command: builds and runs kvtile's demo (serving a mix of requests through the
# paged KV cache, then real attention over it). Installs what a fresh machine lacks; uses the
# GPU when one is present (built for that GPU only), else builds without CUDA and runs the CPU
# backend. Progress goes to the terminal; the full logs stay in the build folder.
# Environment: KVTILE_DEMO_BUILD (build folder, default build-demo), KVTILE_CUDA_ARCHS (CUDA
# architectures, default the GPU's own), KVTILE_JOBS (parallel jobs, default all cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
build=${KVTILE_DEMO_BUILD:-build-demo}
mkdir -p "$build"
log=$build/demo-build.log
: >"$log"

cuda=(-DKVTILE_ENABLE_CUDA=OFF)
where="CPU (no GPU found)"
if cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1) && [ -n "$cap" ]; then
  arch=${cap/./}
  [ "$arch" = 90 ] && arch=90a  # the Hopper kernels need the arch-specific target
  cuda=(-DCMAKE_CUDA_ARCHITECTURES="${KVTILE_CUDA_ARCHS:-$arch}")
  where="GPU (compute capability $cap; CUDA architectures ${KVTILE_CUDA_ARCHS:-$arch})"
fi

start=$SECONDS
echo "[demo] configuring for the $where; log: $log"
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DKVTILE_BUILD_TESTS=OFF -DKVTILE_BUILD_BENCHMARKS=OFF \
  "${cuda[@]}" >>"$log" 2>&1 || { tail -n 40 "$log"; echo "[demo] configure failed; full log: $log"; exit 1; }

echo "[demo] building example_demo (a CUDA build compiles the decode kernels: a minute or two)"
cmake --build "$build" -j "${KVTILE_JOBS:-$(nproc)}" --target example_demo >>"$log" 2>&1 &
pid=$!
shown=0
while kill -0 "$pid" 2>/dev/null; do
  sleep 1
  # Build steps as they appear in the log, and a line every 10 s while one compiles.
  n=$(grep -c '^\[ *[0-9]*%\]' "$log" || true)
  if [ "$n" -gt "$shown" ]; then
    grep '^\[ *[0-9]*%\]' "$log" | sed -n "$((shown + 1)),${n}p" | sed 's/^/[demo]   /'
    shown=$n
  elif [ $(((SECONDS - start) % 10)) = 0 ]; then
    echo "[demo]   ... still compiling ($((SECONDS - start)) s)"
  fi
done
wait "$pid" || { tail -n 40 "$log"; echo "[demo] build failed; full log: $log"; exit 1; }
echo "[demo] built in $((SECONDS - start)) s; running"
echo
"$build/examples/example_demo" "$@"
