#!/usr/bin/env bash
# Runs on a GPU machine, over binaries gathered by scripts/build_gpu.sh: every GPU test (and
# compute-sanitizer memcheck on them), every GPU benchmark (JSON), and every peer script in
# bench/peers/ (PyTorch; FlashInfer). Raw outputs go to $OUT/raw.tar.gz; bench/collect.py turns them into
# bench/results/<card>.json (copied to the output folder with docs/results.md). A short table
# is printed last.
# usage: scripts/gpu_bench.sh [bin=gpu-bin] [out=$OUT]
# Narrow a run with regular expressions on names: KVTILE_SANITIZE_ONLY (test binaries run under
# the sanitizers; KVTILE_SANITIZE=0 for none), KVTILE_BENCH_ONLY, KVTILE_PEER_ONLY; and
# KVTILE_BENCH_FILTER, a Google Benchmark --benchmark_filter passed to every benchmark binary.
set -uo pipefail
cd "$(dirname "$0")/.."
bin=$(cd "${1:-gpu-bin}" && pwd)
out=${2:-${OUT:-/tmp/kvtile-out}}
raw=$out/raw
mkdir -p "$raw"
export LD_LIBRARY_PATH=$bin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
echo "card: $card" | tee "$raw/card.txt"
summary=()

# Test cases run under compute-sanitizer (memcheck; racecheck too for shared-memory kernels):
# a representative subset per binary, since the sanitizers slow kernels down many times.
sanitize_cases() {
  case "$1" in
    *prefill*|*backward*) echo '-tc=*sanitizer*' ;;
    *decode_test) echo '-tc=*split*,*graph*,*window*,*few CTAs*' ;;
    *append_test) echo '-tc=*window*,*fp16 D=64*' ;;
    *) echo '' ;;
  esac
}
for t in "$bin"/test.*; do
  [ -x "$t" ] || continue
  name=$(basename "$t")
  if "$t" >"$raw/$name.log" 2>&1; then s=pass; else s="FAIL($?)"; fi
  m=-; r=-
  if [ "${KVTILE_SANITIZE:-1}" = 1 ] && [[ "$name" =~ ${KVTILE_SANITIZE_ONLY:-.} ]]; then
    cases=$(sanitize_cases "$name")
    if compute-sanitizer --tool memcheck --error-exitcode 9 "$t" $cases >"$raw/$name.memcheck.log" 2>&1; then m=clean; else m=ERRORS; fi
    if [[ "$name" == *prefill* || "$name" == *append* || "$name" == *decode* || "$name" == *backward* ]]; then
      if compute-sanitizer --tool racecheck --error-exitcode 9 "$t" $cases >"$raw/$name.racecheck.log" 2>&1; then r=clean; else r=ERRORS; fi
    fi
  fi
  summary+=("$(printf '%-40s %-10s memcheck %-7s racecheck %s' "$name" "$s" "$m" "$r")")
done

for e in "$bin"/example_*; do
  [ -x "$e" ] || continue
  name=$(basename "$e")
  if "$e" >"$raw/$name.log" 2>&1; then s=pass; else s="FAIL($?)"; fi
  summary+=("$(printf '%-40s %s' "$name" "$s")")
done

for b in "$bin"/*_bench; do
  [ -x "$b" ] || continue
  name=$(basename "$b")
  [ "$name" = kvtile_bench ] && continue  # the CLI: run below on its own shapes
  [[ "$name" =~ ${KVTILE_BENCH_ONLY:-.} ]] || continue
  "$b" --benchmark_format=json --benchmark_out="$raw/$name.json" --benchmark_out_format=json \
    --benchmark_min_time=0.2 --benchmark_filter="${KVTILE_BENCH_FILTER:-.}" >"$raw/$name.log" 2>&1
  summary+=("$(printf '%-40s rc=%s' "$name" "$?")")
done

# FlashInfer (bench/peers/flashinfer.py) comes from its wheels in carry/flashinfer/ (a copy of
# ../shared/peers/flashinfer), unless KVTILE_FLASHINFER_DIR names another folder.
if [ -z "${KVTILE_FLASHINFER_DIR:-}" ] && [ -d carry/flashinfer ]; then
  export KVTILE_FLASHINFER_DIR=$PWD/carry/flashinfer
fi
for p in bench/peers/*.py; do
  [ -f "$p" ] || continue
  name=$(basename "$p" .py)
  [[ "$name" == _* ]] && continue  # shared helpers, not peers
  [[ "$name" =~ ${KVTILE_PEER_ONLY:-.} ]] || continue
  python3 "$p" >"$raw/peer_$name.jsonl" 2>"$raw/peer_$name.log"
  summary+=("$(printf '%-40s rc=%s' "peer $name" "$?")")
done

# The configuration CLI, with every peer on the same shapes (KVTILE_CLI=0: skip): its tables
# go to raw/kvtile_bench_<kernel>.log, its Google Benchmark JSON to raw/cli_<kernel>.json.
if [ "${KVTILE_CLI:-1}" = 1 ] && [ -x "$bin/kvtile_bench" ]; then
  export KVTILE_PEERS_DIR=$PWD/bench/peers
  for spec in "decode --shape 1x4096,16x4096,64x2048 --heads 32/8 --page 16" \
              "append --shape 1x4096,1x16384 --q-len 512 --heads 32/8 --page 16" \
              "prefill --shape 8x2048,1x16384 --heads 16/16 --mask causal"; do
    kernel=${spec%% *}
    "$bin/kvtile_bench" --device cuda --kernel $spec --benchmark_out="$raw/cli_$kernel.json" \
      >"$raw/kvtile_bench_$kernel.log" 2>&1
    summary+=("$(printf '%-40s rc=%s' "kvtile_bench $kernel" "$?")")
  done
fi

# The per-card results file and its rendered table, from this run's measurements.
if python3 bench/collect.py --card "$card" "$raw"/*_bench.json "$raw"/peer_*.jsonl 2>"$raw/collect.log"; then
  cp bench/results/"$(python3 -c 'import re,sys; print(re.sub(r"[^A-Za-z0-9]+","-",sys.argv[1]).strip("-").lower())' "$card")".json "$out"/
  cp docs/results.md "$out"/
fi
tar -C "$out" -czf "$out/raw.tar.gz" raw && rm -rf "$raw"
printf '%s\n' "${summary[@]}"
