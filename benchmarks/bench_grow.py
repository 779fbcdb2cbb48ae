#!/usr/bin/env python
"""Growing back after a node loss, three ways side by side on the same job: ``heal`` grows in place
(the survivor keeps its process and live state, the new rank copies it); ``reload`` grows in
place too (the survivor keeps its process, the new rank boots in a placement group reserved for
it, everyone restores the checkpoint just committed); ``reload:restart`` is reload with
``in_place=False``, every worker restarted (what reload did before it grew in place).

A two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``, Ray's health checks
shortened so that a lost node's bundles are placed again within seconds), one worker per node
(:class:`recovery.demo.DemoTrainer`, gloo, node agents), a checkpoint every 5 steps
(``--every-n-steps``). The second node is killed once step 10 is committed; the job goes on with
one worker; a new node joins 20 committed steps later, and the job grows back to two: ``reload``
at a commit, ``heal`` at the driver's poll that sees the new rank up (it restores no checkpoint).
Printed per policy, medians over ``--repeat`` runs (each run in brackets):

- from the moment the policy decides to grow (its ``stopping`` event) to the grown attempt's
  ``workers_started`` (every worker up, the state copied or about to be restored);
- from the commit after which it decided (the reservation of ``reload``/``heal`` in place
  placed in between) to the grown world's first commit;
- "the pause": from the decision (the commit of ``reload``, the poll of ``heal``) to the grown
  world's first step (every rank's first step reached the coordinator: the launcher's
  ``resumed`` event with ``grow``), which every rank waits through;
- "the whole wait": from the moment the job found room for the new rank (its bundle placed, or
  the new rank booting ahead in it) to that first step: with the new rank booted ahead, the
  pause above is short and this is the whole wait, training going on meanwhile;
- from that decision to the first checkpoint the grown world commits (it trained and saved again:
  the restore of ``reload`` included);
- whether the survivor's process was kept (its pid);
- steps redone by the grown attempt (its first step against the step the job had reached);
- "the driver's longest stall": the longest time between two of the driver's polls (beyond
  ``poll_interval_s``) from the node loss's recovery to the grow decision, while the job trains
  on one rank: what the detection of another failure would wait on (a node agent started beside
  a spare booting, a reservation asked for).

    python benchmarks/bench_grow.py --repeat 3 --json benchmarks/results/grow-2nodes-3rep.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ray
from ray import cluster_utils

import recovery
from recovery.demo import DemoTrainer
from recovery.launcher import Supervisor
from tests.helpers import QUICK_NODE_DEATH, lose_a_node_then_add_one


def one_run(method: str, steps: int, width: int = 32, depth: int = 2, every: int = 5) -> dict[str, Any]:
    policy, _, how = method.partition(":")
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "resources": {"slot": 1}, "_system_config": QUICK_NODE_DEATH})
    second = cluster.add_node(num_cpus=1, resources={"slot": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    stop = threading.Event()
    polls: list[float] = []  # when the driver polled the coordinator (the events' clock)
    poll = Supervisor._poll_coordinator

    def timed_poll(self: Supervisor, final: bool = False) -> Any:
        polls.append(self.job.events.now())
        return poll(self, final)

    Supervisor._poll_coordinator = timed_poll  # type: ignore[method-assign]
    try:
        with tempfile.TemporaryDirectory(prefix="bench-grow-") as tmp:
            run = os.path.join(tmp, "run")
            helper = threading.Thread(target=lose_a_node_then_add_one, args=(cluster, second, run, stop), daemon=True)
            helper.start()
            trainer = DemoTrainer(steps=steps, width=width, depth=depth, global_batch=8, step_sleep_s=0.05, log_losses=True)
            try:
                result = recovery.run(
                    trainer, num_workers=2, min_workers=1, storage=run, echo=None, policy=policy, allow_grow=True,
                    resources_per_worker={"CPU": 1.0, "slot": 1}, placement_strategy="SPREAD", every_n_steps=every,
                    keep_last=None, heartbeat_interval_s=0.1, backoff_s=0.0, settle_timeout_s=30.0,
                    startup_timeout_s=120.0, placement_timeout_s=10.0, agent_memory_bytes=256 << 20,
                    agent_timeout_s=4.0, interrupt_timeout_s=30.0, in_place=how != "restart")
            finally:
                stop.set()
                helper.join()
    finally:
        Supervisor._poll_coordinator = poll  # type: ignore[method-assign]
        ray.shutdown()
        cluster.shutdown()
    started = [e for e in result.events if e.kind == "workers_started"]
    grown = started[-1]
    stops = [e for e in result.events if e.kind == "stopping" and "grow back" in e.message]
    if grown.fields["world_size"] != 2 or not stops:
        return {"grew": False, "sizes": [e.fields["world_size"] for e in started]}
    before = started[-2]
    log = result.returns[0]["losses"]
    first = grown.fields["heal"]["step"] + 1 if grown.fields.get("heal") else grown.fields["restore_step"] + 1
    reached = max(s for s, a in zip(log["steps"], log["attempts"]) if a == before.fields["attempt"])
    # The first checkpoint the grown world committed (both writers): it trained and saved again.
    again = next(e for e in result.events if e.kind == "checkpoint" and e.t > grown.t and e.fields.get("writers") == 2)
    # The commit after which the policy decided (a reservation, if any, was placed between the two).
    trigger = [e for e in result.events if e.kind == "checkpoint" and e.t <= stops[-1].t][-1]
    reserved = [e for e in result.events if e.kind == "resized" and "reserved" in e.fields]
    resumed = [e for e in result.events if e.kind == "resumed" and e.fields.get("grow")]
    # When the job found room for the new rank: the bundles placed (reserved, or a lost node's placed
    # again), or the new rank booting ahead there, whichever it said first; else its decision.
    found = [e for e in result.events if e.kind == "resized" and ("reserved" in e.fields or "ahead" in e.fields)]
    # The driver's polls while one rank trained on (from the shrunk attempt's start to the decision).
    between = [t for t in polls if before.t <= t <= stops[-1].t]
    stall = max((b - a for a, b in itertools.pairwise(between)), default=0.0)
    return {"grew": True, "grow_to_started_s": round(grown.t - stops[-1].t, 3),
            "commit_to_decision_s": round(stops[-1].t - trigger.t, 3),
            # the commit seen -> every rank's first step of the grown world (the launcher's event)
            "commit_to_first_step_s": round(resumed[-1].fields["seconds"], 3) if resumed else None,
            "room_to_first_step_s": round(resumed[-1].t - (found or stops)[0].t, 3) if resumed else None,
            "booted_ahead": any("ahead" in e.fields for e in found),
            "commit_to_first_commit_s": round(again.t - trigger.t, 3),
            "reserve_s": round(reserved[-1].t - trigger.t, 3) if reserved else None,
            "grow_to_first_commit_s": round(again.t - stops[-1].t, 3), "first_commit_step": again.fields["step"],
            "survivor_kept": grown.fields["pids"][0] in before.fields["pids"],
            "steps_redone": max(0, reached + 1 - first), "driver_stall_s": round(stall, 3), "policy": method}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--policies", default="heal,reload,reload:restart")
    p.add_argument("--width", type=int, default=32, help="the MLP's width")
    p.add_argument("--depth", type=int, default=2, help="its hidden layers (each: a weight and a bias, 2 AdamW moments each)")
    p.add_argument("--every-n-steps", type=int, default=5, help="steps between checkpoints (heal grows between them)")
    p.add_argument("--json", help="write every run's figures here")
    a = p.parse_args(argv)
    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(a.repeat):
        for policy in a.policies.split(","):  # interleaved: the machine's noise falls on both
            runs.setdefault(policy, []).append(r := one_run(policy, a.steps, a.width, a.depth, a.every_n_steps))
            print(policy, r, flush=True)
    out = {}
    for policy, rs in runs.items():
        grew = [r for r in rs if r["grew"]]
        times = [r["grow_to_started_s"] for r in grew]
        commits = [r["grow_to_first_commit_s"] for r in grew]
        whole = [r["commit_to_first_commit_s"] for r in grew]
        firsts = [r["commit_to_first_step_s"] for r in grew if r["commit_to_first_step_s"] is not None]
        rooms = [r["room_to_first_step_s"] for r in grew if r["room_to_first_step_s"] is not None]
        out[policy] = {"runs": rs, "grew": len(grew), "grow_to_started_median_s": statistics.median(times) if times else None,
                       "grow_to_first_commit_median_s": statistics.median(commits) if commits else None,
                       "commit_to_first_commit_median_s": statistics.median(whole) if whole else None,
                       "commit_to_first_step_median_s": statistics.median(firsts) if firsts else None,
                       "room_to_first_step_median_s": statistics.median(rooms) if rooms else None,
                       "survivor_kept": sum(r["survivor_kept"] for r in grew),
                       "steps_redone": [r["steps_redone"] for r in grew],
                       "driver_stall_median_s": statistics.median(r["driver_stall_s"] for r in grew) if grew else None}
        print(f"{policy}: grew in {len(grew)} of {len(rs)} runs; decision -> workers started "
              f"{out[policy]['grow_to_started_median_s']} s (median; {times}), -> the grown world's first commit "
              f"{out[policy]['grow_to_first_commit_median_s']} s ({commits}); from the commit that triggered it "
              f"{out[policy]['commit_to_first_commit_median_s']} s ({whole}); to the grown world's first step "
              f"{out[policy]['commit_to_first_step_median_s']} s ({firsts}); from the room found to that step "
              f"{out[policy]['room_to_first_step_median_s']} s ({rooms}); survivor kept in "
              f"{out[policy]['survivor_kept']}; steps redone {out[policy]['steps_redone']}; the driver's longest stall "
              f"between polls {out[policy]['driver_stall_median_s']} s ({[r['driver_stall_s'] for r in grew]})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
