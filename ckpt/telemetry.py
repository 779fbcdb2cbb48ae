"""What a Checkpointer tells the outside: Prometheus metrics and OpenTelemetry spans.

Metrics go to a ``prometheus_client`` registry: the process-wide default one unless the
Checkpointer is given another (``metrics=`` in its config; ``False`` turns them off). Every
Checkpointer of a process adds to the same series, as one process is one rank. Names and
meanings are listed in ``docs/metrics.md``.

Spans use ``opentelemetry-api`` only, when it is installed: without an SDK configured by the
application they cost nothing and go nowhere. One span ``ckpt.save`` per checkpoint, from
``save()`` to its commit (events ``staged`` and ``persisted`` on the way), and one span
``ckpt.restore`` per restore.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import Any

from .handles import SnapshotHandle

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
STALL_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# ckpt_checkpoints_total{outcome}
TAKEN, COMMITTED, FAILED, SKIPPED = "taken", "committed", "failed", "skipped"
# ckpt_checkpoint_failures_total{stage}: where a failed checkpoint stopped
STAGING, PERSIST, COMMIT = "staging", "persist", "commit"
# ckpt_checkpoint_latency_seconds{state}: from save() to the state
STATES = ("staged", "persisted", "committed")

_shared: dict[int, CheckpointerMetrics] = {}
_shared_lock = threading.Lock()


class CheckpointerMetrics:
    """The Prometheus series of the Checkpointers of one process, in ``registry``."""

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        r = self.registry = REGISTRY if registry is None else registry
        self.checkpoints = Counter("ckpt_checkpoints", "Checkpoints by outcome: taken (save() snapshotted), "
                                   "committed, failed, skipped (when_busy='skip' found no host buffer)",
                                   ["outcome"], registry=r)
        self.save_stall = Histogram("ckpt_save_stall_seconds", "Time save() blocked the training loop",
                                    buckets=STALL_BUCKETS, registry=r)
        self.hook_stall = Histogram("ckpt_step_hook_stall_seconds",
                                    "Time an optimizer step waited for the host copy of the latest snapshot",
                                    buckets=STALL_BUCKETS, registry=r)
        self.latency = Histogram("ckpt_checkpoint_latency_seconds",
                                 "Time from save() to a state of the checkpoint: staged (host copy done), "
                                 "persisted (this rank's bytes durable), committed (readers see it)",
                                 ["state"], buckets=LATENCY_BUCKETS, registry=r)
        self.bytes = Counter("ckpt_checkpoint_bytes", "Tensor bytes of this rank's checkpoints, by state reached",
                             ["state"], registry=r)
        self.failures = Counter("ckpt_checkpoint_failures",
                                "Failed checkpoints by the stage that failed: staging (capture or host copy), "
                                "persist (writing this rank's bytes), commit", ["stage"], registry=r)
        self.last_committed = Gauge("ckpt_last_committed_step", "The newest step this process saw committed",
                                    registry=r)
        self.restore_seconds = Histogram("ckpt_restore_seconds", "Time of a restore (Checkpointer.restore)",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.restore_bytes = Counter("ckpt_restore_bytes", "Chunk bytes restores read, by the tier that served them",
                                     ["tier"], registry=r)
        self.restore_fallbacks = Counter("ckpt_restore_fallbacks",
                                         "Restore tiers that could not serve a read, by tier and reason",
                                         ["tier", "reason"], registry=r)
        self.newest = -1
        for outcome in (TAKEN, COMMITTED, FAILED, SKIPPED):
            self.checkpoints.labels(outcome)
        for stage in (STAGING, PERSIST, COMMIT):
            self.failures.labels(stage)
        for state in STATES:
            self.latency.labels(state)
            self.bytes.labels(state)

    @classmethod
    def shared(cls, registry: Any = None) -> CheckpointerMetrics:
        """The one instance of ``registry`` (Prometheus refuses a second series of one name)."""
        from prometheus_client import REGISTRY

        key = id(REGISTRY if registry is None else registry)
        with _shared_lock:
            found = _shared.get(key)
            if found is None:
                found = _shared[key] = cls(registry)
            return found


def _tracer() -> Any:
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    return trace.get_tracer("ckpt")


class Telemetry:
    """What one Checkpointer records. ``metrics``: True (the default registry), False/None (no
    metrics), a ``prometheus_client.CollectorRegistry``, or a :class:`CheckpointerMetrics`;
    ``tracer``: an OpenTelemetry tracer (default: ``opentelemetry.trace.get_tracer("ckpt")``
    when the API is installed; ``False``: no spans)."""

    def __init__(self, metrics: Any = True, *, tracer: Any = None) -> None:
        if isinstance(metrics, CheckpointerMetrics) or metrics is None or metrics is False:
            self.metrics = metrics or None
        else:
            self.metrics = CheckpointerMetrics.shared(None if metrics is True else metrics)
        self.tracer = None if tracer is False else (tracer if tracer is not None else _tracer())

    # -- checkpoints ------------------------------------------------------------------------

    def saved(self, handle: SnapshotHandle) -> None:
        """``save`` returned with ``handle`` (any outcome); follow it to its end."""
        t0 = time.perf_counter() - handle.stall_s
        span = None
        if self.tracer is not None:
            span = self.tracer.start_span("ckpt.save", start_time=time.time_ns() - int(handle.stall_s * 1e9),
                                          attributes={"ckpt.step": handle.step, "ckpt.bytes": handle.nbytes,
                                                      "ckpt.stall_s": handle.stall_s, "ckpt.skipped": handle.skipped})
        m = self.metrics
        if m is not None:
            m.save_stall.observe(handle.stall_s)
            m.checkpoints.labels(SKIPPED if handle.skipped else TAKEN).inc()
        if handle.skipped:
            if span is not None:
                span.end()
            return
        for state, fut in zip(STATES, (handle.staged, handle.persisted, handle.committed)):
            fut.add_done_callback(lambda f, s=state: self._reached(handle, s, f, t0, span))

    def _reached(self, handle: SnapshotHandle, state: str, fut: Future, t0: float, span: Any) -> None:
        failed = _error(fut) is not None
        m = self.metrics
        if not failed and m is not None:
            m.latency.labels(state).observe(time.perf_counter() - t0)
            m.bytes.labels(state).inc(handle.nbytes)
        if span is not None and state != "committed" and not failed:
            span.add_event(state)
        if state != "committed":
            return
        if m is not None:
            if failed:
                m.checkpoints.labels(FAILED).inc()
                m.failures.labels(_failed_stage(handle)).inc()
            else:
                m.checkpoints.labels(COMMITTED).inc()
                with _shared_lock:
                    m.newest = max(handle.step, m.newest)
                    m.last_committed.set(m.newest)
        if span is not None:
            if failed:
                _set_error(span, _error(fut))
            span.set_attribute("ckpt.hook_stall_s", handle.hook_stall_s)
            span.end()

    def hook_stalled(self, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.hook_stall.observe(seconds)

    # -- restores ---------------------------------------------------------------------------

    def restored(self, report: Any) -> None:
        """A restore finished with ``report`` (a ``ckpt.restore.RestoreReport``)."""
        m = self.metrics
        served = {getattr(t, "value", str(t)): int(n) for t, n in report.served.items()}
        if m is not None:
            m.restore_seconds.observe(report.seconds)
            for tier, n in served.items():
                m.restore_bytes.labels(tier).inc(n)
            for fb in report.fallbacks:
                m.restore_fallbacks.labels(fb.tier.value, fb.reason.value).inc()
        if self.tracer is not None:
            attrs = {"ckpt.step": -1 if report.step is None else report.step, "ckpt.seconds": report.seconds,
                     "ckpt.fallbacks": len(report.fallbacks)}
            attrs |= {f"ckpt.bytes.{tier}": n for tier, n in served.items()}
            span = self.tracer.start_span("ckpt.restore", start_time=time.time_ns() - int(report.seconds * 1e9),
                                          attributes=attrs)
            span.end()


def _error(fut: Future) -> BaseException | None:
    return fut.exception() if fut.done() else None


def _failed_stage(handle: SnapshotHandle) -> str:
    if _error(handle.staged) is not None:
        return STAGING
    if _error(handle.persisted) is not None:
        return PERSIST
    return COMMIT


def _set_error(span: Any, error: BaseException | None) -> None:
    try:
        from opentelemetry.trace import Status, StatusCode
    except ImportError:
        return
    if error is not None:
        span.record_exception(error)
    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
