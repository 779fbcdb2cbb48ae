#!/usr/bin/env python
"""What a failure costs under the coordinator: detection latency per failure kind, time from
failure to the first resumed step, steps lost, and restore time from each tier.

Each scenario is one ``recovery.run`` of :class:`recovery.demo.DemoTrainer` (an MLP trained
data-parallel on ``--workers`` Ray workers with gloo) on a local Ray cluster, with the node
agent run by recovery, checkpoints every ``--every`` steps, and one injected fault:

- ``kill``: SIGKILL of a worker process -> restore from agent memory;
- ``hang``: a worker stops making progress -> detected after ``--hang-timeout`` s of silence;
- ``kill_agent``: the node agent dies, then a worker -> the agent's memory is gone, restore
  from storage;
- ``kill_coordinator``: the coordinator actor is killed (Ray restarts it) -> nothing to
  restore; the figure is how long training went on without a commit.

Default state: width 4096, depth 5 -> 84M parameters, 1.0 GB of parameters + AdamW moments per
worker. Figures are medians over ``--repeat`` runs of each scenario.

    python benchmarks/bench_recovery.py                      # ~1 GB of state, 3 repeats
    python benchmarks/bench_recovery.py --width 512 --repeat 1 --steps 24   # smoke test
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

SCENARIOS = ("kill", "hang", "kill_agent", "kill_coordinator")


def run_one(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    from recovery import launcher
    from recovery.demo import HANG, KILL, KILL_AGENT, KILL_COORDINATOR, DemoTrainer, Fault

    at = args.fault_at
    faults: list[Fault] = []
    if kind == "kill":
        faults = [Fault(KILL, at, rank=args.workers - 1)]
    elif kind == "hang":
        faults = [Fault(HANG, at, rank=args.workers - 1)]
    elif kind == "kill_agent":
        faults = [Fault(KILL_AGENT, at - 1, rank=0), Fault(KILL, at, rank=args.workers - 1)]
    elif kind == "kill_coordinator":
        faults = [Fault(KILL_COORDINATOR, at, rank=0)]
    trainer = DemoTrainer(steps=args.steps, width=args.width, depth=args.depth, step_sleep_s=0.0,
                          faults=tuple(faults))
    run_dir = tempfile.mkdtemp(prefix=f"bench-recovery-{kind}-", dir=args.root)
    ncpu = os.cpu_count() or 2
    t0 = time.perf_counter()
    try:
        result = launcher.run(
            trainer, num_workers=args.workers, storage=run_dir, policy="reload", max_failures=3,
            num_cpus=ncpu, ray_init_options={"log_to_driver": False}, echo=None,
            resources_per_worker={"CPU": min(1.0, ncpu / (args.workers + 1))},
            every_n_steps=args.every, keep_last=2, hang_timeout_s=args.hang_timeout, startup_timeout_s=300,
            backoff_s=0.5, placement_timeout_s=60, agent_memory_bytes=args.agent_memory_gib << 30)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    row: dict[str, Any] = {"scenario": kind, "wall_s": time.perf_counter() - t0, "attempts": result.attempts,
                           "checkpoints": len(result.checkpoints),
                           "stall_s": statistics.median([c["stall_s"] for c in result.checkpoints
                                                         if c.get("stall_s") is not None] or [float("nan")])}
    if result.failures:
        r = result.failures[0]
        row.update(kind=r.failure.kind, detected_after_s=r.failure.detected_after_s, action=r.action,
                   restore_step=r.restore_step, restored_from=r.restored_from, restore_s=r.restore_s,
                   restore_bytes=r.restore_bytes, resumed_after_s=r.resumed_after_s, steps_lost=r.steps_lost)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--depth", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--fault-at", type=int, default=23)
    p.add_argument("--hang-timeout", type=float, default=10.0)
    p.add_argument("--agent-memory-gib", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--root", default=None, help="parent of the run directories (default: $TMPDIR)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    params = args.depth * (args.width * args.width + args.width) + args.width + 1
    print(f"state per worker: {params / 1e6:.1f}M parameters, {12 * params / 1e9:.2f} GB with AdamW moments; "
          f"{args.workers} workers; checkpoint every {args.every} steps; fault at step {args.fault_at}", flush=True)
    rows: list[dict[str, Any]] = []
    for rep in range(args.repeat):
        for kind in args.scenarios.split(","):
            row = run_one(kind, args)
            row["repeat"] = rep
            rows.append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)

    def med(kind: str, key: str) -> float | None:
        xs = [r[key] for r in rows if r["scenario"] == kind and isinstance(r.get(key), (int, float))]
        return statistics.median(xs) if xs else None

    def f(x: float | None, unit: str = " s") -> str:
        return "-" if x is None else f"{x:.2f}{unit}"

    print()
    print(f"medians over {args.repeat} run(s)")
    print("| fault | detected | detection latency | restored from | restore time | failure -> first resumed step | "
          "steps lost | stall / checkpoint |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    for kind in args.scenarios.split(","):
        mine = [r for r in rows if r["scenario"] == kind]
        tiers = sorted({str(r.get("restored_from")) for r in mine if r.get("restored_from")})
        kinds = sorted({str(r.get("kind")) for r in mine if r.get("kind")})
        print(f"| {kind} | {', '.join(kinds) or 'nothing'} | {f(med(kind, 'detected_after_s'))} | "
              f"{', '.join(tiers) or '-'} | {f(med(kind, 'restore_s'))} | {f(med(kind, 'resumed_after_s'))} | "
              f"{f(med(kind, 'steps_lost'), '')} | {f(med(kind, 'stall_s') and 1e3 * med(kind, 'stall_s'), ' ms')} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows}, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
