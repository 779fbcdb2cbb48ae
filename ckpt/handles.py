"""What the training loop sees of its checkpoints: a handle per checkpoint with a future per
state, and the Checkpointer's status."""

from __future__ import annotations

import enum
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from .manifest import Manifest


class SnapshotState(str, enum.Enum):
    CAPTURED = "captured"
    STAGED = "staged"
    PERSISTED = "persisted"
    COMMITTED = "committed"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(eq=False)
class SnapshotHandle:
    """One checkpoint of this process, with a future per state."""

    step: int
    nbytes: int = 0
    stall_s: float = 0.0  # time ``save`` blocked the training loop
    hook_stall_s: float = 0.0  # time optimizer pre-step hooks waited for this snapshot's staging
    staged: Future = field(default_factory=Future)
    persisted: Future = field(default_factory=Future)  # result: the step (not the writer's fragment)
    committed: Future = field(default_factory=Future)  # result: the manifest
    skipped: bool = False

    @property
    def state(self) -> SnapshotState:
        if self.skipped:
            return SnapshotState.SKIPPED
        for fut, done_state in ((self.committed, SnapshotState.COMMITTED), (self.persisted, SnapshotState.PERSISTED),
                                (self.staged, SnapshotState.STAGED)):
            if fut.done():
                return SnapshotState.FAILED if fut.exception() is not None else done_state
        return SnapshotState.CAPTURED

    @property
    def error(self) -> BaseException | None:
        for fut in (self.staged, self.persisted, self.committed):
            if fut.done() and fut.exception() is not None:
                return fut.exception()
        return None

    def result(self, timeout: float | None = None) -> Manifest:
        """Block until committed; the manifest, or the error that stopped it."""
        return self.committed.result(timeout)


class HandleLog(list):
    """The Checkpointer's handles, oldest first: every unfinished one and the last ``keep``
    finished ones. Each finished handle holds its fragment and manifest (a record per chunk):
    kept for ever, a job checkpointing every step grew by thousands of objects per step, and
    every full collection of the cycle collector walked them. Those dropped are counted."""

    def __init__(self, keep: int = 32) -> None:
        super().__init__()
        self.keep = keep
        self.dropped_failed = 0
        self.dropped_last_committed: int | None = None

    def append(self, handle: SnapshotHandle) -> None:
        super().append(handle)
        if len(self) > 2 * self.keep:
            finished = [h for h in self if h.state in _FINISHED]
            drop = {id(h) for h in finished[:-self.keep]}
            for h in finished[:-self.keep]:
                if h.state is SnapshotState.FAILED:
                    self.dropped_failed += 1
                elif h.state is SnapshotState.COMMITTED:
                    self.dropped_last_committed = max(h.step, self.dropped_last_committed or h.step)
            self[:] = [h for h in self if id(h) not in drop]

    def snapshot(self) -> HandleLog:
        out = HandleLog(self.keep)
        out.extend(self)
        out.dropped_failed, out.dropped_last_committed = self.dropped_failed, self.dropped_last_committed
        return out

    def last_committed(self) -> int | None:
        steps = [h.step for h in self if h.state is SnapshotState.COMMITTED]
        if self.dropped_last_committed is not None:
            steps.append(self.dropped_last_committed)
        return max(steps, default=None)


_FINISHED = (SnapshotState.COMMITTED, SnapshotState.FAILED, SnapshotState.SKIPPED)


@dataclass(frozen=True, slots=True)
class CheckpointerStatus:
    checkpoints: tuple[dict[str, Any], ...]
    last_committed: int | None
    in_flight: int
    skipped: int
    failed: int
    errors: tuple[str, ...]
    host_budget_bytes: int | None
    host_allocated_bytes: int
    host_peak_bytes: int
    host_allocations: int
    hook_stall_s: float


_SAME = object()


def chain(src: Future, dst: Future, result: Any = _SAME) -> None:
    """``dst`` done as ``src``: its exception, or its result (or ``result``, where given)."""
    if dst.done():
        return
    e = src.exception()
    if e is None:
        dst.set_result(src.result() if result is _SAME else result)
    else:
        dst.set_exception(e)


def status_of(handles: HandleLog, errors: tuple[str, ...], pool: Any, *, budget: int | None, skipped: int,
              hook_stall_s: float) -> CheckpointerStatus:
    """The Checkpointer's status from its handles and its host pool."""
    rows = tuple(
        {"step": h.step, "state": h.state.value, "bytes": h.nbytes, "stall_s": h.stall_s,
         "hook_stall_s": h.hook_stall_s,
         "error": None if h.error is None else f"{type(h.error).__name__}: {h.error}"}
        for h in handles
    )
    return CheckpointerStatus(
        checkpoints=rows,
        last_committed=handles.last_committed(),
        in_flight=sum(1 for h in handles if h.state in (SnapshotState.CAPTURED, SnapshotState.STAGED,
                                                        SnapshotState.PERSISTED)),
        skipped=skipped,
        failed=handles.dropped_failed + sum(1 for h in handles if h.state is SnapshotState.FAILED),
        errors=errors,
        host_budget_bytes=pool.budget if pool else budget,
        host_allocated_bytes=pool.allocated_bytes if pool else 0,
        host_peak_bytes=pool.peak_bytes if pool else 0,
        host_allocations=pool.allocations if pool else 0,
        hook_stall_s=hook_stall_s,
    )
