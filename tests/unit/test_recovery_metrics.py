"""The job's metrics, read off the event log."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from recovery import events as ev
from recovery.config import RunConfig
from recovery.events import EventLog
from recovery.metrics import SERIES, RecoveryMetrics, attach


def test_events_become_series():
    reg = CollectorRegistry()
    log = EventLog(echo=None)
    assert attach(log, reg) is not None
    log.emit(ev.WORKERS_STARTED, "attempt 0: 4 workers", attempt=0, world_size=4, nodes=1)
    for step, latency in ((0, 0.5), (10, 1.5)):
        log.emit(ev.CHECKPOINT, f"committed step {step}", step=step, writers=4, save_id="x", latency_s=latency)
    log.emit(ev.CHECKPOINT_FAILED, "rank 1: checkpoint of step 20 failed", step=20, rank=1, error="e")
    log.emit(ev.CHECKPOINT_FAILED, "checkpoint of step 20 failed", step=20, error="e")  # the same step: once
    log.emit(ev.FAILURE, "worker_died: rank 2 died", failure={"kind": "worker_died", "ranks": [2]})
    log.emit(ev.FAILURE, "(handled with the failure above) hang")  # a repeat carries no failure: not counted
    log.emit(ev.RESIZED, "continuing with 3 of 4 workers", world_size=3)
    log.emit(ev.RESTORE_FALLBACK, "agent memory fell back", tier="agent memory", reason="unreachable", ranks=[0])
    log.emit(ev.RESTORED, "3 workers restored step 10", step=[10], seconds=2.0,
             bytes={"agent memory": 100, "storage": 50, "peer": 0}, fallbacks=1, tier="agent memory", steps_lost=7)
    log.emit(ev.RESUMED, "training resumed", step=11, seconds=3.5)
    v = reg.get_sample_value
    assert v("ckpt_recovery_failures_detected_total", {"kind": "worker_died"}) == 1
    assert v("ckpt_recovery_checkpoints_total", {"outcome": "committed"}) == 2
    assert v("ckpt_recovery_checkpoints_total", {"outcome": "failed"}) == 1
    assert v("ckpt_recovery_commit_seconds_sum") == 2.0 and v("ckpt_recovery_commit_seconds_count") == 2
    assert v("ckpt_recovery_last_committed_step") == 10
    assert v("ckpt_recovery_world_size") == 3
    assert v("ckpt_recovery_degraded_tiers_total", {"tier": "agent memory", "reason": "unreachable"}) == 1
    assert v("ckpt_recovery_restore_seconds_sum", {"tier": "agent memory"}) == 2.0
    assert v("ckpt_recovery_restore_bytes_total", {"tier": "agent memory"}) == 100
    assert v("ckpt_recovery_restore_bytes_total", {"tier": "storage"}) == 50
    assert v("ckpt_recovery_steps_lost_total") == 7
    assert v("ckpt_recovery_resume_seconds_sum") == 3.5


def test_a_failing_observer_never_stops_the_event_log():
    log = EventLog(echo=None)
    seen = []
    log.observers += [lambda e: 1 / 0, seen.append]
    log.emit(ev.STARTED, "started")
    assert [e.kind for e in log.events] == [ev.STARTED] and len(seen) == 1


def test_metrics_settings():
    assert attach(EventLog(echo=None), None) is None
    with pytest.raises(ValueError, match="metrics"):
        RecoveryMetrics("statsd")
    with pytest.raises(ValueError, match="metrics"):
        RunConfig(num_workers=1, storage="/x", metrics="statsd")
    assert RunConfig(num_workers=1, storage="/x").metrics == "ray"
    assert all(name.startswith("ckpt_recovery_") for name in SERIES)


def test_straggler_events_count_once_and_the_gauge_follows_them():
    reg = CollectorRegistry()
    log = EventLog(echo=None)
    attach(log, reg)
    v = reg.get_sample_value
    log.emit(ev.WORKERS_STARTED, "attempt 0: 8 workers", attempt=0, world_size=8, nodes=2)
    for rank in (3, 5):
        log.emit(ev.STRAGGLER, f"rank {rank} is a straggler", attempt=0, rank=rank, state="slow", factor=2.0)
    log.emit(ev.STRAGGLER, "rank 3 is a straggler", attempt=0, rank=3, state="slow", factor=2.0)  # a repeat
    assert v("ckpt_recovery_stragglers_total") == 2 and v("ckpt_recovery_stragglers_current") == 2
    log.emit(ev.STRAGGLER, "rank 3 is no straggler any more", attempt=0, rank=3, state="recovered", factor=1.1)
    assert v("ckpt_recovery_stragglers_total") == 2 and v("ckpt_recovery_stragglers_current") == 1
    log.emit(ev.WORKERS_STARTED, "attempt 1: 8 workers", attempt=1, world_size=8, nodes=2)  # measured anew
    assert v("ckpt_recovery_stragglers_current") == 0
