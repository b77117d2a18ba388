#!/usr/bin/env bash
# Builds kvtile's libFuzzer targets (clang, AddressSanitizer + UBSan) and runs each for SECONDS
# (default 60), starting from the committed seed corpus and regression inputs. The growing corpus
# and any finding stay in the build folder, not in the tree (docs/hardening.md: turning a finding
# into a regression test).
#   bash scripts/fuzz.sh [SECONDS] [TARGET...]      targets: cache_ops page_tables plan
# KVTILE_FUZZ_BUILD: build folder (build-fuzz); KVTILE_FUZZ_JOBS: targets run at once (1).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(cache_ops page_tables plan)
build=${KVTILE_FUZZ_BUILD:-build-fuzz}

need=()
command -v clang++ >/dev/null || need+=(clang)
ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1 || need+=(libclang-rt-dev)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

CC=clang CXX=clang++ cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVTILE_ENABLE_CUDA=OFF \
  -DKVTILE_BUILD_TESTS=OFF -DKVTILE_BUILD_BENCHMARKS=OFF -DKVTILE_BUILD_EXAMPLES=OFF -DKVTILE_BUILD_FUZZERS=ON \
  >"$build.configure.log" 2>&1 || { cat "$build.configure.log"; exit 1; }
cmake --build "$build" -j "${KVTILE_JOBS:-$(nproc)}" --target "${targets[@]/#/fuzz.}"

# One target's run; its exit status goes to a file (the runs go in the background).
fuzz_one() {
  local t=$1 corpus="$build/corpus/$1"
  mkdir -p "$corpus" "$build/findings/$t"
  local rc=0
  "$build/fuzz/fuzz.$t" -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$build/findings/$t/" "$corpus" fuzz/corpus/"$t" fuzz/regressions/"$t" >"$build/fuzz.$t.log" 2>&1 || rc=$?
  echo "$rc" >"$build/fuzz.$t.rc"
}
running=0
for t in "${targets[@]}"; do
  fuzz_one "$t" &
  running=$((running + 1))
  if [ "$running" -ge "${KVTILE_FUZZ_JOBS:-1}" ]; then
    wait -n || true
    running=$((running - 1))
  fi
done
wait

status=0
for t in "${targets[@]}"; do
  corpus="$build/corpus/$t"
  log="$build/fuzz.$t.log"
  if [ "$(cat "$build/fuzz.$t.rc")" = 0 ]; then
    runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo '?')
    echo "fuzz.$t: ${seconds}s, $runs runs, corpus $(ls "$corpus" | wc -l) inputs, no finding"
  else
    echo "fuzz.$t: FINDING (input in $build/findings/$t/)"
    grep -E 'ERROR|runtime error|check failed' -A12 "$log" | head -40
    status=1
  fi
done
exit $status
