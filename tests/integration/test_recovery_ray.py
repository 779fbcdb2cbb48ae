"""The coordinator, agents and workers on a real local Ray cluster (one per module, 2 CPUs and
4 "slot" resources), with real failures: a worker process killed with SIGKILL, a worker that
stops making progress, the coordinator actor killed, a worker lost with no room to replace it.

Every test asserts what the job ended with (parameters, steps, world size, what storage holds),
never how long anything took.
"""

from __future__ import annotations

import os
import random
import sys

import pytest
import torch
from prometheus_client import CollectorRegistry

import ckpt
from ckpt import format as fmt
from recovery.demo import HANG, KILL, KILL_AGENT, KILL_COORDINATOR, TAKE_SLOT, DemoTrainer, Fault
from recovery.detect import AGENT_DIED, WORKER_DIED
from recovery.detect import HANG as HANG_FAILURE
from tests.integration._ray import run_job

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.isdir("/dev/shm"),
                                reason="node agents need Linux POSIX shared memory")

FAST = {"heartbeat_interval_s": 0.1, "backoff_s": 0.0, "placement_timeout_s": 5.0, "settle_timeout_s": 20.0,
        "startup_timeout_s": 120.0, "agent_memory_bytes": 256 << 20, "echo": None}


def _run(trainer, tmp_path, **kw):
    return run_job(trainer, tmp_path, FAST, **kw)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_killed_worker_resumes_from_the_newest_checkpoint_bit_exact(cluster, tmp_path):
    # A random step whose checkpoint (the previous multiple of 5) every rank finished staging.
    kill_at = random.Random(os.environ.get("RECOVERY_TEST_SEED", "5")).choice([13, 14, 18, 19, 23, 24])
    trainer = DemoTrainer(steps=30, width=64, depth=2, global_batch=16, step_sleep_s=0.02, return_state=True,
                          faults=(Fault(KILL, kill_at, rank=1),))
    metrics = CollectorRegistry()
    result = _run(trainer, tmp_path, num_workers=2, max_failures=2, metrics=metrics)
    expected = 5 * ((kill_at - 1) // 5)
    assert len(result.failures) == 1, [(e.kind, e.message) for e in result.events]  # what else failed
    (rec,) = result.failures
    assert rec.failure.kind == WORKER_DIED and rec.failure.ranks == (1,), rec.failure
    assert rec.restore_step == expected, (kill_at, rec)
    assert [r["start"] for r in result.returns] == [expected + 1] * 2
    assert [r["attempt"] for r in result.returns] == [1, 1] and result.attempts == 2
    # restored from the agents' memory, where every writer's snapshot was
    assert rec.restore_bytes.get("agent memory", 0) > 0 and rec.restore_bytes.get("storage", 0) == 0, rec
    assert rec.restored_from == "agent memory"
    # bit-identical to a run that never failed
    assert _equal(result.returns[0]["state"], trainer.reference(world=2))
    storage = ckpt.open_storage(str(tmp_path / "run"))
    assert fmt.committed_steps(storage) == [0, 5, 10, 15, 20, 25]
    assert all(c["stall_s"] is not None for c in result.checkpoints if c["step"] > expected)
    assert all(c["agents_told"] == 1 for c in result.checkpoints)  # the node's agent told of each commit
    kinds = [e.kind for e in result.events]
    for kind in ("failure", "stopping", "restore_plan", "workers_started", "restored", "resumed", "finished"):
        assert kind in kinds
    # the same facts as Prometheus series
    sample = metrics.get_sample_value
    assert sample("ckpt_recovery_failures_detected_total", {"kind": WORKER_DIED}) == 1
    assert sample("ckpt_recovery_restore_seconds_count", {"tier": "agent memory"}) == 1
    assert sample("ckpt_recovery_restore_bytes_total", {"tier": "agent memory"}) == rec.restore_bytes["agent memory"]
    assert sample("ckpt_recovery_resume_seconds_count") == 1
    assert sample("ckpt_recovery_steps_lost_total") == max(0, rec.steps_lost)  # (from the last heartbeat seen)
    assert sample("ckpt_recovery_checkpoints_total", {"outcome": "committed"}) == 6
    assert sample("ckpt_recovery_last_committed_step") == 25
    assert sample("ckpt_recovery_world_size") == 2


def test_a_node_agent_run_outside_the_job_is_told_of_each_commit_through_a_worker(cluster, tmp_path):
    """``agent="unix://..."`` (a DaemonSet's agent): the coordinator tells it of each commit
    through one worker of its node, so it reads the commit point once instead of polling."""
    from tests.helpers import local_agent

    trainer = DemoTrainer(steps=12, width=32, depth=2, global_batch=8, step_sleep_s=0.02, return_state=True)
    with local_agent(tmp_path, "extagent") as (daemon, _shm):
        result = _run(trainer, tmp_path, num_workers=2, max_failures=0, agent=f"unix://{tmp_path}/a.sock")
        told = set(daemon.agent._told_runs)
    assert [c["step"] for c in result.checkpoints] == [0, 5, 10]
    assert all(c["agents_told"] == 1 for c in result.checkpoints)  # one node: one worker told
    assert told == {ckpt.open_storage(str(tmp_path / "run")).url}
    assert _equal(result.returns[0]["state"], trainer.reference(world=2))


def test_hung_worker_is_detected_and_the_job_recovers(cluster, tmp_path):
    trainer = DemoTrainer(steps=20, width=32, depth=2, global_batch=8, step_sleep_s=0.02, return_state=True,
                          faults=(Fault(HANG, 13, rank=1),))
    result = _run(trainer, tmp_path, num_workers=2, hang_timeout_s=2.0)
    (rec,) = result.failures
    # rank 1 sleeps; rank 0 waits for it in the gradient all-reduce: both stop progressing
    assert rec.failure.kind == HANG_FAILURE and set(rec.failure.ranks) <= {0, 1}, rec.failure
    assert rec.failure.last_step == 12 and rec.restore_step == 10 and rec.steps_lost == 2
    assert [r["start"] for r in result.returns] == [11, 11]
    assert _equal(result.returns[0]["state"], trainer.reference(world=2))


def test_coordinator_killed_while_training_goes_on(cluster, tmp_path):
    trainer = DemoTrainer(steps=40, width=32, depth=2, global_batch=8, step_sleep_s=0.05,
                          faults=(Fault(KILL_COORDINATOR, 8, rank=0),))
    result = _run(trainer, tmp_path, num_workers=2)
    assert result.failures == [] and result.attempts == 1
    assert [r["start"] for r in result.returns] == [0, 0]
    restarted = [e for e in result.events if e.kind == "coordinator" and "restarted" in e.message]
    assert restarted, [e.message for e in result.events]
    # the restarted coordinator committed everything saved after it came back
    storage = ckpt.open_storage(str(tmp_path / "run"))
    assert fmt.committed_steps(storage) == list(range(0, 40, 5))


def test_lost_worker_without_room_continues_on_three_workers_resharded(cluster, tmp_path):
    # Rank 3 first starts an actor that waits for a "slot", then dies: its slot is taken, so the
    # restart finds room for 3 workers only.
    trainer = DemoTrainer(steps=24, width=48, depth=2, global_batch=12, step_sleep_s=0.02, return_state=True,
                          faults=(Fault(TAKE_SLOT, 13, rank=3, resources={"slot": 1}), Fault(KILL, 14, rank=3)))
    try:
        # Restarting everything: in place, the lost worker's bundle stays reserved for its
        # replacement, so a process death never loses room (a node loss does, in place too).
        result = _run(trainer, tmp_path, num_workers=4, min_workers=2, placement_timeout_s=3.0, in_place=False)
    finally:
        try:
            ray.kill(ray.get_actor("slot_taker"))
        except ValueError:
            pass
    (rec,) = result.failures
    assert rec.failure.kind == WORKER_DIED and rec.restore_step == 10
    assert (rec.world_before, rec.world_after, result.world_size) == (4, 3, 3)
    assert [(r["world_size"], r["start"]) for r in result.returns] == [(3, 11)] * 3
    storage = ckpt.open_storage(str(tmp_path / "run"))
    assert fmt.read_manifest(storage, 10).writers == tuple(fmt.writer_name(r) for r in range(4))
    assert fmt.read_manifest(storage, 20).writers == tuple(fmt.writer_name(r) for r in range(3))
    # 4 ranks up to step 10, then 3 (gloo sums 3 or 4 gradients in its own order, so this is
    # compared closely rather than bit for bit).
    at10 = trainer.reference(world=4, steps=11)
    loaded = {k: torch.empty_like(v) for k, v in at10.items()}
    ckpt.load({"model": loaded}, storage, step=10, strict=False)
    for k, v in at10.items():
        torch.testing.assert_close(loaded[k], v, rtol=1e-5, atol=1e-7)
    final = trainer.reference(world=4, resized=((11, 3),))
    for k, v in final.items():
        torch.testing.assert_close(result.returns[0]["state"][k], v, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_killed_agent_restarts_it_and_restores_from_storage(cluster, tmp_path):
    trainer = DemoTrainer(steps=24, width=32, depth=2, global_batch=8, step_sleep_s=0.05, return_state=True,
                          faults=(Fault(KILL_AGENT, 13, rank=0),))
    result = _run(trainer, tmp_path, num_workers=2)
    (rec,) = result.failures
    assert rec.failure.kind == AGENT_DIED and rec.restore_step == 10, rec
    # the snapshots in the dead agent's memory are gone: storage serves the restore, and says why
    assert rec.restore_bytes.get("storage", 0) > 0 and rec.restore_bytes.get("agent memory", 0) == 0, rec
    (fb,) = rec.fallbacks
    assert (fb["tier"], fb["reason"], fb["ranks"], fb["attempt"]) == ("agent memory", "not held", [0, 1], 1), fb
    assert fb["bytes"] == {"storage": rec.restore_bytes["storage"]} and result.restore_fallbacks == [fb]
    (event,) = [e for e in result.events if e.kind == "restore_fallback"]
    assert event.fields["reason"] == "not held" and event.fields["bytes"] == fb["bytes"]
    assert [r["start"] for r in result.returns] == [11, 11]
    assert _equal(result.returns[0]["state"], trainer.reference(world=2))


@pytest.mark.slow
def test_grows_back_when_room_returns(cluster, tmp_path):
    trainer = DemoTrainer(steps=60, width=32, depth=2, global_batch=12, step_sleep_s=0.05,
                          faults=(Fault(TAKE_SLOT, 13, rank=3, resources={"slot": 1}), Fault(KILL, 14, rank=3)))
    import threading

    def free_the_slot():  # room returns a while after the shrink
        import time

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                taker = ray.get_actor("slot_taker")
                ray.get(taker.ping.remote(), timeout=60)
                time.sleep(3)
                ray.kill(taker)
                return
            except ValueError:
                time.sleep(0.2)

    t = threading.Thread(target=free_the_slot, daemon=True)
    t.start()
    result = _run(trainer, tmp_path, num_workers=4, min_workers=2, placement_timeout_s=3.0, allow_grow=True,
                  in_place=False)  # the room is lost by restarting everything (see above)
    t.join(5)
    sizes = [e.fields["world_size"] for e in result.events if e.kind == "workers_started"]
    assert sizes[:2] == [4, 3] and sizes[-1] == 4 and result.world_size == 4, sizes


def _started(result) -> list[dict]:
    return [e.fields for e in result.events if e.kind == "workers_started"]


def test_survivors_keep_their_processes_across_a_reload_in_place(cluster, tmp_path):
    trainer = DemoTrainer(steps=24, width=32, depth=2, global_batch=8, step_sleep_s=0.02, return_state=True,
                          faults=(Fault(KILL, 13, rank=1),))
    result = _run(trainer, tmp_path, num_workers=2, max_failures=1)
    (rec,) = result.failures
    assert rec.failure.kind == WORKER_DIED and rec.restore_step == 10
    first, second = _started(result)
    assert second["kept"] == [0] and second["pids"][0] == first["pids"][0]  # the survivor's process
    assert second["pids"][1] != first["pids"][1]  # the lost rank's replacement
    (stop,) = [e.fields for e in result.events if e.kind == "stopping"]
    assert stop["kept"] == [0] and stop["stuck"] == {}
    assert [r["attempt"] for r in result.returns] == [1, 1] and [r["start"] for r in result.returns] == [11, 11]
    assert _equal(result.returns[0]["state"], trainer.reference(world=2))


def test_a_hang_frees_the_rank_waiting_in_a_collective_and_replaces_the_stuck_one(cluster, tmp_path):
    # rank 1 stops in Python (a sleep no interrupt reaches); rank 0 waits for it inside the
    # gradient all-reduce (C++): rank 0 is freed by the interrupt (its group's sockets shut, no
    # collective timeout waited for) and kept; rank 1 does not stop and is replaced
    trainer = DemoTrainer(steps=20, width=32, depth=2, global_batch=8, step_sleep_s=0.02, return_state=True,
                          faults=(Fault(HANG, 13, rank=1),))
    result = _run(trainer, tmp_path, num_workers=2, hang_timeout_s=2.0, interrupt_timeout_s=3.0)
    (rec,) = result.failures
    assert rec.failure.kind == HANG_FAILURE and rec.restore_step == 10
    (stop,) = [e.fields for e in result.events if e.kind == "stopping"]
    assert stop["kept"] == [0] and set(stop["stuck"]) <= {1}  # named the culprit, or found it stuck
    assert all("sleep" in stack for stack in stop["stuck"].values())  # where it was stuck
    first, second = _started(result)
    assert second["kept"] == [0] and second["pids"][0] == first["pids"][0] and second["pids"][1] != first["pids"][1]
    assert _equal(result.returns[0]["state"], trainer.reference(world=2))


def test_restart_everything_when_asked(cluster, tmp_path):
    trainer = DemoTrainer(steps=16, width=32, depth=2, global_batch=8, step_sleep_s=0.02, return_state=True,
                          faults=(Fault(KILL, 8, rank=0),))
    result = _run(trainer, tmp_path, num_workers=2, max_failures=1, in_place=False)
    first, second = _started(result)
    assert second["kept"] == [] and not set(first["pids"]) & set(second["pids"])
    assert _equal(result.returns[0]["state"], trainer.reference(world=2))


def test_a_second_failure_right_after_a_reload_in_place(cluster, tmp_path):
    # rank 1 dies; in the next attempt the kept rank 0 dies as soon as it resumes: both are
    # replaced in turn, and the job still ends bit-exact
    trainer = DemoTrainer(steps=24, width=32, depth=2, global_batch=8, step_sleep_s=0.02, return_state=True,
                          faults=(Fault(KILL, 13, rank=1), Fault(KILL, 11, rank=0, attempt=1)))
    result = _run(trainer, tmp_path, num_workers=2, max_failures=2)
    assert [(r.failure.kind, r.failure.ranks, r.failure.attempt) for r in result.failures] == [
        (WORKER_DIED, (1,), 0), (WORKER_DIED, (0,), 1)]
    _first, second, third = _started(result)
    for e in result.events:  # shown if the assertions below fail
        if e.kind in ("stopping", "restore_plan", "workers_started", "failure"):
            print(e.kind, e.message, e.fields.get("stuck") or "")
    assert second["kept"] == [0] and third["kept"] == [1] and third["pids"][1] == second["pids"][1]
    assert [r["attempt"] for r in result.returns] == [2, 2]
    assert _equal(result.returns[0]["state"], trainer.reference(world=2))


class _KillOnceASpareIsReady:
    """An event stream (``json_events``) that SIGKILLs rank ``rank``'s process once a hot spare
    (``standby``: a warm standby) reports ready, and keeps the events it saw."""

    def __init__(self, rank: int, standby: bool = False) -> None:
        self.rank, self.pids, self.events, self.killed, self.standby = rank, [], [], False, standby

    def write(self, line: str) -> int:
        import json
        import signal

        for text in line.splitlines():
            if not text.strip():
                continue
            e = json.loads(text)
            self.events.append(e)
            if e["kind"] == "workers_started":
                self.pids = e["fields"]["pids"]
            if (e["kind"] == "spare" and "ready" in e["message"] and bool(e["fields"].get("standby")) == self.standby
                    and not self.killed):
                self.killed = True
                os.kill(self.pids[self.rank], signal.SIGKILL)
        return len(line)

    def flush(self) -> None:
        pass


def test_a_hot_spare_replaces_the_lost_rank_and_another_boots_in_its_place(cluster, tmp_path):
    # 2 workers and one spare (3 of the cluster's 4 slots): once the spare is booted, rank 1 is
    # SIGKILLed; the spare's process becomes rank 1 (no process booted for it), the survivor keeps
    # its own, the job ends bit-exact, and a new spare boots in a free bundle after the resume.
    # (long enough for a spare to boot on a loaded machine; the kill comes as soon as it has)
    trainer = DemoTrainer(steps=400, width=32, depth=2, global_batch=8, step_sleep_s=0.05, return_state=True)
    stream = _KillOnceASpareIsReady(rank=1)
    result = _run(trainer, tmp_path, num_workers=2, max_failures=1, spares=1, standby=0, echo=stream, json_events=True)
    (rec,) = result.failures
    assert rec.failure.kind == WORKER_DIED and rec.failure.ranks == (1,)
    spare_events = [e for e in result.events if e.kind == "spare"]
    ready = [e.fields for e in spare_events if "ready" in e.message]
    (taken,) = [e.fields for e in spare_events if "replaced" in e.message]
    assert taken["rank"] == 1 and taken["pid"] == ready[0]["pid"]
    first, second = _started(result)
    assert second["kept"] == [0] and second["pids"] == [first["pids"][0], ready[0]["pid"]]
    booting = [e.fields["booted"] for e in spare_events if e.message.startswith("booting")]
    assert len(booting) >= 2 and booting[1] != booting[0]  # the second spare: in another bundle
    assert [r["attempt"] for r in result.returns] == [1, 1]
    assert _equal(result.returns[0]["state"], trainer.reference(world=2))


def test_a_warm_standby_holding_no_resources_replaces_the_lost_rank_and_another_boots(cluster, tmp_path):
    # 2 workers of 2 slots each take the cluster's 4 slots: no hot spare could boot, the warm
    # standby (the default, one per node) does, holding none. Once it is booted rank 1 is
    # SIGKILLed: the standby's process becomes rank 1 in place, the survivor keeps its own, the
    # job ends bit-exact, and a new standby boots on the node after the resume.
    trainer = DemoTrainer(steps=400, width=32, depth=2, global_batch=8, step_sleep_s=0.05, return_state=True)
    stream = _KillOnceASpareIsReady(rank=1, standby=True)
    result = _run(trainer, tmp_path, num_workers=2, max_failures=1, echo=stream, json_events=True,
                  resources_per_worker={"CPU": 0.25, "slot": 2})
    (rec,) = result.failures
    assert rec.failure.kind == WORKER_DIED and rec.failure.ranks == (1,)
    events = [e for e in result.events if e.kind == "spare"]
    assert all(e.fields.get("standby") for e in events)  # no hot spare: spares=0 by default
    ready = [e.fields for e in events if "ready" in e.message]
    (taken,) = [e.fields for e in events if "replaced" in e.message]
    assert taken["rank"] == 1 and taken["pid"] == ready[0]["pid"]
    first, second = _started(result)
    assert second["kept"] == [0] and second["pids"] == [first["pids"][0], ready[0]["pid"]]
    assert len([e for e in events if e.message.startswith("booting")]) >= 2  # a new one after the resume
    assert [r["attempt"] for r in result.returns] == [1, 1]
    assert _equal(result.returns[0]["state"], trainer.reference(world=2))
