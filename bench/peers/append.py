#!/usr/bin/env python3
"""Peers of kvtile's chunked-prefill (append) attention (suite "append"): PyTorch SDPA on
DENSE K/V with a bottom-right causal mask (torch.nn.attention.bias.causal_lower_right).

A 512-token chunk over a 4k / 16k cached prefix, batch 1, GQA 32 / 8, D = 128, bf16.
TFLOP/s counts 4 * D * visible (query, key) pairs per query head, as bench/decode_bench.cu.
With kvtile_bench's one-shape options (bench/peers/_common.py) it measures that shape instead,
on the GPU or the CPU.
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

HQ, HKV, D, CHUNK = 32, 8, 128, 512
BACKENDS = [("torch_flash", SDPBackend.FLASH_ATTENTION), ("torch_cudnn", SDPBackend.CUDNN_ATTENTION)]


def time_call(fn, reps=10, trials=30):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(trials):
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3 / reps)
    return statistics.median(times)


def one_shape(a):
    dev, dt = a.device, _common.torch_dtype(a.dtype)
    shape = _common.label(a)
    kv_len = a.len + a.q_len
    q = torch.randn(a.batch, a.hq, a.q_len, a.d, device=dev, dtype=dt)
    k = torch.randn(a.batch, a.hkv, kv_len, a.d, device=dev, dtype=dt)
    v = torch.randn(a.batch, a.hkv, kv_len, a.d, device=dev, dtype=dt)
    bias = causal_lower_right(a.q_len, kv_len) if a.causal else None
    backends = BACKENDS if dev == "cuda" else [("torch_cpu", None)]
    for impl, backend in backends:
        done = None
        for gqa in (True, False):  # expand K/V to every query head if a backend lacks GQA
            try:
                kk = k if gqa else k.repeat_interleave(a.hq // a.hkv, dim=1)
                vv = v if gqa else v.repeat_interleave(a.hq // a.hkv, dim=1)
                call = lambda i: F.scaled_dot_product_attention(q, kk, vv, attn_mask=bias, enable_gqa=gqa)  # noqa: E731
                if backend is None:
                    t = _common.median_seconds(call, dev)
                else:
                    with sdpa_kernel(backend):
                        t = _common.median_seconds(call, dev)
                _common.emit("append", shape, impl, _common.unit(a), _common.rate(a, t))
                done = True
                break
            except Exception as e:
                done = f"{type(e).__name__}: {e}"[:200]
        if done is not True:
            _common.skip("append", shape, impl, done)


def main():
    a = _common.parse_args("append")
    if a.len:
        return one_shape(a)
    dev = torch.device("cuda")
    for prefix in (4096, 16384):
        kv_len = prefix + CHUNK
        q = torch.randn(1, HQ, CHUNK, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, HKV, kv_len, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn(1, HKV, kv_len, D, device=dev, dtype=torch.bfloat16)
        bias = causal_lower_right(CHUNK, kv_len)
        flops = 4.0 * D * HQ * (CHUNK * prefix + CHUNK * (CHUNK + 1) / 2)
        shape = f"prefix={prefix} chunk={CHUNK} b=1 hq=32 hkv=8 d=128 page=16"
        for impl, backend in BACKENDS:
            for gqa in (True, False):  # expand K/V to every query head if a backend lacks GQA
                try:
                    kk = k if gqa else k.repeat_interleave(HQ // HKV, dim=1)
                    vv = v if gqa else v.repeat_interleave(HQ // HKV, dim=1)
                    with sdpa_kernel(backend):
                        t = time_call(lambda: F.scaled_dot_product_attention(q, kk, vv, attn_mask=bias, enable_gqa=gqa))
                    print(json.dumps({"suite": "append", "shape": shape, "impl": impl, "unit": "TFLOP/s",
                                      "value": flops / t / 1e12}), flush=True)
                    break
                except Exception as e:
                    print(f"append peer {impl} gqa={gqa} {shape}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
