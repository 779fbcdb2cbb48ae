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
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .report import RATES, STRATEGIES, _key, plot, summarize


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
    auto: dict[str, Any] = {}  # auto's model of the steps a rebuild takes, where not the default
    if args.auto_steps_floor is not None:
        auto["auto_steps_floor"] = args.auto_steps_floor
    if args.auto_prior_steps_per_bump is not None:
        auto["auto_prior_steps_per_bump"] = args.auto_prior_steps_per_bump
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        def spec(strategy: str, rate: str, swap: bool, real: bool = False, seed: int = seed) -> RunSpec:
            return RunSpec(strategy=strategy, rate=rate, p_iter=RATES.get(rate, 0.0), seed=seed, steps=args.steps, swap=swap,
                           ckpt_every=args.ckpt_every, real=real)

        # Only CheckFree+ trains with swapped micro-batches; every other strategy restores a lost
        # edge stage the same way (copy its neighbour + the edge-layer replica) without them.
        families.append([spec("none", "-", False)] + [spec(s, r, False) for r in args.rates for s in ("average", "average_sq", "copy", "random")])
        families.append([spec("none", "swap", True)] + [spec("average", r, True) for r in args.rates])
        families += [[spec("reload", r, False)] for r in args.rates]
        families += [[dataclasses.replace(spec("auto", r, False), **auto)] for r in args.rates]  # checkpoints of its own
        if not args.skip_real:
            families += [[spec("average", r, True, real=True)] for r in args.rates]
    if args.strategies:  # only these rows (a family keeps its run without failures, which the others fork from)
        keep = set(args.strategies)
        families = [[f[0]] + [sp for sp in f[1:] if sp.strategy in keep] if f[0].strategy == "none" else f
                    for f in families if any(sp.strategy in keep for sp in f)]
    families.sort(key=lambda f: (f[0].seed, -len(f)))  # seed by seed, so a cut-short run has whole seeds
    return [([asdict(s) for s in f], asdict(cfg), asdict(tcfg), args.corpus_bytes) for f in families]


def _spec_id(spec: dict[str, Any]) -> str:
    """A run's identity, with the fields added since it was written at their defaults."""
    from .sim import RunSpec

    known = {k: v for k, v in spec.items() if k in RunSpec.__dataclass_fields__}
    return json.dumps(asdict(RunSpec(**known)), sort_keys=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one seed, 16%%/h only, 200 steps")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES,
                   help="only these rows (default: all); a run without failures is kept for the others to fork from")
    p.add_argument("--auto-steps-floor", type=float, help="auto: model a rebuild's steps as this floor + a slope x the "
                   "bump (default: the ratio of the sums); see experiments.checkfree.calibrate. With --from-results: "
                   "the auto runs of that model")
    p.add_argument("--auto-prior-steps-per-bump", type=float, help="auto: its prior steps per unit of bump (the slope "
                   "with --auto-steps-floor; default: the sim's)")
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
    p.add_argument("--from-results", type=Path, nargs="+", help="skip training: table and plot from runs .jsonl written "
                   "earlier (a run in a later file replaces the same run in an earlier one)")
    p.add_argument("--held-out-from", type=int, help="auto against the better strategy again on the seeds from this one "
                   "on alone (those a prior was not calibrated on)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.rates = 1, 200, ["16%/h"]
        if args.plot_name == "checkfree_loss.png":
            args.plot_name = "checkfree_loss_quick.png"
    name = "quick" if args.quick else "full"
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    if args.from_results:
        runs = {_spec_id(r["spec"]): r for path in args.from_results
                for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip())}
        # one auto model per table: the runs of --auto-steps-floor (none given: the ratio's)
        results = [r for r in runs.values() if r["spec"]["strategy"] != "auto"
                   or r["spec"].get("auto_steps_floor") == args.auto_steps_floor]
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
    table, _ = summarize(results, args.steps, args.held_out_from)
    (args.out / f"checkfree_table_{name}.md").write_text(table + "\n")
    plot(results, args.rates, args.out / args.plot_name)
    print(table)
    print(f"\nplot: {args.out / args.plot_name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
