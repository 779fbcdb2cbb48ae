"""Stragglers and hang culprits under a real ``recovery.run`` on a local Ray cluster (one per
module): a rank made twice as slow on purpose is reported as a straggler by name, and as
recovered when it speeds up again; a stuck rank is named the culprit of the hang apart from the
ranks waiting for it in the gradient all-reduce; with ``replace_stragglers_after_s`` a
persistent straggler is a failure the reload policy recovers from.

The ranks time their compute with ``ctx.timed()`` (recovery.demo.DemoTrainer): in data-parallel
training every rank waits for the slowest in the all-reduce, so only the time outside it tells
them apart. Assertions are on what the job reported and ended with, never on how long it took.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from prometheus_client import CollectorRegistry

from recovery.demo import HANG, SLOW, DemoTrainer, Fault
from recovery.detect import HANG as HANG_FAILURE
from recovery.detect import STRAGGLER
from tests.integration._ray import run_job

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.isdir("/dev/shm"),
                                reason="node agents need Linux POSIX shared memory")

FAST = {"heartbeat_interval_s": 0.1, "backoff_s": 0.0, "placement_timeout_s": 5.0, "settle_timeout_s": 20.0,
        "startup_timeout_s": 120.0, "agent_memory_bytes": 256 << 20, "echo": None,
        # a short window for a short job: judged over 2 s, from 5 steps
        "straggler_window_s": 2.0, "straggler_min_steps": 5}


def _run(trainer, tmp_path, **kw):
    return run_job(trainer, tmp_path, FAST, **kw)


def _stragglers(result):
    return [e.fields for e in result.events if e.kind == "straggler"]


def test_a_rank_slowed_twice_is_reported_as_a_straggler_by_name_then_as_recovered(cluster, tmp_path):
    # 30 ms of compute a step on every rank; rank 1 takes twice as long from step 40 to step 110
    trainer = DemoTrainer(steps=150, width=32, depth=2, global_batch=12, compute_s=0.03,
                          faults=(Fault(SLOW, 40, rank=1, factor=2.0, until=110),))
    metrics = CollectorRegistry()
    result = _run(trainer, tmp_path, num_workers=3, metrics=metrics)
    assert result.failures == [] and result.attempts == 1
    events = _stragglers(result)
    assert [(e["rank"], e["state"]) for e in events] == [(1, "slow"), (1, "recovered")], events
    slow, recovered = events
    assert isinstance(slow["node"], str) and slow["node"] and recovered["node"] == slow["node"]
    assert slow["signal"] == "compute" and slow["attempt"] == 0 and slow["factor"] >= 1.5, slow
    assert slow["step_time_s"] >= 1.5 * slow["peers_s"] and slow["steps"] >= 5
    assert recovered["factor"] < 1.5 and recovered["since"] == slow["detected_at"]
    # reported after the slowdown began, on the rank that slowed down only
    slowed_at = [r["slowed_at"] for r in result.returns]
    assert slowed_at[0] is None and slowed_at[2] is None and slow["detected_at"] > slowed_at[1]
    sample = metrics.get_sample_value
    assert sample("ckpt_recovery_stragglers_total") == 1 and sample("ckpt_recovery_stragglers_current") == 0
    assert [r["start"] for r in result.returns] == [0, 0, 0]


def test_a_stuck_rank_is_the_hang_culprit_apart_from_the_ranks_waiting_for_it(cluster, tmp_path):
    # rank 2 stops before the compute of step 13; ranks 0 and 1 finish it and wait for rank 2 in
    # the gradient all-reduce: all three last reported step 12, within the same second
    trainer = DemoTrainer(steps=20, width=32, depth=2, global_batch=12, step_sleep_s=0.02, return_state=True,
                          faults=(Fault(HANG, 13, rank=2),))
    result = _run(trainer, tmp_path, num_workers=3, hang_timeout_s=2.0)
    (rec,) = result.failures
    f = rec.failure
    assert f.kind == HANG_FAILURE and f.culprits == (2,) and set(f.ranks) == {0, 1, 2}, f
    assert f.last_step == 12 and "rank 2 stuck at step 12" in f.detail and "2 rank(s) waiting behind it" in f.detail
    assert rec.restore_step == 10 and [r["start"] for r in result.returns] == [11, 11, 11]
    reference = trainer.reference(world=3)
    for k, v in reference.items():  # gloo sums three gradients in its own order: close, not bit for bit
        torch.testing.assert_close(result.returns[0]["state"][k], v, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_a_persistent_straggler_is_replaced_through_the_failure_path(cluster, tmp_path):
    # rank 1 twice as slow for its whole first attempt; a straggler for 1 s is a failure: the
    # reload policy restarts the job, whose new attempt has no slow rank
    trainer = DemoTrainer(steps=200, width=32, depth=2, global_batch=8, compute_s=0.03, return_state=True,
                          faults=(Fault(SLOW, 0, rank=1, factor=2.0),))
    result = _run(trainer, tmp_path, num_workers=2, replace_stragglers_after_s=1.0)
    (rec,) = result.failures
    f = rec.failure
    assert (f.kind, f.ranks, f.culprits, f.attempt) == (STRAGGLER, (1,), (1,), 0), f
    assert "replace_stragglers_after_s=1" in f.detail and rec.action == "restarted"
    assert result.attempts == 2 and [r["attempt"] for r in result.returns] == [1, 1]
    assert [r["slowed_at"] for r in result.returns] == [None, None]  # the new attempt is not slowed
    start = rec.restore_step + 1 if rec.restore_step is not None else 0
    assert [r["start"] for r in result.returns] == [start, start]
    # the same parameters as a run that never failed
    expected = trainer.reference(world=2)
    assert all(torch.equal(result.returns[0]["state"][k], v) for k, v in expected.items())
    events = _stragglers(result)
    assert [(e["rank"], e["state"], e["attempt"]) for e in events][:1] == [(1, "slow", 0)]
