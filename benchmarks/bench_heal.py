#!/usr/bin/env python
"""Heal (no rollback) against reload in place and against no failure: final loss, steps lost
and redone, and the time from the detection to the first resumed step, per policy, side by side.

Each run is one ``recovery.run`` of :class:`recovery.demo.DemoTrainer` (an MLP trained
data-parallel on ``--workers`` Ray workers with gloo, node agents run by recovery, a checkpoint
every ``--every`` steps) on a local Ray cluster started for it. Policies:

- ``none``: no failure (the baseline of the final loss);
- ``heal``: rank ``workers - 1`` SIGKILLed just before step ``--fault-at``; the survivors keep
  their live state, the replacement copies it, the job continues from the step reached;
- ``reload``: the same kill, reload in place (survivors keep their processes, everyone restores
  the newest committed checkpoint);
- ``heal_spare``: ``heal`` with one hot spare (``spares=1``), which replaces the lost rank
  without a boot (give it ``--step-sleep`` to boot before the fault).

Each policy runs with every seed of ``--seeds`` (the model's initialisation and data). Printed:
per policy the median over the seeds (each seed's figure in brackets) of the final loss (the
mean of the ranks' losses at the last step: the loss of the whole global batch), the steps lost
as the run records them, the steps redone (counted from the fault: the kill comes before step
``fault_at``, so ``fault_at - 1`` had been applied), the detection -> first resumed step time,
the bytes healed or restored, the job's time (its events ``started`` to ``finished``) and the
wall time of the run (with the local Ray cluster's start and stop).

    python benchmarks/bench_heal.py                       # 2 workers, 3 seeds
    python benchmarks/bench_heal.py --seeds 0 --steps 24 --fault-at 13 --width 64   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

POLICIES = ("none", "heal", "reload", "heal_spare")


def run_one(policy: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    import recovery
    from recovery.demo import KILL, DemoTrainer, Fault

    spares = 1 if policy.endswith("_spare") else 0
    acts = policy.removesuffix("_spare")
    faults = () if policy == "none" else (Fault(KILL, args.fault_at, rank=args.workers - 1),)
    trainer = DemoTrainer(steps=args.steps, width=args.width, depth=args.depth, seed=seed, step_sleep_s=args.step_sleep,
                          faults=faults)
    run_dir = tempfile.mkdtemp(prefix=f"bench-heal-{policy}-", dir=args.root)
    ncpu = os.cpu_count() or 2
    t0 = time.perf_counter()
    try:
        result = recovery.run(
            trainer, num_workers=args.workers, storage=run_dir, policy="reload" if policy == "none" else acts,
            max_failures=2, num_cpus=ncpu, ray_init_options={"log_to_driver": False},
            echo=sys.stderr if args.verbose else None, metrics=None,
            resources_per_worker={"CPU": min(1.0, ncpu / (args.workers + 2))}, every_n_steps=args.every,
            keep_last=2, startup_timeout_s=300, backoff_s=args.backoff, placement_timeout_s=60,
            agent_memory_bytes=args.agent_memory_gib << 30, spares=spares)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    losses = [r["loss"] for r in result.returns]
    finished = [e.t for e in result.events if e.kind == "finished"]
    row: dict[str, Any] = {"policy": policy, "seed": seed, "wall_s": time.perf_counter() - t0,
                           "job_s": finished[-1] if finished else None,
                           "final_loss": sum(losses) / len(losses), "attempts": result.attempts,
                           "steps_lost": 0, "steps_redone": 0}
    if result.failures:
        rec = result.failures[0]
        row.update(acted=rec.policy, kind=rec.failure.kind, continued_after=rec.restore_step,
                   steps_lost=rec.steps_lost, steps_redone=args.fault_at - 1 - (rec.restore_step or -1),
                   resumed_after_s=rec.resumed_after_s, detected_after_s=rec.failure.detected_after_s,
                   copied_bytes=sum(rec.restore_bytes.values()), restore_s=rec.restore_s,
                   restored_from=rec.restored_from)
    return row


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def _cell(rows: list[dict[str, Any]], key: str, fmt: str) -> str:
    med = _median(rows, key)
    if med is None:
        return "-"
    each = ", ".join(format(r[key], fmt) if r.get(key) is not None else "?" for r in rows)
    return f"{format(med, fmt)} ({each})" if len(rows) > 1 else format(med, fmt)


def report(rows: list[dict[str, Any]]) -> str:
    by = {p: [r for r in rows if r["policy"] == p] for p in POLICIES}
    by = {p: rs for p, rs in by.items() if rs}
    head = "| figure | " + " | ".join(by) + " |"
    lines = [head, "| --- |" + " ---: |" * len(by)]
    for label, key, fmt in (("final loss", "final_loss", ".5f"), ("steps lost (recorded)", "steps_lost", "d"),
                            ("steps redone (from the fault)", "steps_redone", "d"),
                            ("detection -> first resumed step, s", "resumed_after_s", ".2f"),
                            ("state healed / restored, MB", "copied_mb", ".2f"),
                            ("heal copy / restore (slowest rank), s", "restore_s", ".3f"),
                            ("job: started -> finished event, s", "job_s", ".1f"),
                            ("wall time of the run (with Ray's start and stop), s", "wall_s", ".1f")):
        lines.append(f"| {label} | " + " | ".join(_cell(rs, key, fmt) for rs in by.values()) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--fault-at", type=int, default=23)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--step-sleep", type=float, default=0.02)
    p.add_argument("--backoff", type=float, default=0.5, help="RunConfig.backoff_s")
    p.add_argument("--agent-memory-gib", type=int, default=1)
    p.add_argument("--root", default=None, help="where the runs' storage goes (a temp dir each)")
    p.add_argument("--json", default=None, help="write every run's row here")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for policy in args.policies.split(","):
            if policy not in POLICIES:
                p.error(f"unknown policy {policy!r}; known: {POLICIES}")
            row = run_one(policy, seed, args)
            row["copied_mb"] = row.get("copied_bytes", 0) / 1e6 if row.get("copied_bytes") is not None else None
            rows.append(row)
            print(json.dumps(row, default=str), file=sys.stderr, flush=True)
    print(report(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
