#!/usr/bin/env python3
"""Peers of kvtile's paged decode (suite "decode"): PyTorch SDPA on DENSE K/V, same shapes.

q_len = 1, GQA 32 query / 8 KV heads (enable_gqa), D = 128, bf16. Bytes counted as for
kvtile: every K/V byte plus queries and outputs (dense K/V has no page indices). Small
problems rotate over several K/V copies so repeated calls do not hit in L2. Prints one JSON
line per (shape, impl); shape strings match bench/decode_bench.cu (page=16 rows).
With kvtile_bench's one-shape options (bench/peers/_common.py) it measures that shape instead
(any heads, head dim, 1..8 query tokens with the bottom-right causal mask), on the GPU or the CPU.
"""
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

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


def one_shape(a):
    """kvtile_bench's shape on dense K/V, rotating over copies so repeated calls read memory."""
    dev, dt = a.device, _common.torch_dtype(a.dtype)
    shape = _common.label(a)
    kv_one = 2 * a.batch * a.len * a.hkv * a.d * _common.elem_bytes(a.dtype)
    copies = max(1, min(32, int(512e6 // kv_one))) if dev == "cuda" else 1
    q = torch.randn(a.batch, a.hq, a.q_len, a.d, device=dev, dtype=dt)
    ks = [torch.randn(a.batch, a.hkv, a.len, a.d, device=dev, dtype=dt) for _ in range(copies)]
    vs = [torch.randn(a.batch, a.hkv, a.len, a.d, device=dev, dtype=dt) for _ in range(copies)]
    mask = causal_lower_right(a.q_len, a.len) if a.q_len > 1 and a.causal else None
    backends = BACKENDS if dev == "cuda" else [("torch_cpu", None)]
    for impl, backend in backends:
        try:
            call = lambda i: F.scaled_dot_product_attention(q, ks[i % copies], vs[i % copies], attn_mask=mask,  # noqa: E731
                                                            enable_gqa=a.hq != a.hkv)
            if backend is None:
                t = _common.median_seconds(call, dev)
            else:
                with sdpa_kernel(backend):
                    t = _common.median_seconds(call, dev)
            _common.emit("decode", shape, impl, _common.unit(a), _common.rate(a, t))
        except Exception as e:
            _common.skip("decode", shape, impl, f"{type(e).__name__}: {e}"[:200])


def main():
    a = _common.parse_args("decode")
    if a.len:
        return one_shape(a)
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
