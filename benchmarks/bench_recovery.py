#!/usr/bin/env python
"""What a failure costs under the coordinator: detection latency per failure kind, time from
failure to the first resumed step, steps lost, and restore time from each tier.

Each scenario is one ``recovery.run`` of :class:`recovery.demo.DemoTrainer` (an MLP trained
data-parallel on ``--workers`` Ray workers with gloo) on a local Ray cluster, with the node
agent run by recovery, checkpoints every ``--every`` steps, and one injected fault:

- ``kill``: SIGKILL of a worker process -> restore from agent memory, in place (only the lost
  worker is replaced), by the defaults: the node's warm standby (``standby=1``, holding no
  resources, booted once the first step is trained; give it time to boot before the fault with
  ``--step-sleep``; ``standby_taken`` in the row says whether it replaced the lost worker)
  takes the lost rank; ``kill_boot``: the same with no standby (``standby=0``: the replacement
  is a new process that boots); ``kill_restart_all``: every worker replaced (the old way);
  ``kill_spare``: in place with one hot spare and no standby (``spares=1``: the replacement
  booted ahead in a bundle of its own; ``spare_taken``);
- ``hang``: a worker stops making progress -> detected after ``--hang-timeout`` s of silence;
- ``kill_agent``: the node agent dies, then a worker -> the agent's memory is gone, restore
  from storage;
- ``kill_coordinator``: the coordinator actor is killed (Ray restarts it) -> nothing to
  restore; the figure is how long training went on without a commit.
- ``node_loss``: a two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``, one
  worker per node, agents replicating to each other with ``agent_replicas=1``); once the last
  checkpoint before ``--fault-at`` is committed and its replicas arrived (``replica_lag_s``:
  how long after the commit; ``--kill-before-replicated`` does not wait), the second node's
  raylet and every process on it are SIGKILLed.
  Detection latency is from that kill; the job shrinks to one worker, which restores its own
  part from agent memory and the lost node's part from the replica its agent holds (the peer
  tier), resharded 2 -> 1.
- ``raytrain_kill`` (the peer, ``pip install -e '.[bench]'``): the ``kill`` scenario under
  Ray Train's ``TorchTrainer`` with ``FailureConfig``, checkpointing the way its guide does
  (rank 0 ``torch.save`` + ``ray.train.report``; every rank ``torch.load`` on restart); printed
  side by side with ``kill``.
- ``storage_down``: the run directory is moved away at step ``--fault-at`` (every write and
  read of storage fails) and put back ``--outage-steps`` later: detected after
  ``storage_failure_limit`` (3) failed checkpoints in a row, counted from the outage; training
  never stops.

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
from pathlib import Path
from typing import Any

SCENARIOS = ("kill", "kill_boot", "kill_restart_all", "kill_spare", "hang", "kill_agent", "kill_coordinator", "node_loss", "storage_down")
PEERS = ("raytrain_kill",)


def run_one(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    if kind == "node_loss":
        return run_node_loss(args)
    if kind == "raytrain_kill":
        from bench_recovery_raytrain import run_raytrain_kill  # the peer, side by side

        return run_raytrain_kill(args)
    from recovery import launcher
    from recovery.demo import HANG, KILL, KILL_AGENT, KILL_COORDINATOR, STORAGE_DOWN, STORAGE_UP, DemoTrainer, Fault

    at = args.fault_at
    every = args.every
    faults: list[Fault] = []
    in_place = not kind.endswith("_restart_all")  # the old way: every worker restarted
    spares = 1 if kind.endswith("_spare") else 0
    standby = 0 if kind.endswith(("_spare", "_boot", "_restart_all")) else 1  # (restart all: none to use)
    scenario, kind = kind, kind.removesuffix("_restart_all").removesuffix("_spare").removesuffix("_boot")
    if kind == "kill":
        faults = [Fault(KILL, at, rank=args.workers - 1)]
    elif kind == "hang":
        faults = [Fault(HANG, at, rank=args.workers - 1)]
    elif kind == "kill_agent":
        faults = [Fault(KILL_AGENT, at - 1, rank=0), Fault(KILL, at, rank=args.workers - 1)]
    elif kind == "kill_coordinator":
        faults = [Fault(KILL_COORDINATOR, at, rank=0)]
    elif kind == "storage_down":
        faults = [Fault(STORAGE_DOWN, at, rank=0), Fault(STORAGE_UP, at + args.outage_steps, rank=0)]
        every = args.storage_every
    trainer = DemoTrainer(steps=args.steps, width=args.width, depth=args.depth, step_sleep_s=args.step_sleep,
                          faults=tuple(faults))
    run_dir = tempfile.mkdtemp(prefix=f"bench-recovery-{kind}-", dir=args.root)
    ncpu = os.cpu_count() or 2
    t0 = time.perf_counter()
    try:
        result = launcher.run(
            trainer, num_workers=args.workers, storage=run_dir, policy="reload", max_failures=3,
            num_cpus=ncpu, ray_init_options={"log_to_driver": False}, echo=sys.stderr if args.verbose else None,
            resources_per_worker={"CPU": min(1.0, ncpu / (args.workers + 2))},  # room for a spare
            every_n_steps=every, keep_last=2, hang_timeout_s=args.hang_timeout, startup_timeout_s=300,
            backoff_s=args.backoff, placement_timeout_s=60, agent_memory_bytes=args.agent_memory_gib << 30,
            in_place=in_place, spares=spares, standby=standby, metrics=None)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    row: dict[str, Any] = {"scenario": scenario, "wall_s": time.perf_counter() - t0, "attempts": result.attempts,
                           "checkpoints": len(result.checkpoints),
                           "stall_s": statistics.median([c["stall_s"] for c in result.checkpoints
                                                         if c.get("stall_s") is not None] or [float("nan")])}
    add_failure(row, result)
    row["spare_taken"] = any(e.kind == "spare" and "replaced by the hot spare" in e.message for e in result.events)
    row["standby_taken"] = any(e.kind == "spare" and "replaced by the warm standby" in e.message for e in result.events)
    row["kept_in_place"] = len([e for e in result.events if e.kind == "workers_started"][-1].fields.get("kept", []))
    if kind == "storage_down" and result.failures:
        # From the outage (the fault's timestamp, next to the run directory) to the detection.
        down_at = float(Path(run_dir + ".down-at").read_text())
        row["detected_after_s"] = result.failures[0].failure.detected_at - down_at
        row["checkpoints_failed"] = sum(1 for e in result.events if e.kind == "checkpoint_failed")
        os.unlink(run_dir + ".down-at")
    return row


def add_failure(row: dict[str, Any], result: Any) -> None:
    if result.failures:
        r = result.failures[0]
        row.update(kind=r.failure.kind, detected_after_s=r.failure.detected_after_s, action=r.action,
                   restore_step=r.restore_step, restored_from=r.restored_from, restore_s=r.restore_s,
                   restore_bytes=r.restore_bytes, resumed_after_s=r.resumed_after_s, steps_lost=r.steps_lost,
                   world_after=r.world_after)


def run_node_loss(args: argparse.Namespace) -> dict[str, Any]:
    import threading

    import ray
    from ray.cluster_utils import Cluster

    from ckpt import format as fmt
    from ckpt.storage import open_storage
    from recovery import launcher
    from recovery.demo import DemoTrainer

    trainer = DemoTrainer(steps=args.steps, width=args.width, depth=args.depth, step_sleep_s=args.step_sleep)
    run_dir = tempfile.mkdtemp(prefix="bench-recovery-node_loss-", dir=args.root)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    doomed = [cluster.add_node(num_cpus=1) for _ in range(args.workers - 1)][-1]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    killed: dict[str, float] = {}
    done = threading.Event()

    def replicated(step: int) -> bool:
        """Whether every agent holds a committed replica of ``step`` (of the other node's writer)."""
        names = [n for n in ray.util.list_named_actors() if n.startswith("ckpt-agent-")]
        for name in names:
            rows = ray.get(ray.get_actor(name).snapshots.remote(open_storage(run_dir).url), timeout=30)
            if args.verbose:
                print(f"[bench] {name[-12:]} step {step}: " + ", ".join(
                    f"{r['writer']}@{r['step']}{'(replica)' if r['replica'] else ''}={r['state']}" for r in rows),
                    file=sys.stderr)
            if not any(r["replica"] and r["step"] == step and r["state"] == "committed" for r in rows):
                return False
        return bool(names)

    def killer() -> None:
        # Once the checkpoint before --fault-at is committed and its replicas have arrived (they
        # trail the commit: streaming to the peer is slower than writing to local disk), kill.
        storage = open_storage(run_dir)
        target = args.fault_at - args.fault_at % args.every
        committed_at = None
        while not done.wait(0.05):
            steps = fmt.committed_steps(storage)
            if not steps or steps[-1] < target:
                continue
            if committed_at is None:
                committed_at = time.time()
            if args.kill_before_replicated or replicated(steps[-1]):
                pass
            elif time.time() - committed_at > args.replica_wait_s:
                killed["gave_up"] = True
            else:
                continue
            killed["at"] = time.time()
            killed["replica_lag_s"] = killed["at"] - committed_at
            cluster.remove_node(doomed, allow_graceful=False)
            return

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    t0 = time.perf_counter()
    try:
        result = launcher.run(
            trainer, num_workers=args.workers, storage=run_dir, policy="reload", max_failures=3,
            echo=sys.stderr if args.verbose else None,
            resources_per_worker={"CPU": 1.0}, placement_strategy="SPREAD", agent_replicas=1,
            every_n_steps=args.every, keep_last=2, hang_timeout_s=args.hang_timeout, startup_timeout_s=300,
            backoff_s=0.5, placement_timeout_s=30, agent_memory_bytes=args.agent_memory_gib << 30)
    finally:
        done.set()
        t.join()
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(run_dir, ignore_errors=True)
    row: dict[str, Any] = {"scenario": "node_loss", "wall_s": time.perf_counter() - t0, "attempts": result.attempts,
                           "checkpoints": len(result.checkpoints),
                           "stall_s": statistics.median([c["stall_s"] for c in result.checkpoints
                                                         if c.get("stall_s") is not None] or [float("nan")])}
    add_failure(row, result)
    if result.failures and "at" in killed:
        row["after_last_heartbeat_s"] = row.get("detected_after_s")
        row["detected_after_s"] = result.failures[0].failure.detected_at - killed["at"]
        row["replica_lag_s"] = None if killed.get("gave_up") else killed.get("replica_lag_s")
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenarios", default=",".join(SCENARIOS + PEERS),
                   help=f"comma-separated, of {', '.join(SCENARIOS + PEERS)}")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--depth", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--fault-at", type=int, default=23)
    p.add_argument("--hang-timeout", type=float, default=10.0)
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds each step sleeps after it reports")
    p.add_argument("--backoff", type=float, default=0.5, help="RunConfig.backoff_s")
    p.add_argument("--outage-steps", type=int, default=8, help="storage_down: steps until storage is back")
    p.add_argument("--storage-every", type=int, default=2, help="storage_down: checkpoint every this many steps")
    p.add_argument("--agent-memory-gib", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--root", default=None, help="parent of the run directories (default: $TMPDIR)")
    p.add_argument("--json", default=None)
    p.add_argument("--verbose", action="store_true", help="print every recovery event")
    p.add_argument("--replica-wait-s", type=float, default=60.0,
                   help="node_loss: kill anyway if the replicas have not arrived this long after the commit")
    p.add_argument("--kill-before-replicated", action="store_true",
                   help="node_loss: kill as soon as the checkpoint is committed, replicas or not")
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

    print(f"\nmedians over {args.repeat} run(s)\n| fault | detected | detection latency | restored from | restore time | "
          "failure -> first resumed step | steps lost | stall / checkpoint |\n|---|---|---:|---|---:|---:|---:|---:|")
    for kind in args.scenarios.split(","):
        mine = [r for r in rows if r["scenario"] == kind]
        tiers = sorted({str(r.get("restored_from")) for r in mine if r.get("restored_from")})
        kinds = sorted({str(r.get("kind")) for r in mine if r.get("kind")})
        print(f"| {kind} | {', '.join(kinds) or 'nothing'} | {f(med(kind, 'detected_after_s'))} | "
              f"{', '.join(tiers) or '-'} | {f(med(kind, 'restore_s'))} | {f(med(kind, 'resumed_after_s'))} | "
              f"{f(med(kind, 'steps_lost'), '')} | {f(med(kind, 'stall_s') and 1e3 * med(kind, 'stall_s'), ' ms')} |")
    ours, peer = [r for r in rows if r["scenario"] == "kill"], [r for r in rows if r["scenario"] == "raytrain_kill"]
    old = [r for r in rows if r["scenario"] == "kill_restart_all"]
    if any(r.get("skipped") for r in peer):
        print(f"\nraytrain_kill skipped: {peer[0]['skipped']}")
    elif ours and peer:
        def m(rs: list[dict[str, Any]], get: Any) -> float | None:
            xs = [get(r) for r in rs if r.get("restore_s") is not None]
            xs = [x for x in xs if x is not None]
            return statistics.median(xs) if xs else None

        def k2r(rs: list[dict[str, Any]]) -> float | None:
            return m(rs, lambda r: (r.get("detected_after_s") or 0) + r["resumed_after_s"]
                     if r.get("resumed_after_s") is not None else None)

        def three(get: Any) -> tuple[float | None, float | None, float | None]:
            return m(ours, get), m(old, get), m(peer, get)

        rows_side = [("worker SIGKILLed -> first resumed step", k2r(ours), k2r(old),
                      m(peer, lambda r: r.get("kill_to_resumed_s"))),
                     ("detection -> first resumed step", *three(lambda r: r.get("resumed_after_s"))),
                     ("restore time (slowest rank)", *three(lambda r: r.get("restore_s"))),
                     ("training stall per checkpoint", *three(lambda r: r.get("stall_s"))),
                     # From the fault step for all (ours counts from heartbeats otherwise).
                     ("steps redone (fault step - restored step - 1)",
                      *three(lambda r: args.fault_at - r["restore_step"] - 1))]
        print("\nside by side with Ray Train (same model, workers, checkpoint interval and fault step)")
        print("| figure | recovery.run (reload in place) | recovery.run (restart all) | Ray Train (TorchTrainer) | "
              "restart all / in place | Ray Train / in place |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, a, b, c in rows_side:
            unit = "" if name.startswith("steps") else " s"
            r1 = f"{b / a:.1f}x" if a and b else "-"
            r2 = f"{c / a:.1f}x" if a and c else "-"
            print(f"| {name} | {f(a, unit)} | {f(b, unit)} | {f(c, unit)} | {r1} | {r2} |")
    if ours and any(r["scenario"] in ("kill_boot", "kill_spare") for r in rows):
        print("\nin place: the warm standby (the default) vs a replacement that boots vs a hot spare")
        print("| figure | warm standby | boot | hot spare | boot / standby | spare / standby |\n|---|---:|---:|---:|---:|---:|")
        for name, key in (("detection -> first resumed step", "resumed_after_s"), ("restore time (slowest rank)",
                                                                                  "restore_s")):
            a, b, c = med("kill", key), med("kill_boot", key), med("kill_spare", key)
            print(f"| {name} | {f(a)} | {f(b)} | {f(c)} | {f'{b / a:.1f}x' if a and b else '-'} | "
                  f"{f'{c / a:.1f}x' if a and c else '-'} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows}, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
