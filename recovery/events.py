"""The event log: one structured record per thing that happens to a job, printed as it
happens and returned in the result."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

# Kinds of events (the tag a reader filters on). Every kind emitted, by the launcher, the
# coordinator (its notes become events as the launcher polls them) or a policy, is named here.
STARTED = "started"
WORKERS_STARTED = "workers_started"
CHECKPOINT = "checkpoint"
CHECKPOINT_FAILED = "checkpoint_failed"
RETENTION = "retention"
FAILURE = "failure"
STOPPING = "stopping"
RESTORE_PLAN = "restore_plan"
RESTORED = "restored"
RESTORE_FALLBACK = "restore_fallback"  # a tier of a restore fell back (why, which ranks, what was read instead)
RESUMED = "resumed"
RESIZED = "resized"
COORDINATOR = "coordinator"
AGENT = "agent"
BACKOFF = "backoff"
STORAGE = "storage"  # checkpoints keep failing; training goes on
SPARE = "spare"  # hot spares booted, or one taken to replace a lost rank
STRAGGLER = "straggler"  # a rank became a straggler (fields: state "slow") or stopped being one ("recovered")
FINISHED = "finished"
ABORTED = "aborted"


@dataclass(frozen=True, slots=True)
class Event:
    """``t``: seconds since the job started; ``fields``: the same facts as the message, typed."""

    t: float
    kind: str
    message: str
    fields: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"t": round(self.t, 3), "kind": self.kind, "message": self.message, "fields": self.fields}

    def format(self) -> str:
        return f"[recovery {self.t:8.2f}s] {self.kind:<17} {self.message}"


class EventLog:
    """Append-only, thread-safe. ``echo``: a stream each event is written to as it happens
    (None: silent); ``json_lines``: write each as one JSON object instead of a line of text."""

    def __init__(self, *, echo: TextIO | None = sys.stdout, json_lines: bool = False,
                 clock: Callable[[], float] = time.monotonic, t0: float | None = None) -> None:
        self._clock = clock
        self.t0 = clock() if t0 is None else t0
        self._events: list[Event] = []
        self._lock = threading.Lock()
        self.echo = echo
        self.json_lines = json_lines
        # Called with each event as it is emitted (metrics); an observer's error never stops the job.
        self.observers: list[Callable[[Event], None]] = []

    def now(self) -> float:
        return self._clock() - self.t0

    def emit(self, kind: str, message: str, **fields: Any) -> Event:
        ev = Event(self.now(), kind, message, fields)
        with self._lock:
            self._events.append(ev)
        if self.echo is not None:
            line = json.dumps(ev.to_dict(), default=str) if self.json_lines else ev.format()
            print(line, file=self.echo, flush=True)
        for observe in self.observers:
            try:
                observe(ev)
            except Exception:
                logging.getLogger(__name__).debug("event observer failed", exc_info=True)
        return ev

    @property
    def events(self) -> list[Event]:
        with self._lock:
            return list(self._events)

    def of_kind(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]
