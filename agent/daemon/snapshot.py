"""What the agent holds: a trainer's session, a snapshot staged into one of its segments (or a
replica received from a peer), and the persist settings that came with it. Plain records;
:mod:`agent.daemon.holding` keeps them under its lock.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field

from ckpt import SnapshotState

from ..plan import DecodedPlan
from .segments import Segment

# The states a held snapshot goes through, in order (a gauge per state).
HELD_STATES = (SnapshotState.STAGED, SnapshotState.PERSISTED, SnapshotState.COMMITTED, SnapshotState.FAILED)


@dataclass(frozen=True, slots=True)
class PersistSettings:
    durable: bool = True
    io_threads: int = 8
    commit_timeout_s: float = 600.0
    keep_last: int = 0
    keep_every: int = 0
    library_versions: tuple[tuple[str, str], ...] = ()


@dataclass(eq=False)
class Session:
    id: str
    run_url: str
    writer: str
    pid: int
    settings: PersistSettings
    # ("released", segment), ("snapshot", step, save_id, state, error, document), or None: the agent stopped
    events: queue.Queue = field(default_factory=queue.Queue)
    segments: dict[str, Segment] = field(default_factory=dict)
    alive: bool = True


@dataclass(eq=False)
class Snapshot:
    run_url: str
    writer: str
    step: int
    save_id: str
    writers: tuple[str, ...]
    committer: bool
    plan_json: str
    plan: DecodedPlan
    segment: Segment
    settings: PersistSettings
    session: Session | None = None  # the trainer session the segment is leased to (None: agent's own)
    replica: bool = False
    origin_agent: str = ""
    origin_address: str = ""
    rank_in_ring: int = 0
    state: SnapshotState = SnapshotState.STAGED
    error: str = ""
    fragment_json: str = ""
    commit_point: bytes = b""
    replicated_to: set[str] = field(default_factory=set)
    replicas_wanted: int = 0
    taken_over: bool = False
    origin_lost_since: float | None = None
    created: float = field(default_factory=time.monotonic)
    # The chunk index served to restores, built once (again once the fragment's crc32c are known).
    chunk_index: str = ""
    chunk_index_crcs: bool = False

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.run_url, self.writer, self.step)

    @property
    def nbytes(self) -> int:
        return self.plan.end

    @property
    def our_duty(self) -> bool:
        """Whether this agent must persist/commit it (its own, or a replica taken over)."""
        return not self.replica or self.taken_over
