#!/usr/bin/env python3
"""Peer for bench/block_copy_bench.cu: PyTorch copies of the same blocks at the same shape.

K and V pools of shape [layers, num_blocks, page, kv_heads, head_dim] (bf16, Llama-3-8B:
32 layers, 8 KV heads, head_dim 128, 16-token blocks, 2048 blocks). For each batch of
(src, dst) pairs: pool.index_copy_(1, dst, pool.index_select(1, src)) for K and V (all layers
at once). Bytes counted as in kvtile's benchmark: every copied byte read once and written once
(the temporary of index_select is not counted). Batches rotate so small ones are not served
from L2. CUDA-event timing; prints one JSON object per line (bench/README.md protocol).
"""
import json

import torch

LAYERS, BLOCKS, PAGE, HEADS, DIM = 32, 2048, 16, 8, 128


def main():
    dev = torch.device("cuda")
    k = torch.randn(LAYERS, BLOCKS, PAGE, HEADS, DIM, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    gen = torch.Generator().manual_seed(7)
    ids = torch.randperm(BLOCKS, generator=gen)
    block_bytes = PAGE * HEADS * DIM * 2
    for pairs in (1, 8, 256):
        rotations = max(1, min(BLOCKS // (2 * pairs), 16))
        batches = []
        for r in range(rotations):
            sel = ids[2 * pairs * r: 2 * pairs * (r + 1)]
            batches.append((sel[0::2].to(dev), sel[1::2].to(dev)))

        def run(i):
            src, dst = batches[i % rotations]
            k.index_copy_(1, dst, k.index_select(1, src))
            v.index_copy_(1, dst, v.index_select(1, src))

        for i in range(3 * rotations):
            run(i)
        torch.cuda.synchronize()
        reps = 5 if pairs >= 64 else 50
        times = []
        for t in range(30):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(reps):
                run(t * reps + i)
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3 / reps)
        times.sort()
        median = times[len(times) // 2]
        nbytes = 2 * 2 * pairs * LAYERS * block_bytes  # (K + V) x (read + write)
        print(json.dumps({
            "suite": "block_copy",
            "shape": f"pairs={pairs} layers=32 kv_heads=8 head_dim=128 page=16 dtype=bf16",
            "impl": "torch_index_copy",
            "unit": "TB/s",
            "value": nbytes / median / 1e12,
        }), flush=True)


if __name__ == "__main__":
    main()
