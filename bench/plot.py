#!/usr/bin/env python3
"""Render each results file (bench/results/<card>.json, written by bench/collect.py) into one
figure per suite: for every shape, kvtile and each peer side by side, with the card's ceiling
drawn (read bandwidth for decode, copy bandwidth for block copies, dense bf16 peak for prefill,
append and backward). Figures go to docs/figures/<card>-<suite>.svg, which docs/results.md shows.

usage: plot.py [RESULTS.json ...]   (default: every bench/results/*.json)
       plot.py [--card NAME] ROWS.jsonl   (kvtile_bench --results, peer outputs: figures
                                           ROWS-<suite>.svg beside the file; NAME picks the ceilings)
Needs matplotlib (pip install matplotlib). collect.py calls render() itself when it can.
"""
import glob
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIGURES = os.path.join(ROOT, "docs", "figures")

# The cards' ceilings (../shared ANCHORS: measured where a measurement exists, else the
# datasheet), by unit: what the suite's numbers are a fraction of.
CEILINGS = {
    "H100": {
        "read": (3.03, "read ceiling 3.03 TB/s (measured, 16-byte loads)"),
        "copy": (2.97, "copy ceiling 2.97 TB/s (measured, read + write)"),
        "bf16": (989.0, "dense bf16 peak 989 TFLOP/s (datasheet)"),
        "gemm": (736.0, "bf16 GEMM 8192^3 736 TFLOP/s (measured)"),
    },
    "H200": {
        "read": (4.8, "HBM3e 4.8 TB/s (datasheet; cuDNN decode reads 4.6)"),
        "copy": (4.24, "copy ceiling 4.24 TB/s (measured, read + write)"),
        "bf16": (989.0, "dense bf16 peak 989 TFLOP/s (datasheet)"),
        "gemm": (794.0, "bf16 GEMM 8192^3 794 TFLOP/s (measured)"),
    },
}
# Which ceilings each suite is drawn against.
SUITE_CEILINGS = {"decode": ["read"], "block_copy": ["copy"], "prefill": ["bf16", "gemm"],
                  "prefill_tiles": ["bf16", "gemm"], "append": ["bf16", "gemm"],
                  "backward": ["bf16", "gemm"], "backward_tiles": ["bf16", "gemm"]}


def slug(text):
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def ceilings_for(card, suite):
    for key, table in CEILINGS.items():
        if key in card:
            return [table[c] for c in SUITE_CEILINGS.get(suite, []) if c in table]
    return []


def figure_path(card, suite):
    return os.path.join(FIGURES, f"{slug(card)}-{slug(suite)}.svg")


def impl_order(rows):
    impls = []
    for r in rows:
        for k in r:
            if k not in ("suite", "shape", "unit") and k not in impls:
                impls.append(k)
    if "kvtile" in impls:
        impls.remove("kvtile")
        impls.insert(0, "kvtile")
    return impls


def plot_suite(plt, card, date, commit, suite, rows, path=None):
    impls = impl_order(rows)
    unit = rows[0]["unit"]
    n, k = len(rows), len(impls)
    bar = 0.8 / k
    fig_h = max(2.5, 0.2 * n * k + 1.6)
    fig, ax = plt.subplots(figsize=(11, fig_h))
    cmap = plt.get_cmap("tab10")
    for j, impl in enumerate(impls):
        ys = [i + (j - (k - 1) / 2) * bar for i in range(n)]
        vals = [r.get(impl, 0) for r in rows]
        color = "#d62728" if impl == "kvtile" else cmap((j + (0 if j < 3 else 1)) % 10)
        ax.barh(ys, vals, height=bar * 0.9, label=impl, color=color, edgecolor="none")
        for y, v in zip(ys, vals):
            if v:
                ax.text(v, y, f" {v:.3g}", va="center", fontsize=6)
    top = max(max((r.get(i, 0) for i in impls), default=0) for r in rows)
    styles = ["-", "--"]
    for c, (value, text) in enumerate(ceilings_for(card, suite)):
        ax.axvline(value, color="black", linestyle=styles[c % 2], linewidth=1, label=text)
        top = max(top, value)
    ax.set_yticks(range(n))
    ax.set_yticklabels([r["shape"] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlim(0, top * 1.12)
    ax.set_xlabel(f"{unit} (higher is better)")
    ax.set_title(f"{suite} on {card} ({', '.join(x for x in (date, commit) if x)})", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = path or figure_path(card, suite)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, metadata={"Date": None})
    plt.close(fig)
    return path


def doc_from_lines(path, card):
    """A results document from JSON lines of the results protocol (one row per suite and shape)."""
    rows = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            r = json.loads(line)
            if r.get("value") is None or "unit" not in r:
                continue
            row = rows.setdefault((r["suite"], r["shape"]), {"suite": r["suite"], "shape": r["shape"], "unit": r["unit"]})
            row[r["impl"]] = r["value"]
    return {"card": card or "this machine", "date": "", "commit": os.path.basename(path), "rows": list(rows.values())}


def render(files=None, card=None):
    """Writes the figures of the given results files (default all); returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams["svg.fonttype"] = "none"  # text stays text: small, diffable files
    plt.rcParams["svg.hashsalt"] = "kvtile"  # stable ids: a re-render of the same data is no diff
    files = files or sorted(glob.glob(os.path.join(HERE, "results", "*.json")))
    out = []
    for path in files:
        lines = path.endswith(".jsonl")
        if lines:
            doc = doc_from_lines(path, card)
        else:
            with open(path) as f:
                doc = json.load(f)
        suites = {}
        for r in doc["rows"]:
            suites.setdefault(r["suite"], []).append(r)
        for suite, rows in suites.items():
            where = os.path.splitext(path)[0] + f"-{slug(suite)}.svg" if lines else None
            out.append(plot_suite(plt, doc["card"], doc.get("date", ""), doc.get("commit", ""), suite, rows, where))
    return out


def main():
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--card", default=None, help="card name for the ceilings of JSON-lines input")
    ap.add_argument("files", nargs="*")
    a = ap.parse_args()
    try:
        paths = render(a.files, a.card)
    except ImportError:
        print("plot.py needs matplotlib: python3 -m pip install matplotlib", file=sys.stderr)
        return 1
    for p in paths:
        print(os.path.relpath(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
