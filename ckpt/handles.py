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
