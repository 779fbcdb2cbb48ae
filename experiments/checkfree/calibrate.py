"""The prior of policy ``auto``: steps to win back a unit of the loss bump measured after a rebuild.

    python -m experiments.checkfree.run --seeds 6 --strategies average --skip-real --out /tmp/calibration
    python -m experiments.checkfree.calibrate /tmp/calibration/checkfree_runs_full.jsonl --seeds 0 6

Replays :class:`recovery.checkfree.LossBumpTracker` (as ``auto`` runs it: a window of 5 losses)
over the neighbour-averaging runs (``average``, fixed order) of the given seeds: each rebuild's
bump, measured on the last step's batch right after it (``probe_bump``), against the steps the
tracker saw it take. Prints the ratio of the sums (what the tracker learns, and the prior
``PipelineConfig.auto_prior_steps_per_bump``), how well the bump predicts the steps, the least
squares line ``steps = floor + slope x bump`` (the tracker's model with ``steps_floor``), and writes
the pairs with ``--json``. ``docs/checkfree_runs_calibration.jsonl`` holds the runs the default
prior came from (seeds 0-5).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from recovery.checkfree import LossBumpTracker

from .report import _key


def pairs(results: list[dict[str, Any]], seeds: range) -> list[dict[str, Any]]:
    """``(seed, rate, iteration, bump, steps)`` for each rebuild of the ``average`` runs of ``seeds``."""
    out = []
    for r in results:
        seed = r["spec"]["seed"]
        if _key(r)[1] != "average" or seed not in seeds:
            continue
        events = {}
        for e in r["events"]:
            events.setdefault(e["iteration"], e)
        tracker, open_at, last = LossBumpTracker(window=5), None, None
        for it, _step, loss in r["train"]:  # (the iteration after the one trained)
            e = events.get(it - 1)
            if e is not None and e.get("probe_bump") is not None and last is not None:
                tracker.start(last, bump=e["probe_bump"])
                open_at = (it - 1, e["probe_bump"])
            n = len(tracker.measured)
            tracker.observe(loss)
            last = loss
            if len(tracker.measured) > n and open_at is not None:
                out.append({"seed": seed, "rate": r["spec"]["rate"], "iteration": open_at[0], "bump": open_at[1],
                            "steps": tracker.measured[-1][1]})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path, help="a runs .jsonl of experiments.checkfree.run (with probe_bump in its events)")
    p.add_argument("--seeds", type=int, nargs=2, default=(0, 6), metavar=("FIRST", "END"), help="seeds FIRST..END-1")
    p.add_argument("--json", type=Path, help="write the pairs here")
    a = p.parse_args(argv)
    results = [json.loads(line) for line in a.runs.read_text().splitlines() if line.strip()]
    got = pairs(results, range(*a.seeds))
    if len(got) < 2:
        print("fewer than 2 rebuilds with a measured bump in those runs", file=sys.stderr)
        return 1
    bumps = [max(0.0, x["bump"]) for x in got]
    steps = [x["steps"] for x in got]
    mb, ms = statistics.mean(bumps), statistics.mean(steps)
    cov = sum((b - mb) * (s - ms) for b, s in zip(bumps, steps))
    corr = cov / math.sqrt(sum((b - mb) ** 2 for b in bumps) * sum((s - ms) ** 2 for s in steps))
    print(f"{len(got)} rebuilds (seeds {a.seeds[0]}-{a.seeds[1] - 1}): {sum(steps) / sum(bumps):.1f} steps per unit of "
          f"bump (the ratio of the sums); mean bump {mb:.3f}, mean steps {ms:.1f}; correlation of bump and steps {corr:.2f}")
    slope = cov / sum((b - mb) ** 2 for b in bumps)
    print(f"least squares: steps = {ms - slope * mb:.2f} + {slope:.1f} x bump (the floor and slope of "
          f"--auto-steps-floor / --auto-prior-steps-per-bump)")
    if a.json:
        a.json.write_text(json.dumps(got, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
