#!/usr/bin/env python
"""Plots the figures of ``bench_scale.py --json`` (or ``--out``) against ranks, one panel per
figure, its target dashed: ``python benchmarks/plot_scale.py RESULTS.jsonl OUT.png``."""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def main(src: str, out: str) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[dict]] = defaultdict(list)
    for line in open(src):
        if line.startswith("{"):
            rec = json.loads(line)
            if rec["ranks"] > 1:
                series[rec["figure"]].append(rec)
    names = sorted(series)
    cols = 3
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        recs = sorted(series[name], key=lambda r: r["ranks"])
        xs = [r["ranks"] for r in recs]
        ax.plot(xs, [r["value"] for r in recs], "o-")
        targets = [r["target"] for r in recs]
        if all(t is not None for t in targets):
            ax.plot(xs, targets, "--", color="grey", label="target")
            ax.legend(fontsize=7)
        ax.set_title(name.replace("_", " "), fontsize=8)
        ax.set_xlabel("ranks", fontsize=7)
        ax.set_ylabel(recs[0]["unit"], fontsize=7)
        ax.set_xscale("log")
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
