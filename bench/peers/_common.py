"""What the peer scripts share: the one-shape command line kvtile_bench passes, the work a
shape counts (as bench/include/kvtile/bench/registry.hpp counts it), timing, and output.

Without --len a peer script runs its own grid (scripts/gpu_bench.sh); with it, exactly the
shape kvtile_bench measured:
  --kernel prefill|decode|append --device cuda|cpu --dtype bf16|fp16|fp32 --batch B --len L
  --q-len Q --hq HQ --hkv HKV --d D --page P --causal 0|1 --layout nhd|hnd --shape-label S
L is the sequence length (prefill), the key length (decode) or the cached prefix (append; the
chunk of Q tokens comes on top). Rates are decimal: TFLOP/s and TB/s on the GPU, GFLOP/s and
GB/s on the CPU.
"""
import argparse
import json
import statistics
import sys
import time


def parse_args(kernel, argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", default=kernel, choices=["prefill", "decode", "append"])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--len", type=int, default=None, help="one shape (kvtile_bench); absent: the script's grid")
    ap.add_argument("--q-len", type=int, default=0)
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--causal", type=int, default=1)
    ap.add_argument("--layout", default="nhd", choices=["nhd", "hnd"])
    ap.add_argument("--shape-label", default=None)
    a = ap.parse_args(argv)
    if a.q_len == 0:
        a.q_len = {"prefill": a.len or 0, "decode": 1, "append": 512}[a.kernel]
    if a.kernel == "prefill" and a.len:
        a.q_len = a.len
    return a


def label(a):
    """The shape string kvtile_bench prints for this shape (registry.hpp, problem::label)."""
    if a.shape_label:
        return a.shape_label
    heads = f" hq={a.hq} hkv={a.hkv} d={a.d}"
    paged = f" page={a.page}" + (" hnd" if a.layout == "hnd" else "")
    if a.kernel == "prefill":
        gqa = f"/{a.hkv}" if a.hkv != a.hq else ""
        return f"{a.dtype} D{a.d} S{a.len} B{a.batch} H{a.hq}{gqa} {'causal' if a.causal else 'full'}"
    if a.kernel == "decode":
        return f"b={a.batch} l={a.len}" + (f" q={a.q_len}" if a.q_len > 1 else "") + heads + paged
    return f"prefix={a.len} chunk={a.q_len} b={a.batch}" + heads + paged + ("" if a.causal else " full")


def torch_dtype(name):
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def elem_bytes(name):
    return 4 if name == "fp32" else 2


def keys(a):
    return a.len + a.q_len if a.kernel == "append" else a.len


def flops(a):
    q, k = a.q_len, keys(a)
    if not a.causal:
        pairs = q * k
    elif a.kernel == "prefill":
        pairs = 0.5 * q * q
    else:
        pairs = q * (k - q) + q * (q + 1) / 2
    return 4.0 * a.d * a.hq * a.batch * pairs


def nbytes(a):
    return elem_bytes(a.dtype) * a.d * a.batch * (2.0 * keys(a) * a.hkv + 2.0 * a.q_len * a.hq)


def unit(a):
    by_bytes = a.kernel == "decode"
    if a.device == "cuda":
        return "TB/s" if by_bytes else "TFLOP/s"
    return "GB/s" if by_bytes else "GFLOP/s"


def rate(a, seconds):
    scale = 1e12 if a.device == "cuda" else 1e9
    return (nbytes(a) if a.kernel == "decode" else flops(a)) / seconds / scale


def median_seconds(fn, device="cuda", warmup=3, trials=30, reps=None):
    """Median seconds per call: CUDA events around `reps` calls on the GPU, the host clock on the CPU.
    fn(i) gets a running count (to rotate over copies of the inputs)."""
    k = 0
    for _ in range(warmup):
        fn(k)
        k += 1
    if device == "cpu":
        times = []
        for _ in range(max(3, trials // 3)):
            t0 = time.perf_counter()
            fn(k)
            k += 1
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    import torch
    torch.cuda.synchronize()
    if reps is None:  # about a millisecond per trial
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(k)
        b.record()
        b.synchronize()
        reps = int(min(50, max(1, 1.0 / max(a.elapsed_time(b), 1e-3))))
    times = []
    for _ in range(trials):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn(k)
            k += 1
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3 / reps)
    return statistics.median(times)


def emit(suite, shape, impl, unit_name, value):
    print(json.dumps({"suite": suite, "shape": shape, "impl": impl, "unit": unit_name, "value": round(value, 4)}),
          flush=True)


def skip(suite, shape, impl, why):
    """One JSON line saying why a peer did not run (kvtile_bench shows it; collect.py ignores it)."""
    print(json.dumps({"suite": suite, "shape": shape, "impl": impl, "skip": why, "value": None}), flush=True)


def warn(msg):
    print(msg, file=sys.stderr, flush=True)
