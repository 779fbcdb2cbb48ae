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
    persisted: Future = field(default_factory=Future)
    committed: Future = field(default_factory=Future)
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


def chain(src: Future, dst: Future) -> None:
    if dst.done():
        return
    e = src.exception()
    if e is None:
        dst.set_result(src.result())
    else:
        dst.set_exception(e)


def status_of(handles: list[SnapshotHandle], errors: tuple[str, ...], pool: Any, *, budget: int | None, skipped: int,
              hook_stall_s: float) -> CheckpointerStatus:
    """The Checkpointer's status from its handles and its host pool."""
    rows = tuple(
        {"step": h.step, "state": h.state.value, "bytes": h.nbytes, "stall_s": h.stall_s,
         "hook_stall_s": h.hook_stall_s,
         "error": None if h.error is None else f"{type(h.error).__name__}: {h.error}"}
        for h in handles
    )
    committed = [h.step for h in handles if h.state is SnapshotState.COMMITTED]
    return CheckpointerStatus(
        checkpoints=rows,
        last_committed=max(committed) if committed else None,
        in_flight=sum(1 for h in handles if h.state in (SnapshotState.CAPTURED, SnapshotState.STAGED,
                                                        SnapshotState.PERSISTED)),
        skipped=skipped,
        failed=sum(1 for h in handles if h.state is SnapshotState.FAILED),
        errors=errors,
        host_budget_bytes=pool.budget if pool else budget,
        host_allocated_bytes=pool.allocated_bytes if pool else 0,
        host_peak_bytes=pool.peak_bytes if pool else 0,
        host_allocations=pool.allocations if pool else 0,
        hook_stall_s=hook_stall_s,
    )
