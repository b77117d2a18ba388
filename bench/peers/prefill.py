#!/usr/bin/env python3
"""Peers of bench/prefill_bench.cu: PyTorch SDPA's flash (FlashAttention-2) and cuDNN backends
on the same grid (bf16, D 64 and 128, S 512..16384, causal and not, 16k tokens per batch,
hidden 2048 so heads = 2048 / D). FLOPs are counted as in the C++ benchmark:
4 * B * H * S * S * D, halved for causal. Time: median of CUDA-event-timed runs after warm-up.
Prints one JSON line per (shape, impl) in the results protocol of bench/README.md.
With kvtile_bench's one-shape options (bench/peers/_common.py) it measures that shape instead,
GQA included, on the GPU or (--device cpu, PyTorch's CPU SDPA) on the CPU."""
import json
import os
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

TOKENS, HIDDEN = 16384, 2048
BACKENDS = {"torch_flash": SDPBackend.FLASH_ATTENTION, "torch_cudnn": SDPBackend.CUDNN_ATTENTION}


def median_ms(fn, warmup=5, reps=30):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    times.sort()
    return times[len(times) // 2]


def one_shape(a):
    """kvtile_bench's shape: q [B, S, HQ, D], k / v [B, S, HKV, D] (kvtile's storage), viewed as
    [B, H, S, D] for SDPA."""
    dev, dt = a.device, _common.torch_dtype(a.dtype)
    shape = _common.label(a)
    q = torch.empty(a.batch, a.len, a.hq, a.d, device=dev, dtype=dt).uniform_(-1, 1).transpose(1, 2)
    k, v = (torch.empty(a.batch, a.len, a.hkv, a.d, device=dev, dtype=dt).uniform_(-1, 1).transpose(1, 2)
            for _ in range(2))
    gqa = a.hq != a.hkv
    backends = BACKENDS.items() if dev == "cuda" else [("torch_cpu", None)]
    for impl, backend in backends:
        try:
            call = lambda i: sdpa(q, k, v, is_causal=bool(a.causal), enable_gqa=gqa)  # noqa: E731
            if backend is None:
                t = _common.median_seconds(call, dev)
            else:
                with sdpa_kernel([backend]):
                    t = _common.median_seconds(call, dev)
            _common.emit("prefill", shape, impl, _common.unit(a), _common.rate(a, t))
        except Exception as e:  # a backend that refuses the shape
            _common.skip("prefill", shape, impl, f"{type(e).__name__}: {e}"[:200])


def main():
    a = _common.parse_args("prefill")
    if a.len:
        return one_shape(a)
    torch.manual_seed(0)
    for d in (64, 128):
        for s in (512, 1024, 2048, 4096, 8192, 16384):
            b, h = TOKENS // s, HIDDEN // d
            # [B, S, H, D] storage like kvtile's, viewed as [B, H, S, D] for SDPA.
            q, k, v = (torch.empty(b, s, h, d, device="cuda", dtype=torch.bfloat16).uniform_(-1, 1).transpose(1, 2)
                       for _ in range(3))
            for causal in (False, True):
                flops = 4.0 * b * h * s * s * d * (0.5 if causal else 1.0)
                shape = f"bf16 D{d} S{s} B{b} H{h} {'causal' if causal else 'full'}"
                for impl, backend in BACKENDS.items():
                    try:
                        with sdpa_kernel([backend]):
                            ms = median_ms(lambda: sdpa(q, k, v, is_causal=causal))
                        value = flops / (ms * 1e-3) / 1e12
                    except Exception as e:  # a backend that refuses the shape
                        print(f"# {impl} {shape}: {e}", file=sys.stderr)
                        continue
                    print(json.dumps({"suite": "prefill", "shape": shape, "impl": impl, "unit": "TFLOP/s",
                                      "value": round(value, 2)}), flush=True)
            del q, k, v


if __name__ == "__main__":
    main()
