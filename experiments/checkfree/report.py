"""The CheckFree experiment's table and plot, from the runs' records (``run.py`` makes them):
modelled wall-clock, iterations to the target, ``auto`` against the better strategy per rate."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

RATES = {"5%/h": 0.0009, "10%/h": 0.002, "16%/h": 0.004}
STRATEGIES = ("none", "reload", "auto", "average", "average_sq", "copy", "random")  # a run's (sim.RunSpec)
FAILING = ("reload", "auto", "average_swap", "average_swap_real", "average", "average_sq", "copy", "random")
LABELS = {
    "none": "no failure", "none_swap": "no failure, swapped micro-batches", "reload": "reload (ckpt every K)",
    "auto": "auto (reload or neighbour average, per failure)",
    "average_swap": "neighbour average + swap (CheckFree+)",
    "average_swap_real": "CheckFree+ on the real pipeline (RayPipeline, swap=True)",
    "average": "neighbour average (CheckFree)",
    "average_sq": "neighbour average, squared norms",
    "copy": "copy one neighbour", "random": "random re-init",
}


def _key(r: dict[str, Any]) -> tuple[str, str]:
    s = r["spec"]
    return (s["rate"], s["strategy"] + ("_swap" if s["swap"] else "") + ("_real" if s.get("real") else ""))


def _fmt(xs: list[float], digits: int = 3) -> str:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return "—"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def costs(results: list[dict[str, Any]]) -> dict[str, float]:
    """Median seconds of a training iteration, a checkpoint save, and a recovery of each strategy."""
    med = statistics.median
    # The real pipeline's rows are modelled at the simulated runs' times too (same arithmetic);
    # what its own processes took is in real_costs.
    sim = [r for r in results if not r["spec"].get("real")] or results
    out = {"step": med(t for r in sim for t in r["step_times"])}
    saves = [t for r in results for t in r["save_times"]]
    out["save"] = med(saves) if saves else 0.0
    for strategy in FAILING:
        ts = [t for r in results if _key(r)[1] == strategy for t in r["recover_times"]]
        out[f"recover {strategy}"] = med(ts) if ts else 0.0
    if out.get("recover average_swap_real"):
        out["real recover"], out["recover average_swap_real"] = out["recover average_swap_real"], out["recover average_swap"]
        out["real step"] = med(t for r in results if r["spec"].get("real") for t in r["step_times"])
    return out


def _auto_per_recovery(r: dict[str, Any], c: dict[str, float]) -> float:
    """auto's mean recovery cost: each recovery at the cost of what it was, a reload or a rebuild."""
    n = len(r["recover_times"])
    reloads = sum(e.get("how") == "reload" for e in r["events"])
    return (reloads * c["recover reload"] + (n - reloads) * c["recover average"]) / max(1, n)


def wall(r: dict[str, Any], e: list[float], c: dict[str, float]) -> float:
    """Modelled wall-clock at eval point ``e``: iterations, saves and recoveries at their median times."""
    if _key(r)[1] == "auto":
        per = _auto_per_recovery(r, c)
        return e[0] * c["step"] + e[2] * c["save"] + e[3] * per
    return e[0] * c["step"] + e[2] * c["save"] + e[3] * c.get(f"recover {_key(r)[1]}", 0.0)


def _reach(r: dict[str, Any], target: float, c: dict[str, float] | None) -> float:
    """Iterations (or modelled seconds, given costs ``c``) until the validation loss first reached
    ``target``, interpolated between the two evaluations around the crossing (evaluations are 25
    steps apart: without it, a loss a hair above the target at one of them costs 25 steps)."""
    prev = None
    for e in r["evals"]:
        x = wall(r, e, c) if c else e[0]
        if e[4] <= target:
            if prev is None or prev[1] <= e[4]:
                return x
            return prev[0] + (prev[1] - target) / (prev[1] - e[4]) * (x - prev[0])
        prev = (x, e[4])
    return math.nan


def summarize(results: list[dict[str, Any]], steps: int, held_out_from: int | None = None) -> tuple[str, dict[str, Any]]:
    """The tables; ``held_out_from``: auto against the better strategy again on the seeds from
    that one on alone (e.g. those a prior of auto's was not calibrated on)."""
    by = defaultdict(list)
    for r in results:
        by[_key(r)].append(r)
    base = {r["spec"]["seed"]: r for r in by[("-", "none")]}
    # Target: what the run without failures reached at 80% of its steps (per seed).
    target = {seed: min([e[4] for e in r["evals"] if e[1] <= int(0.8 * steps)] or [r["evals"][-1][4]]) for seed, r in base.items()}
    c = costs(results)
    lines = [
        "| rate | strategy | failures | iterations | wall s | final val loss | Δ vs no failure | iters to target | wall s to target |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    summary: dict[str, Any] = {}
    order = [("-", "none"), ("swap", "none_swap")] + [(rate, s) for rate in RATES for s in FAILING]
    for key in order:
        rs = by.get(key)
        if not rs:
            continue
        fails = [sum(len(e["stages"]) if e.get("how") == "reload" else 1 for e in r["events"]) for r in rs]
        finals = [r["final_val"] for r in rs]
        deltas = [r["final_val"] - base[r["spec"]["seed"]]["final_val"] for r in rs if r["spec"]["seed"] in base]
        reach_it = [_reach(r, target[r["spec"]["seed"]], None) for r in rs if r["spec"]["seed"] in target]
        reach_s = [_reach(r, target[r["spec"]["seed"]], c) for r in rs if r["spec"]["seed"] in target]
        missed = sum(math.isnan(x) for x in reach_it)
        miss = f" ({missed}/{len(rs)} missed)" if missed else ""
        lines.append(
            f"| {key[0]} | {LABELS[key[1]]} | {statistics.mean(fails):.1f} | {statistics.mean(r['iterations'] for r in rs):.0f} "
            f"| {statistics.mean(wall(r, r['evals'][-1], c) for r in rs):.1f} | {_fmt(finals)} | {_fmt(deltas)} | {_fmt(reach_it, 0)}{miss} | {_fmt(reach_s, 1)} |"
        )
        summary[f"{key[0]} {key[1]}"] = {"final_val": finals, "delta": deltas, "failures": fails, "reach_iterations": reach_it}
    summary["costs"] = c

    # The bump each rebuild causes, and how the two weightings differ on the events seen.
    bumps = defaultdict(list)
    weights = defaultdict(list)
    clipped = defaultdict(int)
    averaged = defaultdict(int)
    for r in results:
        s = _key(r)[1]
        for e in r["events"]:
            bumps[s].append(e["val_after"] - e["val_before"])
            if e.get("how") == "average":
                averaged[s] += 1
                weights[s].append(abs(e["w_prev"] - 0.5))
                clipped[s] += all(n >= 1.0 for n in e["norms"])
    lines += ["", "Modelled wall-clock: iterations x {:.3f} s + saves x {:.3f} s + recoveries x (reload {:.3f} s, rebuild {:.3f} s), medians measured in these runs."
              .format(c["step"], c["save"], c["recover reload"], c["recover average"])]
    if "real recover" in c:
        lines += ["", "The real pipeline's own times (4 processes on the same loaded 2 cores): a step {:.3f} s, a recovery {:.1f} s "
                  "(a new stage process started, the state fetched from its sources, the group re-formed); its row is modelled "
                  "at the simulated times above, like the others.".format(c["real step"], c["real recover"])]
    autos = [e for r in results if _key(r)[1] == "auto" for e in r["events"]]
    if autos:
        reloads = sum(e.get("how") == "reload" for e in autos)
        said = [next((e["reason"] for e in autos if (e.get("how") == "reload") == want), "") for want in (True, False)]
        lines += ["", (f"auto chose reload {reloads} time(s) and neighbour averaging {len(autos) - reloads} time(s); "
                  f"for example \"{said[0]}\" and \"{said[1]}\".")]
    lines += _auto_against_the_better(by, target, c)
    if held_out_from is not None:
        held = {s: t for s, t in target.items() if s >= held_out_from}
        lines += [f"\nSeeds {held_out_from} and up only ({len(held)}):"] + _auto_against_the_better(by, held, c)[1:]
    lines += ["", "| strategy | recovery events | mean validation-loss bump right after recovery | averaging events with both norms clipped | mean abs(w_prev - 0.5) |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for s in FAILING:
        if not bumps.get(s):
            continue
        w = f"{statistics.mean(weights[s]):.3f}" if weights.get(s) else "—"
        cl = f"{clipped[s]}/{averaged[s]}" if averaged.get(s) else "—"
        lines.append(f"| {LABELS[s]} | {len(bumps[s])} | {statistics.mean(bumps[s]):+.3f} | {cl} | {w} |")
    summary["bumps"] = {s: v for s, v in bumps.items()}
    return "\n".join(lines), summary


def _auto_against_the_better(by: dict[tuple[str, str], list[dict[str, Any]]], target: dict[int, float],
                             c: dict[str, float]) -> list[str]:
    """Per rate: auto's modelled seconds to the target against the better (lower mean) of reload
    and neighbour averaging, and seed by seed (ahead / within 1 % / behind); a seed that missed
    the target counts at the run's end."""
    def reach(r: dict[str, Any]) -> float:
        x = _reach(r, target[r["spec"]["seed"]], c)
        return wall(r, r["evals"][-1], c) if math.isnan(x) else x

    head = ("| rate | auto, s to target | neighbour average | reload | auto vs the better | seed by seed: mean [95 % CI] "
            "| seeds: auto ahead / within 1 % / behind |")
    lines = ["", head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for rate in RATES:
        runs = {s: {r["spec"]["seed"]: reach(r) for r in by.get((rate, s), []) if r["spec"]["seed"] in target}
                for s in ("auto", "average", "reload")}
        if not all(runs.values()):
            continue
        mean = {s: statistics.mean(v.values()) for s, v in runs.items()}
        best = min(("average", "reload"), key=mean.__getitem__)
        diff = [runs["auto"][k] / runs[best][k] - 1 for k in runs["auto"] if k in runs[best]]
        tally = (sum(d < -0.01 for d in diff), sum(abs(d) <= 0.01 for d in diff), sum(d > 0.01 for d in diff))
        lines.append(f"| {rate} | {mean['auto']:.2f} | {mean['average']:.2f} | {mean['reload']:.2f} | "
                     f"{mean['auto'] / mean[best] - 1:+.1%} ({LABELS[best].split(' (')[0]}) | {_paired(diff)} | "
                     f"{' / '.join(map(str, tally))} |")
    return lines


# Student's t, two-sided 95 %, by degrees of freedom 1..30 (the normal's 1.96 beyond)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def _paired(diff: list[float]) -> str:
    """The mean of the per-seed differences (auto / the better - 1) and its 95 % confidence
    interval (Student's t): "no worse" holds, at that confidence, up to the interval's upper end."""
    if len(diff) < 2:
        return "—"
    m = statistics.mean(diff)
    half = (_T975[len(diff) - 2] if len(diff) <= 31 else 1.96) * statistics.stdev(diff) / math.sqrt(len(diff))
    return f"{m:+.1%} [{m - half:+.1%}, {m + half:+.1%}]"


def plot(results: list[dict[str, Any]], rates: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    by = defaultdict(list)
    for r in results:
        by[_key(r)].append(r)
    c = costs(results)
    fig, axes = plt.subplots(len(rates), 2, figsize=(12, 3.6 * len(rates)), squeeze=False)
    colors = {"none": "black", "none_swap": "grey", "reload": "tab:red", "auto": "tab:brown", "average_swap": "tab:purple",
              "average_swap_real": "magenta", "average": "tab:blue",
              "average_sq": "tab:cyan",
              "copy": "tab:green", "random": "tab:orange"}
    for row, rate in enumerate(rates):
        for col, (use_wall, xlabel) in enumerate(((False, "iterations executed"), (True, "modelled wall-clock s (compute + checkpoints + recovery)"))):
            ax = axes[row][col]
            for key in [("-", "none"), ("swap", "none_swap")] + [(rate, s) for s in FAILING]:
                rs = by.get(key)
                if not rs:
                    continue
                def xs(r: dict[str, Any], use_wall: bool = use_wall) -> list[float]:
                    return [wall(r, e, c) if use_wall else e[0] for e in r["evals"]]

                xmax = max(xs(r)[-1] for r in rs)
                grid = np.linspace(0, xmax, 160)
                # A run that finished earlier stays at its final loss.
                ys = [np.interp(grid, xs(r), [e[4] for e in r["evals"]]) for r in rs]
                seeds = len(by.get((rate, "average"), []))
                label = LABELS[key[1]] + (f" ({len(rs)} seeds)" if len(rs) != seeds else "")
                ax.plot(grid, np.mean(ys, axis=0), color=colors[key[1]], label=label, lw=1.4)
            ax.set_ylim(top=min(3.5, ax.get_ylim()[1]))
            ax.set_xlabel(xlabel)
            ax.set_ylabel("validation loss (nats/byte)")
            ax.set_title(f"per-stage failure rate {rate}, mean of {len(by.get((rate, 'average'), []))} seed(s)", fontsize=10)
            ax.grid(alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
