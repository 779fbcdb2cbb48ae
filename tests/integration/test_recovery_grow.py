"""Growing back in place on a real local Ray cluster: a job that started with fewer workers than
it wants (the room was taken) grows back once the room returns, into a placement group
reserved for the new ranks beside its own, its worker keeping its process. Under ``reload``
every rank restores the checkpoint just committed; under ``heal`` the new rank copies the
survivor's live state and nothing is redone. The new rank boots ahead, while the job trains on,
and takes its place once up. A job that keeps a hot spare gets a bundle for it in the same group. (After a node loss: test_recovery_nodes.py.)

Asserts what the job ended with (pids, world sizes, steps, parameters), never how long anything
took.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest
import torch

import ckpt
from ckpt import format as fmt
from recovery.demo import DemoTrainer
from tests.integration._ray import run_job

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.isdir("/dev/shm"),
                                reason="node agents need Linux POSIX shared memory")

FAST = {"heartbeat_interval_s": 0.1, "backoff_s": 0.0, "placement_timeout_s": 2.0, "settle_timeout_s": 20.0,
        "startup_timeout_s": 120.0, "agent_memory_bytes": 256 << 20, "echo": None}


class _Holder:
    def ping(self) -> bool:
        return True


def _take_the_room_until_a_commit(run: str, slots: int) -> threading.Thread:
    """Hold ``slots`` of the cluster's 4 slots until the job has committed two checkpoints (so
    that it knows how often it checkpoints when the room returns)."""
    holder = ray.remote(num_cpus=0)(_Holder).options(resources={"slot": slots}).remote()
    ray.get(holder.ping.remote(), timeout=60)

    def free_after_a_commit() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if os.path.isdir(run) and len(fmt.committed_steps(ckpt.open_storage(run))) >= 2:
                break
            time.sleep(0.05)
        ray.kill(holder)

    t = threading.Thread(target=free_after_a_commit, daemon=True)
    t.start()
    return t


def _started(result) -> list[dict]:
    return [e.fields for e in result.events if e.kind == "workers_started"]


@pytest.mark.parametrize(("policy", "spares"), [("reload", 0), ("heal", 0), ("reload", 1)])
def test_a_job_that_started_smaller_grows_back_in_place_keeping_its_worker(cluster, tmp_path, policy, spares):
    steps = 120  # (the new rank boots in ~3-4 s on 2 loaded cores, while the job trains on: time to spare)
    trainer = DemoTrainer(steps=steps, width=32, depth=2, global_batch=8, step_sleep_s=0.05, return_state=True,
                          log_losses=True)
    helper = _take_the_room_until_a_commit(str(tmp_path / "run"), slots=3)  # room for 1 of 2 workers
    result = run_job(trainer, tmp_path, FAST, num_workers=2, min_workers=1, allow_grow=True, policy=policy,
                     spares=spares)
    helper.join(5)
    for e in result.events:  # shown if the assertions below fail
        if e.kind in ("restore_plan", "stopping", "resized", "workers_started", "spare"):
            print(e.kind, e.message)
    alone, grown = _started(result)
    assert (alone["world_size"], grown["world_size"], result.world_size) == (1, 2, 2)
    assert grown["kept"] == [0] and grown["pids"][0] == alone["pids"][0]  # the worker's own process
    (reserved,) = [e.fields for e in result.events if e.kind == "resized" and "reserved" in e.fields]
    assert reserved["reserved"] == 1 + spares  # a bundle for the hot spare too: it had no room at the start
    # a checkpoint every few tenths of a second: the new rank booted ahead while the job trained on
    (ahead,) = [e.fields for e in result.events if e.kind == "resized" and "ahead" in e.fields]
    assert ahead["ahead"] == 1
    (took,) = [e.fields for e in result.events if e.kind == "spare" and "rank" in e.fields]
    assert took["rank"] == 1 and took["pid"] == grown["pids"][1]
    assert took["bundle"] in ((1, 2) if spares else (1,))  # one of the reserved group's: whichever came up first
    if spares:  # and the job's own hot spare in the other (the one taken may be taken before it says it is ready)
        ready = {e.fields["bundle"] for e in result.events if e.kind == "spare" and e.message.startswith("hot spare")}
        assert ready | {took["bundle"]} == {1, 2} and ready - {took["bundle"]}
    (growing,) = [e.fields for e in result.events if e.kind == "resized" and e.fields.get("grow")]
    assert growing["policy"] == policy and growing["bundles"] == {1: took["bundle"]}  # (numbered after the first)
    assert not result.failures
    logs = [r["losses"] for r in result.returns]
    assert all(log["steps"] == list(range(steps)) for log in logs)  # every step once, on both ranks
    if policy == "heal":
        at = grown["heal"]["step"]
        assert grown["heal"]["source"] == 0 and grown["heal"]["receivers"] == [1] and grown["restore_step"] is None
        # grown at the driver's poll that saw the new rank up, not at the next checkpoint
        kinds = [(e.kind, e.fields) for e in result.events]
        up = max(i for i, (k, f) in enumerate(kinds) if k == "spare" and f.get("bundle") == took["bundle"]
                 and "rank" not in f and "booted" not in f)
        plan = next(i for i, (k, f) in enumerate(kinds) if k == "restore_plan" and f.get("grow"))
        assert up < plan and not [k for k, _ in kinds[up:plan] if k == "checkpoint"]
    else:
        at = grown["restore_step"]
        assert at is not None and at % 5 == 0 and grown["heal"] is None
    assert logs[0]["attempts"] == [0] * (at + 1) + [1] * (steps - at - 1)  # nothing redone
    (resumed,) = [e.fields for e in result.events if e.kind == "resumed" and e.fields.get("grow")]
    assert resumed["step"] > at and resumed["seconds"] > 0  # the grown world's first step, and when
    assert [(r["world_size"], r["start"]) for r in result.returns] == [(2, at + 1)] * 2
    torch.testing.assert_close(result.returns[0]["state"], result.returns[1]["state"], rtol=0, atol=0)
    # the same parameters as a run with 1 worker up to that step and 2 after it
    expected = trainer.reference(world=1, resized=((at + 1, 2),))
    for k, v in expected.items():
        torch.testing.assert_close(result.returns[0]["state"][k], v, rtol=1e-5, atol=1e-7)
