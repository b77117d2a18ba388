#!/usr/bin/env python3
"""A/B of two builds' Google Benchmark JSON outputs, row by row.

    python3 bench/ab.py A.json [A2.json ...] -- B.json [B2.json ...]

A is the old build, B the new one. Each side may give several files (rounds run alternately,
so drift of the card's clocks falls on both sides) and each file may hold repetitions
(--benchmark_repetitions). Rows are matched by benchmark name; the metric is the `value`
counter where a benchmark sets one (TB/s, TFLOP/s: higher is better), else real time (lower is
better). For every row: the medians, B/A as a speed ratio (> 1: B faster), and a two-sided
Mann-Whitney U test over the samples (normal approximation with tie correction; 'n.s.' when
p >= 0.05 or fewer than 3 samples a side). Exit status 0; the caller reads the table.
"""
import json
import math
import statistics
import sys


def samples(paths):
    rows = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for b in data.get("benchmarks", []):
            if b.get("run_type") == "aggregate" or b.get("error_occurred"):
                continue
            name = b.get("run_name", b["name"])
            if "value" in b:
                rows.setdefault(name, ("value", []))[1].append(float(b["value"]))
            else:
                rows.setdefault(name, ("time", []))[1].append(float(b["real_time"]))
    return rows


def mann_whitney_p(a, b):
    """Two-sided p-value of the Mann-Whitney U test (normal approximation, tie-corrected)."""
    n1, n2 = len(a), len(b)
    if n1 < 3 or n2 < 3:
        return None
    pooled = sorted([(x, 0) for x in a] + [(x, 1) for x in b])
    ranks = [0.0] * len(pooled)
    ties = 0.0
    i = 0
    while i < len(pooled):
        j = i
        while j + 1 < len(pooled) and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        r = (i + j) / 2 + 1
        for k in range(i, j + 1):
            ranks[k] = r
        t = j - i + 1
        ties += t ** 3 - t
        i = j + 1
    r1 = sum(r for r, (_, side) in zip(ranks, pooled) if side == 0)
    u = r1 - n1 * (n1 + 1) / 2
    n = n1 + n2
    mu = n1 * n2 / 2
    var = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1)))
    if var <= 0:
        return 1.0
    z = (abs(u - mu) - 0.5) / math.sqrt(var)
    return max(0.0, min(1.0, math.erfc(max(z, 0.0) / math.sqrt(2))))


def main(argv):
    if "--" not in argv:
        sys.exit(__doc__)
    cut = argv.index("--")
    a, b = samples(argv[:cut]), samples(argv[cut + 1:])
    names = [n for n in a if n in b]
    if not names:
        sys.exit("ab.py: no benchmark name appears on both sides")
    width = max(len(n) for n in names)
    print(f"{'benchmark':<{width}}  {'A':>10}  {'B':>10}  {'B/A':>6}  significance")
    worst = None
    for n in names:
        kind, xa = a[n]
        _, xb = b[n]
        ma, mb = statistics.median(xa), statistics.median(xb)
        speed = (mb / ma) if kind == "value" else (ma / mb)
        p = mann_whitney_p(xa, xb)
        sig = "n.s." if p is None or p >= 0.05 else f"p={p:.3f}"
        unit = "" if kind == "value" else " us"
        print(f"{n:<{width}}  {ma:>10.4g}  {mb:>10.4g}  {speed:>6.3f}  {sig}{unit}")
        worst = speed if worst is None else min(worst, speed)
    print(f"rows {len(names)}, lowest B/A {worst:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
