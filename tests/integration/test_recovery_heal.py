"""Policy heal (no rollback) and auto on a real local Ray cluster: a worker SIGKILLed, the
survivors keep their processes and live state, the replacement copies it, nothing is redone.
(A replacement that cannot start: tests/integration/test_recovery_nodes.py, on two nodes.)

Asserts what the job ended with (steps, losses per step, parameters, pids, world size), never
how long anything took.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from prometheus_client import CollectorRegistry

from recovery.demo import HANG, KILL, RAISE, DemoTrainer, Fault
from recovery.detect import HANG as HANG_FAILURE
from recovery.detect import WORKER_DIED, WORKER_ERROR
from tests.integration._ray import run_job

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.isdir("/dev/shm"),
                                reason="node agents need Linux POSIX shared memory")

FAST = {"heartbeat_interval_s": 0.1, "backoff_s": 0.0, "placement_timeout_s": 5.0, "settle_timeout_s": 20.0,
        "startup_timeout_s": 120.0, "agent_memory_bytes": 256 << 20, "echo": None}


def _started(result) -> list[dict]:
    return [e.fields for e in result.events if e.kind == "workers_started"]


def _plans(result) -> list[dict]:
    """The policies' choices (the restore plans of a reload say which checkpoint and tiers)."""
    return [e.fields for e in result.events if e.kind == "restore_plan" and "chosen" in e.fields]


def _assert_replicas_equal(result) -> None:
    first = result.returns[0]["state"]
    for r in result.returns[1:]:
        assert r["state"].keys() == first.keys() and all(torch.equal(r["state"][k], first[k]) for k in first)


def _assert_every_step_once(result, steps: int) -> list[int]:
    """Every rank's loss log holds every step once, each trained by the same attempt on every
    rank (the losses are each rank's own: its slice of the batch); the attempt per step."""
    logs = [r["losses"] for r in result.returns]
    assert all((log["steps"], log["attempts"]) == (logs[0]["steps"], logs[0]["attempts"]) for log in logs)
    assert logs[0]["steps"] == list(range(steps)), logs[0]["steps"]
    return logs[0]["attempts"]


def test_heal_a_killed_worker_loses_no_step_and_keeps_the_survivors(cluster, tmp_path):
    trainer = DemoTrainer(steps=24, width=32, depth=2, global_batch=8, step_sleep_s=0.02, return_state=True,
                          log_losses=True, faults=(Fault(KILL, 13, rank=1),))
    metrics = CollectorRegistry()
    result = run_job(trainer, tmp_path, FAST, num_workers=2, max_failures=1, policy="heal", metrics=metrics)
    (rec,) = result.failures
    assert rec.failure.kind == WORKER_DIED and rec.failure.ranks == (1,)
    assert (rec.policy, rec.restore_step, rec.steps_lost, rec.expected_tier) == ("heal", 12, 0, "live")
    assert rec.restore_bytes.get("live", 0) > 0 and rec.restored_from == "live"
    first, second = _started(result)
    assert second["kept"] == [0] and second["pids"][0] == first["pids"][0] and second["pids"][1] != first["pids"][1]
    assert second["heal"] == {"source": 0, "step": 12, "receivers": [1]}
    assert [(r["attempt"], r["start"], r["heal_step"]) for r in result.returns] == [(1, 13, 12)] * 2
    attempts = _assert_every_step_once(result, 24)
    assert attempts == [0] * 13 + [1] * 11  # steps 0-12 trained once before the kill, 13-23 after: none redone
    _assert_replicas_equal(result)
    # a run that never failed ends with the same parameters (the same world size throughout)
    ref = trainer.reference(world=2)
    assert all(torch.equal(result.returns[0]["state"][k], v) for k, v in ref.items())
    (plan,) = _plans(result)
    assert plan["chosen"] == "heal" and plan["policy"] == "heal" and plan["source"] == 0
    assert "healed: continued after step 12" in result.summary()
    # the same facts as Prometheus series
    sample = metrics.get_sample_value
    assert sample("ckpt_recovery_failures_detected_total", {"kind": WORKER_DIED}) == 1
    assert sample("ckpt_recovery_steps_lost_total") == 0
    assert sample("ckpt_recovery_restore_bytes_total", {"tier": "live"}) == rec.restore_bytes["live"]
    assert sample("ckpt_recovery_resume_seconds_count") == 1 and sample("ckpt_recovery_world_size") == 2


def test_auto_heals_a_lost_process_and_reloads_when_train_fn_raised(cluster, tmp_path):
    trainer = DemoTrainer(steps=24, width=32, depth=2, global_batch=8, step_sleep_s=0.02, return_state=True,
                          log_losses=True, faults=(Fault(KILL, 9, rank=0), Fault(RAISE, 17, rank=1, attempt=1)))
    result = run_job(trainer, tmp_path, FAST, num_workers=2, max_failures=2, policy="auto")
    first, second = result.failures
    assert (first.failure.kind, first.policy, first.restore_step, first.steps_lost) == (WORKER_DIED, "heal", 8, 0)
    assert (second.failure.kind, second.policy, second.restore_step) == (WORKER_ERROR, "reload", 15)
    plans = _plans(result)
    assert [p["chosen"] for p in plans] == ["heal", "reload"] and "train_fn raised" in plans[1]["reason"]
    attempts = _assert_every_step_once(result, 24)  # the log is restored with the checkpoint on reload
    assert attempts == [0] * 9 + [1] * 7 + [2] * 8  # 0-8, then healed 9-15 (16 redone after the reload), 16-23
    _assert_replicas_equal(result)


@pytest.mark.slow
def test_heal_after_a_hang_frees_the_waiting_rank_and_continues_from_its_state(cluster, tmp_path):
    trainer = DemoTrainer(steps=20, width=32, depth=2, global_batch=8, step_sleep_s=0.02, return_state=True,
                          log_losses=True, faults=(Fault(HANG, 13, rank=1),))
    result = run_job(trainer, tmp_path, FAST, num_workers=2, hang_timeout_s=2.0, interrupt_timeout_s=3.0,
                     policy="heal")
    (rec,) = result.failures
    assert rec.failure.kind == HANG_FAILURE and rec.policy == "heal" and rec.restore_step == 12 and rec.steps_lost == 0
    attempts = _assert_every_step_once(result, 20)
    assert attempts == [0] * 13 + [1] * 7
    _assert_replicas_equal(result)
    assert all(torch.equal(result.returns[0]["state"][k], v) for k, v in trainer.reference(world=2).items())
