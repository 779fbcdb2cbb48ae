"""CheckFree / CheckFree+ against reload, copy and random re-initialisation, at small scale.

    python -m experiments.checkfree.run --quick      # one seed, 16%/h, a few minutes on 2 cores
    python -m experiments.checkfree.run              # 3 seeds x 5/10/16 %/h (docs/checkfree.md: --seeds 6; its time)

Prints a markdown table and writes ``results.json``, ``table.md`` and the plot (``--out``, by
default ``docs/``). The pipeline is simulated in one process (see ``sim.py``), except for the
rows of CheckFree+ on the real pipeline, ``recovery.pipeline.RayPipeline(swap=True)`` with one
process per stage (``real.py``; ``--skip-real`` leaves them out). ``auto`` is the library's
policy (:class:`recovery.checkfree.AutoPolicy`) deciding per failure between reload and
neighbour averaging.

Failure rates: the paper's per-stage, per-iteration probabilities for 5 / 10 / 16 % per hour
(0.0009 / 0.002 / 0.004; ``p_iter = 1 - (1 - p_hour) ** (T / 3600)`` with an iteration time T of
about a minute) are used as they are, so a run of N iterations sees as many failures per
iteration as the paper's; our own iterations are far shorter, so mapping by our wall-clock
would give no failures at all.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

RATES = {"5%/h": 0.0009, "10%/h": 0.002, "16%/h": 0.004}
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


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


Job = tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any], int]


def _one(job: Job) -> list[dict[str, Any]]:
    """A family of runs of one seed: the first runs from scratch, the others fork from it.

    A failing run is identical to the run without failures until its first failure, so it
    starts from a copy of that run taken there (reload runs need their own checkpoints and
    always run from scratch, alone).
    """
    from examples.pipeline_demo import ModelConfig, TrainConfig

    from .sim import RunSpec, failure_schedule, run

    spec_ds, cfg_d, tcfg_d, corpus_bytes = job
    cfg, tcfg = ModelConfig(**cfg_d), TrainConfig(**tcfg_d)
    specs = [RunSpec(**d) for d in spec_ds]
    data = _data(corpus_bytes)
    if specs[0].real:
        from .real import run_real

        t0 = time.perf_counter()
        out = [asdict(run_real(specs[0], cfg, tcfg, data, corpus_bytes))]
        out[0]["elapsed_s"] = time.perf_counter() - t0
        return out
    first = {}
    for sp in specs[1:]:
        sched = failure_schedule(sp.seed, sp.p_iter, 4 * sp.steps, cfg.num_stages)
        first[sp] = min(sched, default=4 * sp.steps)
    t0 = time.perf_counter()
    base, forks = run(specs[0], cfg, tcfg, data, fork_at=tuple(first.values()))
    out = [asdict(base)]
    for sp in specs[1:]:
        res, _ = run(sp, cfg, tcfg, data, start=forks[first[sp]]) if first[sp] in forks else _unforked(sp, base)
        out.append(asdict(res))
    out[0]["elapsed_s"] = time.perf_counter() - t0
    return out


def _unforked(spec: Any, base: Any) -> tuple[Any, dict]:
    """No failure before the base run ended: the failing run is the base run."""
    import copy

    res = copy.deepcopy(base)
    res.spec = asdict(spec)
    return res, {}


_DATA: dict[int, Any] = {}


def _data(corpus_bytes: int) -> Any:
    from examples.pipeline_demo import TextData

    if corpus_bytes not in _DATA:
        _DATA[corpus_bytes] = TextData.from_stdlib(corpus_bytes)
    return _DATA[corpus_bytes]


def build_jobs(args: argparse.Namespace) -> list[Job]:
    from examples.pipeline_demo import ModelConfig, TrainConfig

    from .sim import RunSpec

    cfg = ModelConfig(dim=args.dim, heads=4, num_stages=args.stages, blocks_per_stage=2, seq_len=64)
    tcfg = TrainConfig(total_steps=args.steps, warmup_steps=max(1, args.steps // 20), batch_size=16, micro_batches=2)
    families: list[list[RunSpec]] = []
    for seed in range(args.seeds):
        def spec(strategy: str, rate: str, swap: bool, real: bool = False, seed: int = seed) -> RunSpec:
            return RunSpec(strategy=strategy, rate=rate, p_iter=RATES.get(rate, 0.0), seed=seed, steps=args.steps, swap=swap,
                           ckpt_every=args.ckpt_every, real=real)

        # Only CheckFree+ trains with swapped micro-batches; every other strategy restores a lost
        # edge stage the same way (copy its neighbour + the edge-layer replica) without them.
        families.append([spec("none", "-", False)] + [spec(s, r, False) for r in args.rates for s in ("average", "average_sq", "copy", "random")])
        families.append([spec("none", "swap", True)] + [spec("average", r, True) for r in args.rates])
        families += [[spec("reload", r, False)] for r in args.rates]
        families += [[spec("auto", r, False)] for r in args.rates]  # checkpoints of its own, like reload
        if not args.skip_real:
            families += [[spec("average", r, True, real=True)] for r in args.rates]
    families.sort(key=lambda f: (f[0].seed, -len(f)))  # seed by seed, so a cut-short run has whole seeds
    return [([asdict(s) for s in f], asdict(cfg), asdict(tcfg), args.corpus_bytes) for f in families]


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


def summarize(results: list[dict[str, Any]], steps: int) -> tuple[str, dict[str, Any]]:
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

    lines = ["", "| rate | auto, s to target | neighbour average | reload | auto vs the better | seeds: auto ahead / within 1 % / behind |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
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
                     f"{mean['auto'] / mean[best] - 1:+.1%} ({LABELS[best].split(' (')[0]}) | {' / '.join(map(str, tally))} |")
    return lines


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


def _spec_id(spec: dict[str, Any]) -> str:
    """A run's identity, with the fields added since it was written at their defaults."""
    from .sim import RunSpec

    known = {k: v for k, v in spec.items() if k in RunSpec.__dataclass_fields__}
    return json.dumps(asdict(RunSpec(**known)), sort_keys=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one seed, 16%%/h only, 200 steps")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rates", nargs="+", default=list(RATES), choices=list(RATES))
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--ckpt-every", type=int, default=50, help="reload baseline: steps between checkpoints (ckpt.save)")
    p.add_argument("--corpus-bytes", type=int, default=4 << 20)
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs in parallel (one thread each)")
    p.add_argument("--out", type=Path, default=Path("docs"), help="where the plot, table.md and results.json go")
    p.add_argument("--plot-name", default="checkfree_loss.png")
    p.add_argument("--resume", action="store_true", help="keep the runs already in the .jsonl of --out, run the rest")
    p.add_argument("--skip-real", action="store_true", help="leave out the runs on the real pipeline (Ray, one process per stage)")
    p.add_argument("--only-real", action="store_true", help="only the runs on the real pipeline (e.g. in a second --out, "
                   "merged into the first's .jsonl after)")
    p.add_argument("--from-results", type=Path, help="skip training: table and plot from a runs .jsonl written earlier")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.rates = 1, 200, ["16%/h"]
        if args.plot_name == "checkfree_loss.png":
            args.plot_name = "checkfree_loss_quick.png"
    name = "quick" if args.quick else "full"
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    if args.from_results:
        results = [json.loads(line) for line in args.from_results.read_text().splitlines() if line.strip()]
        args.steps = results[0]["spec"]["steps"]
        args.rates = [r for r in RATES if any(x["spec"]["rate"] == r for x in results)]
    else:
        jobs = build_jobs(args)
        if args.only_real:  # the most failures first: the rows that say the most if the run is cut short
            jobs = sorted((j for j in jobs if j[0][0].get("real")), key=lambda j: (-j[0][0]["p_iter"], j[0][0]["seed"]))
        runs_path = args.out / f"checkfree_runs_{name}.jsonl"
        if args.resume and runs_path.exists():
            results = [json.loads(line) for line in runs_path.read_text().splitlines() if line.strip()]
            done = {_spec_id(r["spec"]) for r in results}
            jobs = [j for j in jobs if not all(_spec_id(sp) in done for sp in j[0])]
        else:
            runs_path.write_text("")
        n = len(results) + sum(len(j[0]) for j in jobs)
        print(f"{n} runs of {args.steps} steps in {len(jobs)} families, {args.jobs} at a time; each run is appended to {runs_path}",
              file=sys.stderr)
        t0 = time.perf_counter()
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(args.jobs, initializer=_worker_init) as pool, runs_path.open("a") as f:
            for family in pool.imap_unordered(_one, jobs):
                for r in family:
                    results.append(r)
                    f.write(json.dumps(r) + "\n")
                    f.flush()
                    s = r["spec"]
                    print(f"[{len(results)}/{n} {time.perf_counter() - t0:.0f}s] seed {s['seed']} {s['rate']} {_key(r)[1]}: "
                          f"val {r['final_val']:.3f}, {len(r['events'])} event(s), {r['iterations']} iterations", file=sys.stderr)
    table, _ = summarize(results, args.steps)
    (args.out / f"checkfree_table_{name}.md").write_text(table + "\n")
    plot(results, args.rates, args.out / args.plot_name)
    print(table)
    print(f"\nplot: {args.out / args.plot_name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
