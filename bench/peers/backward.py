#!/usr/bin/env python3
"""Peers of bench/backward_bench.cu: the backward of PyTorch SDPA's flash (FlashAttention-2)
and cuDNN backends on the same grid (bf16, D 64 and 128, S 1024..16384, causal and not, 16k
tokens per batch, hidden 2048 so heads = 2048 / D). Only the backward is timed: the forward
runs once, then torch.autograd.grad(O, (Q, K, V), dO) is timed with the graph retained.
FLOPs are counted as in the C++ benchmark: 2.5 * 4 * B * H * S * S * D, halved for causal.
Time: median of CUDA-event-timed runs after warm-up. Prints one JSON line per (shape, impl)
in the results protocol of bench/README.md."""
import json
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

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


def main():
    torch.manual_seed(0)
    for d in (64, 128):
        for s in (1024, 2048, 4096, 8192, 16384):
            b, h = TOKENS // s, HIDDEN // d
            for causal in (False, True):
                flops = 2.5 * 4.0 * b * h * s * s * d * (0.5 if causal else 1.0)
                shape = f"bf16 D{d} S{s} B{b} H{h} {'causal' if causal else 'full'}"
                for impl, backend in BACKENDS.items():
                    try:
                        # [B, S, H, D] storage like kvtile's, viewed as [B, H, S, D] for SDPA.
                        leaves = [torch.empty(b, s, h, d, device="cuda", dtype=torch.bfloat16).uniform_(-1, 1)
                                  .requires_grad_() for _ in range(3)]
                        q, k, v = (x.transpose(1, 2) for x in leaves)
                        with sdpa_kernel([backend]):
                            out = sdpa(q, k, v, is_causal=causal)
                            d_out = torch.empty_like(out).uniform_(-1, 1)
                            ms = median_ms(lambda: torch.autograd.grad(out, (q, k, v), d_out, retain_graph=True))
                        value = flops / (ms * 1e-3) / 1e12
                    except Exception as e:  # a backend that refuses the shape
                        print(f"# {impl} {shape}: {type(e).__name__}: {e}"[:300], file=sys.stderr)
                        continue
                    finally:
                        leaves = q = k = v = out = d_out = None
                    print(json.dumps({"suite": "backward", "shape": shape, "impl": impl, "unit": "TFLOP/s",
                                      "value": round(value, 2)}), flush=True)


if __name__ == "__main__":
    main()
