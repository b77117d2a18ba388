#!/usr/bin/env python3
"""Peers of kvtile's paged decode (suite "decode"): PyTorch SDPA on DENSE K/V, same shapes.

q_len = 1, GQA 32 query / 8 KV heads (enable_gqa), D = 128, bf16. Bytes counted as for
kvtile: every K/V byte plus queries and outputs (dense K/V has no page indices). Small
problems rotate over several K/V copies so repeated calls do not hit in L2. Prints one JSON
line per (shape, impl); shape strings match bench/decode_bench.cu (page=16 rows).
"""
import json
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HQ, HKV, D = 32, 8, 128
GRID = [(1, 4096), (1, 32768), (16, 4096), (64, 2048), (64, 8192), (128, 4096), (32, 32768)]
BACKENDS = [("torch_flash", SDPBackend.FLASH_ATTENTION), ("torch_cudnn", SDPBackend.CUDNN_ATTENTION)]


def time_call(fn, copies, reps=20, trials=30):
    for i in range(3):
        fn(i % copies)
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times, k = [], 0
    for _ in range(trials):
        a.record()
        for _ in range(reps):
            fn(k % copies)
            k += 1
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3 / reps)
    return statistics.median(times)


def main():
    dev = torch.device("cuda")
    for batch, length in GRID:
        kv_one = batch * length * HKV * D * 2 * 2
        copies = max(1, min(32, int(512e6 // kv_one)))
        q = torch.randn(batch, HQ, 1, D, device=dev, dtype=torch.bfloat16)
        ks = [torch.randn(batch, HKV, length, D, device=dev, dtype=torch.bfloat16) for _ in range(copies)]
        vs = [torch.randn(batch, HKV, length, D, device=dev, dtype=torch.bfloat16) for _ in range(copies)]
        nbytes = kv_one + 2 * batch * HQ * D * 2
        shape = f"b={batch} l={length} hq=32 hkv=8 d=128 page=16"
        for impl, backend in BACKENDS:
            try:
                with sdpa_kernel(backend):
                    t = time_call(lambda i: F.scaled_dot_product_attention(q, ks[i], vs[i], enable_gqa=True), copies)
                print(json.dumps({"suite": "decode", "shape": shape, "impl": impl, "unit": "TB/s",
                                  "value": nbytes / t / 1e12}), flush=True)
            except Exception as e:  # a backend that cannot run this shape is reported, not fatal
                print(f"decode peer {impl} {shape}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        del ks, vs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
