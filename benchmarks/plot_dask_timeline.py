#!/usr/bin/env python
"""Plot the median timeline of `bench_embedded.py --only dask --json` runs, before and after, next to LocalCluster.

.venv/bin/python benchmarks/plot_dask_timeline.py BEFORE.json AFTER.json benchmarks/dask_start.png
"""

from __future__ import annotations

import json
import statistics
import sys


def medians(path: str) -> tuple[list[tuple[str, float]], float]:
    with open(path) as f:
        dask = json.load(f)["dask"]
    runs = dask["workbench"]["runs"] if isinstance(dask["workbench"], dict) else dask["workbench"]
    stock_runs = dask["stock"]["runs"] if isinstance(dask["stock"], dict) else dask["stock"]
    stock = statistics.median(r["total_s"] for r in stock_runs)
    steps = list(runs[0]["timeline"])
    return [(s, statistics.median(r["timeline"][s] for r in runs if s in r["timeline"])) for s in steps], stock


def main(before: str, after: str, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    for row, (_label, path) in enumerate((("before", before), ("after", after))):
        steps, stock = medians(path)
        prev = 0.0
        for i, (step, t) in enumerate(steps):
            ax.barh(
                row, t - prev, left=prev, color=plt.cm.tab20(i % 20), edgecolor="white", label=step if row else None
            )
            prev = t
        ax.plot([stock, stock], [row - 0.4, row + 0.4], "k--")
        ax.plot([stock + 1, stock + 1], [row - 0.4, row + 0.4], "r:")
        ax.text(prev + 0.03, row, f"{prev:.2f} s", va="center")
    ax.set_yticks([0, 1], ["workbench before", "workbench after"])
    ax.set_xlabel("seconds from the client's request (medians); dashed: LocalCluster(n_workers=2), dotted: +1 s")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3)
    ax.set_title("Dask Gateway: create cluster -> 2 workers, where the time goes")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:4])
