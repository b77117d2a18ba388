#!/usr/bin/env python3
"""Merge benchmark outputs into bench/results/<card>.json and render docs/results.md.

Inputs: Google Benchmark JSON files (entries labelled "suite=..;shape=..;impl=..;unit=.." with
a `value` counter) and peer JSON-lines files ({"suite","shape","impl","unit","value"} per line).
Rows are keyed by (suite, shape); each implementation becomes a column. Existing rows of the
card's file are kept unless a new measurement replaces them. docs/results.md shows the figures
bench/plot.py draws (docs/figures/<card>-<suite>.svg) under each suite's table; they are redrawn
here when matplotlib is installed.

usage: collect.py --card "NVIDIA H100 80GB HBM3" [--commit SHA] FILE...
       collect.py --render-only     (figures and docs/results.md from the results files as they are)
"""
import argparse
import datetime
import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plot  # noqa: E402  (matplotlib is imported only when a figure is drawn)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def parse_label(label):
    out = {}
    for part in label.split(";"):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def read_measurements(path):
    """Yield (suite, shape, unit, impl, value) from one file of either kind."""
    with open(path) as f:
        text = f.read()
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        doc = None
    if isinstance(doc, dict) and "benchmarks" in doc:
        for b in doc["benchmarks"]:
            if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
                continue
            lab = parse_label(b.get("label", ""))
            if not {"suite", "shape", "impl", "unit"} <= lab.keys() or "value" not in b:
                continue
            yield lab["suite"], lab["shape"], lab["unit"], lab["impl"], float(b["value"])
        return
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        if {"suite", "shape", "impl", "unit", "value"} <= r.keys() and r["value"] is not None:
            yield r["suite"], r["shape"], r["unit"], r["impl"], float(r["value"])


def slug(card):
    return re.sub(r"[^A-Za-z0-9]+", "-", card).strip("-").lower()


def render_markdown(results_dir):
    lines = ["# Measured results", "",
             "Rendered by `bench/collect.py` from `bench/results/*.json`; every number was measured",
             "side by side with its peers in the same run on the card named. Ratios are kvtile / peer",
             "(higher is better for TB/s and TFLOP/s).", ""]
    for name in sorted(os.listdir(results_dir)):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(results_dir, name)) as f:
            doc = json.load(f)
        lines += [f"## {doc['card']}", "", f"Measured {doc['date']} at commit `{doc['commit']}`.", ""]
        suites = {}
        for r in doc["rows"]:
            suites.setdefault(r["suite"], []).append(r)
        for suite, rows in suites.items():
            impls = plot.impl_order(rows)
            peers = [i for i in impls if i != "kvtile"]
            head = ["shape", "unit"] + impls + [f"kvtile / {p}" for p in peers]
            lines += [f"### {suite}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for r in rows:
                cells = [r["shape"], r["unit"]]
                cells += [f"{r[i]:.3g}" if i in r else "" for i in impls]
                for p in peers:
                    ok = "kvtile" in r and p in r and r[p] > 0
                    cells.append(f"{r['kvtile'] / r[p]:.2f}" if ok else "")
                lines.append("| " + " | ".join(cells) + " |")
            if suite in doc.get("notes", {}):
                lines += ["", doc["notes"][suite]]
            fig = os.path.join("figures", f"{slug(doc['card'])}-{slug(suite)}.svg")
            if os.path.exists(os.path.join(ROOT, "docs", fig)):
                lines += ["", f"![{suite} on {doc['card']}: kvtile and its peers per shape, with the card's ceiling]({fig})"]
            lines.append("")
    with open(os.path.join(ROOT, "docs", "results.md"), "w") as f:
        f.write("\n".join(lines))


def redraw(files):
    """The figures of bench/plot.py, when matplotlib is here."""
    try:
        plot.render(files)
    except ImportError as e:
        print(f"figures not redrawn ({e}); python3 -m pip install matplotlib", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--card")
    ap.add_argument("--render-only", action="store_true",
                    help="redraw the figures and docs/results.md from bench/results/*.json, changing no results file")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--note", action="append", default=[], metavar="SUITE=TEXT",
                    help="a remark rendered under the suite's table (replaces an earlier one)")
    ap.add_argument("files", nargs="*")
    a = ap.parse_args()
    results_dir = os.path.join(HERE, "results")
    if a.render_only:
        redraw(None)
        render_markdown(results_dir)
        return
    if not a.card:
        ap.error("--card is required (or --render-only)")
    commit = a.commit
    if commit is None:
        try:
            commit = subprocess.check_output(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], text=True).strip()
        except Exception:
            commit = "unknown"
    os.makedirs(results_dir, exist_ok=True)
    out = os.path.join(results_dir, slug(a.card) + ".json")
    rows, notes = {}, {}
    if os.path.exists(out):
        with open(out) as f:
            old = json.load(f)
            for r in old["rows"]:
                rows[(r["suite"], r["shape"])] = r
            notes = old.get("notes", {})
    for n in a.note:
        suite, text = n.split("=", 1)
        notes[suite] = text
    n = 0
    for path in a.files:
        for suite, shape, unit, impl, value in read_measurements(path):
            r = rows.setdefault((suite, shape), {"suite": suite, "shape": shape, "unit": unit})
            r[impl] = round(value, 4)
            n += 1
    doc = {"card": a.card, "date": datetime.date.today().isoformat(), "commit": commit,
           "notes": notes, "rows": sorted(rows.values(), key=lambda r: (r["suite"], list(rows).index((r["suite"], r["shape"]))))}
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    redraw([out])
    render_markdown(results_dir)
    print(f"collected {n} measurements into {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
