"""What happened to a job, as Prometheus series: failures detected by kind, restore and resume
times by tier, steps lost, degraded restore tiers, checkpoints committed and failed.

The series are read off the event log, the one place where the launcher, the coordinator and
the policies report what happens, so a metric can never disagree with the log. Backends:

- ``"ray"`` (the default of ``recovery.run``): ``ray.util.metrics``; Ray's metrics agent on each
  node exports them beside Ray's own at its Prometheus endpoint (Ray adds the ``ray_`` prefix);
- a ``prometheus_client.CollectorRegistry``: series in that registry (serve it as you like);
- ``None``: no metrics.

Names and meanings are listed in ``docs/metrics.md``.
"""

from __future__ import annotations

from typing import Any

from . import events as ev

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

COUNTER, HISTOGRAM, GAUGE = "counter", "histogram", "gauge"
# name -> (type, help, label names)
SERIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "ckpt_recovery_failures_detected": (
        COUNTER, "Failures detected, by kind (process_died, node_died, hang, agent_died, storage, ...)", ("kind",)),
    "ckpt_recovery_restore_seconds": (
        HISTOGRAM, "Time of a restore (slowest rank), by the tier that served most bytes", ("tier",)),
    "ckpt_recovery_restore_bytes": (COUNTER, "Chunk bytes restores read, by tier", ("tier",)),
    "ckpt_recovery_resume_seconds": (
        HISTOGRAM, "Time from the detection of a failure to the first step trained after it", ()),
    "ckpt_recovery_steps_lost": (
        COUNTER, "Training steps redone because of failures (last step reached minus the step restored)", ()),
    "ckpt_recovery_degraded_tiers": (COUNTER, "Restore tiers that sent reads below them, by tier and reason",
                                     ("tier", "reason")),
    "ckpt_recovery_checkpoints": (COUNTER, "Checkpoints the coordinator saw, by outcome (committed, failed)",
                                  ("outcome",)),
    "ckpt_recovery_commit_seconds": (HISTOGRAM, "Time from the first fragment of a checkpoint to its commit", ()),
    "ckpt_recovery_last_committed_step": (GAUGE, "The newest committed step", ()),
    "ckpt_recovery_world_size": (GAUGE, "Workers the job runs with now", ()),
    "ckpt_recovery_stragglers": (
        COUNTER, "Ranks reported as stragglers (slower than their peers by straggler_factor over straggler_window_s)",
        ()),
    "ckpt_recovery_stragglers_current": (GAUGE, "Ranks that are stragglers now", ()),
}


class _Prometheus:
    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        make = {COUNTER: Counter, GAUGE: Gauge}
        self.series: dict[str, Any] = {}
        for name, (kind, doc, labels) in SERIES.items():
            if kind == HISTOGRAM:
                self.series[name] = Histogram(name, doc, labels, buckets=LATENCY_BUCKETS, registry=registry)
            else:
                self.series[name] = make[kind](name, doc, labels, registry=registry)

    def record(self, name: str, value: float, labels: dict[str, str]) -> None:
        s = self.series[name].labels(**labels) if labels else self.series[name]
        kind = SERIES[name][0]
        s.inc(value) if kind == COUNTER else s.observe(value) if kind == HISTOGRAM else s.set(value)


class _Ray:
    def __init__(self) -> None:
        from ray.util import metrics as rm

        self.series: dict[str, Any] = {}
        for name, (kind, doc, labels) in SERIES.items():
            if kind == HISTOGRAM:
                self.series[name] = rm.Histogram(name, description=doc, boundaries=list(LATENCY_BUCKETS),
                                                 tag_keys=labels)
            else:
                cls = rm.Counter if kind == COUNTER else rm.Gauge
                self.series[name] = cls(name, description=doc, tag_keys=labels)

    def record(self, name: str, value: float, labels: dict[str, str]) -> None:
        s, kind = self.series[name], SERIES[name][0]
        tags = labels or None
        s.inc(value, tags=tags) if kind == COUNTER else s.observe(value, tags=tags) if kind == HISTOGRAM \
            else s.set(value, tags=tags)


class RecoveryMetrics:
    """Turns events into series; ``observe`` is an :class:`recovery.events.EventLog` observer."""

    def __init__(self, backend: Any = "ray") -> None:
        if backend == "ray":
            self.backend: Any = _Ray()
        elif hasattr(backend, "register"):
            self.backend = _Prometheus(backend)
        else:
            raise ValueError(f"metrics must be 'ray', a prometheus_client CollectorRegistry or None, got {backend!r}")
        self._failed: set[Any] = set()
        self._stragglers: set[tuple[Any, Any]] = set()  # (attempt, rank) reported slow, not recovered

    def observe(self, event: ev.Event) -> None:
        f, rec = event.fields, self.backend.record
        if event.kind == ev.FAILURE and isinstance(f.get("failure"), dict):
            rec("ckpt_recovery_failures_detected", 1, {"kind": str(f["failure"].get("kind", "?"))})
        elif event.kind == ev.RESTORED:
            rec("ckpt_recovery_restore_seconds", float(f.get("seconds") or 0.0), {"tier": str(f.get("tier") or "?")})
            for tier, n in (f.get("bytes") or {}).items():
                if n:
                    rec("ckpt_recovery_restore_bytes", int(n), {"tier": str(tier)})
            if f.get("steps_lost") is not None:
                rec("ckpt_recovery_steps_lost", max(0, int(f["steps_lost"])), {})
        elif event.kind == ev.RESUMED and f.get("seconds") is not None:
            rec("ckpt_recovery_resume_seconds", float(f["seconds"]), {})
        elif event.kind == ev.RESTORE_FALLBACK:
            rec("ckpt_recovery_degraded_tiers", 1, {"tier": str(f.get("tier", "?")), "reason": str(f.get("reason", "?"))})
        elif event.kind == ev.CHECKPOINT and "step" in f:
            rec("ckpt_recovery_checkpoints", 1, {"outcome": "committed"})
            rec("ckpt_recovery_last_committed_step", int(f["step"]), {})
            if f.get("latency_s") is not None:
                rec("ckpt_recovery_commit_seconds", float(f["latency_s"]), {})
        elif event.kind == ev.CHECKPOINT_FAILED and "step" in f and f["step"] not in self._failed:
            self._failed.add(f["step"])  # once per step, however many ranks reported it
            rec("ckpt_recovery_checkpoints", 1, {"outcome": "failed"})
        elif event.kind in (ev.WORKERS_STARTED, ev.RESIZED) and f.get("world_size") is not None:
            rec("ckpt_recovery_world_size", int(f["world_size"]), {})
            if event.kind == ev.WORKERS_STARTED and self._stragglers:  # a new attempt: measured anew
                self._stragglers.clear()
                rec("ckpt_recovery_stragglers_current", 0, {})
        elif event.kind == ev.STRAGGLER and "rank" in f:
            key = (f.get("attempt"), f["rank"])
            if f.get("state") == "slow" and key not in self._stragglers:
                self._stragglers.add(key)
                rec("ckpt_recovery_stragglers", 1, {})
            elif f.get("state") == "recovered":
                self._stragglers.discard(key)
            rec("ckpt_recovery_stragglers_current", len(self._stragglers), {})


def attach(events: ev.EventLog, metrics: Any) -> RecoveryMetrics | None:
    """Record ``events`` into ``metrics`` ("ray", a registry, or None for none)."""
    if metrics is None or metrics is False:
        return None
    m = RecoveryMetrics(metrics)
    events.observers.append(m.observe)
    return m
