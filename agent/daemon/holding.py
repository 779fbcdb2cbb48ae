"""What the agent holds and the memory it holds it in: trainer sessions, the segments leased to
them, held snapshots and replicas, the memory budget and eviction. One lock guards the tables;
:class:`agent.daemon.core.Agent` builds the persist and commit work on top.

Holding and eviction (see docs/agent.md):

- A trainer leases segments and stages a snapshot into one; after ``AnnounceStaged`` the agent
  holds that segment until the snapshot is *evicted*. Only then does the trainer get the
  segment back (a ``BufferReleased`` event) and may stage into it again.
- The newest committed snapshot of each (run, writer) stays in memory for fast restore; it is
  evicted when a newer one of the same writer is committed, or under memory pressure (only if
  persisted, and with ``evict_after = "persisted+replicated"`` only if also replicated).
  A failed snapshot is evicted at once. So a trainer's pool needs room for two slabs.
- Segments of a trainer that went away are freed, except those holding a snapshot: those stay
  (a restarted trainer restores from them) until evicted.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable

from ckpt import SnapshotState

from ..config import AgentConfig
from ..errors import (
    AgentBudgetError,
    AgentDrainingError,
    AgentNotFoundError,
    AgentStateError,
    PlanError,
    SnapshotExistsError,
)
from ..plan import decode_plan
from .metrics import AgentMetrics
from .segments import Segment, SegmentFactory
from .snapshot import HELD_STATES, PersistSettings, Session, Snapshot

log = logging.getLogger(__name__)


class Holding:
    """The tables of held things and the memory policy over them. Thread-safe."""

    def __init__(self, config: AgentConfig, metrics: AgentMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.metrics.memory_budget.set(config.memory_budget_bytes)
        self.segments = SegmentFactory(config.shm_dir, config.shm_prefix, config.shm_mode)
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._sessions: dict[str, Session] = {}
        self._snapshots: dict[tuple[str, str, int], Snapshot] = {}
        self._orphans: dict[str, Segment] = {}  # segments of gone sessions, holding a snapshot
        # Segments whose announce is being decoded (outside the lock): held like a snapshot's, so
        # a trainer that goes away meanwhile does not take the memory from under its snapshot.
        self._announcing: dict[str, Segment] = {}
        self.draining = False
        self.state = "serving"

    # -- memory --------------------------------------------------------------------------------

    def used_bytes(self) -> int:
        with self._lock:
            leased = sum(s.nbytes for sess in self._sessions.values() for s in sess.segments.values())
            own = sum(s.nbytes for s in self._orphans.values())
            own += sum(s.segment.nbytes for s in self._snapshots.values() if s.session is None
                       and s.segment.name not in self._orphans)
            return leased + own

    def _reserve(self, nbytes: int) -> None:
        """Make room for ``nbytes`` more, evicting what policy allows; raise if impossible."""
        with self._lock:
            if nbytes > self.config.memory_budget_bytes:
                raise AgentBudgetError(
                    f"{nbytes / 2**20:.1f} MiB is more than the agent's whole budget of "
                    f"{self.config.memory_budget_bytes / 2**20:.1f} MiB; raise memory_budget_bytes"
                )
            while self.used_bytes() + nbytes > self.config.memory_budget_bytes:
                victims = [s for s in self._snapshots.values() if self._evictable(s) and self._frees_memory(s)]
                if not victims:
                    raise AgentBudgetError(
                        f"the agent's memory budget ({self.config.memory_budget_bytes / 2**20:.1f} MiB) is in use "
                        f"({self.used_bytes() / 2**20:.1f} MiB) by snapshots not yet persisted; wait, or raise it"
                    )
                self._evict(min(victims, key=lambda s: (s.state != SnapshotState.COMMITTED, s.created)))

    def _evictable(self, s: Snapshot) -> bool:
        if s.state == SnapshotState.FAILED:
            return True
        if s.state not in (SnapshotState.PERSISTED, SnapshotState.COMMITTED):
            return False
        if self.config.evict_after == "persisted+replicated" and not s.replica:
            return len(s.replicated_to) >= s.replicas_wanted
        return True

    def _frees_memory(self, s: Snapshot) -> bool:
        return s.session is None or not s.session.alive

    def _evict(self, s: Snapshot) -> None:
        """Drop ``s`` from memory: its segment goes back to its trainer, or is freed."""
        with self._lock:
            if self._snapshots.get(s.key) is not s:
                return
            del self._snapshots[s.key]
            seg = s.segment
            sess = s.session
            if sess is not None and sess.alive and sess.segments.get(seg.name) is seg:
                sess.events.put(("released", seg.name))
            else:
                if sess is not None:
                    sess.segments.pop(seg.name, None)
                self._orphans.pop(seg.name, None)
                self.segments.destroy(seg)
            self._update_gauges()
            self._changed.notify_all()
        log.info("evicted snapshot", extra={"fields": {"run": s.run_url, "writer": s.writer, "step": s.step,
                                                       "state": s.state.value, "replica": s.replica}})

    def _evict_older(self, snap: Snapshot) -> None:
        """``snap`` committed: every snapshot of its writer older than the newest committed one
        may go. Commits finish out of step order, so that newest may be a later step than
        ``snap``, and then ``snap`` goes too (else it would hold its buffer for good)."""
        same = [s for s in self._snapshots.values() if (s.run_url, s.writer) == (snap.run_url, snap.writer)]
        newest = max((s.step for s in same if s.state == SnapshotState.COMMITTED and not s.replica), default=snap.step)
        for s in [s for s in same if s.step < newest and self._evictable(s)]:
            self._evict(s)

    def _update_gauges(self) -> None:
        m = self.metrics
        m.memory_used.set(self.used_bytes())
        m.sessions.set(sum(1 for s in self._sessions.values() if s.alive))
        for st in HELD_STATES:
            m.snapshots.labels(st.value).set(sum(1 for s in self._snapshots.values() if s.state == st))

    # -- sessions ------------------------------------------------------------------------------

    def register(self, run_url: str, writer: str, pid: int, settings: PersistSettings) -> Session:
        with self._lock:
            if self.draining:
                raise AgentDrainingError("the agent is draining; start the trainer against another agent or wait")
            if sum(1 for s in self._sessions.values() if s.alive) >= self.config.max_sessions:
                raise AgentBudgetError(f"the agent serves {self.config.max_sessions} sessions already")
            sess = Session(uuid.uuid4().hex, run_url, writer, pid, settings)
            self._sessions[sess.id] = sess
            self._update_gauges()
        log.info("trainer registered", extra={"fields": {"session": sess.id, "run": run_url, "writer": writer,
                                                         "pid": pid}})
        return sess

    def session(self, session_id: str) -> Session:
        with self._lock:
            sess = self._sessions.get(session_id)
            if sess is None or not sess.alive:
                raise AgentNotFoundError(f"unknown session {session_id!r}: register first")
            return sess

    def session_count(self) -> int:
        with self._lock:
            return len(self._sessions)

    def end_session(self, session_id: str) -> None:
        """The trainer went away: free its segments that hold no snapshot."""
        with self._lock:
            sess = self._sessions.pop(session_id, None)
            if sess is None:
                return
            sess.alive = False
            held = {s.segment.name for s in self._snapshots.values() if s.session is sess} | set(self._announcing)
            for name, seg in list(sess.segments.items()):
                if name in held:
                    self._orphans[name] = seg
                else:
                    self.segments.destroy(seg)
            sess.segments.clear()
            for s in self._snapshots.values():
                if s.session is sess:
                    s.session = None
            # snapshots that no longer need their memory and free it now
            for s in [s for s in self._snapshots.values()
                      if s.state == SnapshotState.FAILED and s.segment.name in self._orphans]:
                self._evict(s)
            self._update_gauges()
            self._changed.notify_all()
        log.info("trainer session ended", extra={"fields": {"session": session_id, "kept_segments": len(held)}})

    def lease(self, session_id: str, nbytes: int) -> Segment:
        with self._lock:
            sess = self.session(session_id)
            if self.draining:
                raise AgentDrainingError("the agent is draining")
            self._reserve(nbytes)
            seg = self.segments.create(nbytes)
            sess.segments[seg.name] = seg
            self._update_gauges()
            return seg

    def release_buffer(self, session_id: str, name: str) -> bool:
        with self._lock:
            sess = self.session(session_id)
            seg = sess.segments.get(name)
            if seg is None:
                raise AgentNotFoundError(f"segment {name!r} is not leased to this session")
            if name in self._announcing or any(s.segment is seg for s in self._snapshots.values()):
                # The trainer's pool let go of it, but a snapshot lives in it: free on eviction.
                del sess.segments[name]
                self._orphans[name] = seg
                for s in self._snapshots.values():
                    if s.segment is seg:
                        s.session = None
                return False
            del sess.segments[name]
            self.segments.destroy(seg)
            self._update_gauges()
            return True

    # -- snapshots -----------------------------------------------------------------------------

    def hold(self, session_id: str, segment: str, step: int, save_id: str, writers: tuple[str, ...],
             committer: bool, plan_json: str) -> Snapshot:
        """Hold the snapshot a trainer staged into ``segment``; raises if the announce does not
        fit what is held (the segment, the step order, the save's writers)."""
        with self._lock:
            sess = self.session(session_id)
            if self.draining:
                raise AgentDrainingError("the agent is draining")
            seg = sess.segments.get(segment)
            if seg is None:
                raise AgentStateError(f"segment {segment!r} is not leased to this session: lease it, stage into "
                                      "it, then announce")
            busy = [s.step for s in self._snapshots.values() if s.segment is seg]
            if busy or seg.name in self._announcing:
                raise AgentStateError(f"segment {segment!r} still holds step {busy[0] if busy else step}: wait for "
                                      "its release")
            if sess.writer not in writers:
                raise PlanError(f"writer {sess.writer!r} is not among the save's writers")
            key = (sess.run_url, sess.writer, step)
            self._drop_abandoned(sess, step)
            old = self._snapshots.get(key)
            if old is not None and old.state != SnapshotState.FAILED:
                raise SnapshotExistsError(f"step {step} of {sess.writer} is already held (save {old.save_id})")
            newer = [s.step for s in self._snapshots.values() if (s.run_url, s.writer) == key[:2]
                     and s.step > step and s.state != SnapshotState.FAILED and not s.replica]
            if newer:
                raise AgentStateError(f"step {step} is older than step {max(newer)} already held for "
                                      f"{sess.writer}: snapshots must be announced in step order")
            if old is not None:
                self._evict(old)
            self._announcing[seg.name] = seg
        try:
            plan = decode_plan(plan_json, seg.tensor)  # outside the lock: parsing may take a while
        except BaseException:
            with self._lock:
                del self._announcing[seg.name]
                if self._orphans.pop(seg.name, None) is not None:  # its trainer went away meanwhile
                    self.segments.destroy(seg)
            raise
        with self._lock:
            del self._announcing[seg.name]
            if self._snapshots.get(key) is not None:
                if self._orphans.pop(seg.name, None) is not None:
                    self.segments.destroy(seg)
                raise SnapshotExistsError(f"step {step} of {sess.writer} is already held")
            # A trainer that went away meanwhile left the segment to the agent (an orphan).
            snap = Snapshot(sess.run_url, sess.writer, step, save_id, writers, committer, plan_json, plan, seg,
                            sess.settings, session=sess if sess.alive and seg.name in sess.segments else None,
                            replicas_wanted=len(self.config.ring_successors()))
            self._snapshots[key] = snap
            self._update_gauges()
        return snap

    def _drop_abandoned(self, sess: Session, step: int) -> None:
        """A new trainer of this writer announcing ``step`` means the job rolled back: the
        uncommitted snapshots of this writer at ``step`` or later left by ended trainers can
        never be committed. Drop those that are persisted (or failed); one still being
        persisted keeps blocking until it is."""
        for s in [s for s in self._snapshots.values() if (s.run_url, s.writer) == (sess.run_url, sess.writer)
                  and s.step >= step and not s.replica and s.session is None
                  and s.state in (SnapshotState.PERSISTED, SnapshotState.FAILED)]:
            log.info("dropped a snapshot a rolled-back trainer left", extra={"fields": {
                "run": s.run_url, "writer": s.writer, "step": s.step, "save_id": s.save_id}})
            s.state = SnapshotState.FAILED
            self._evict(s)

    def _add_replica(self, snap: Snapshot) -> None:
        """A replica fully received from a peer."""
        with self._lock:
            old = self._snapshots.get(snap.key)
            if old is not None:
                self._evict(old)
            self._snapshots[snap.key] = snap
            # an older replica of the same writer is superseded once this one exists
            for s in [s for s in self._snapshots.values() if (s.run_url, s.writer) == (snap.run_url, snap.writer)
                      and s.step < snap.step and s.replica and self._evictable(s)]:
                self._evict(s)
            self._update_gauges()

    def receive_replica(self, nbytes: int, fill: Callable[[Segment], Snapshot]) -> Snapshot:
        """Reserve a segment of ``nbytes``; ``fill(segment)`` writes the bytes from a peer and
        returns their snapshot, which is then held as a replica. If ``fill`` fails, the segment
        is freed."""
        seg = self._reserve_replica(nbytes)
        try:
            snap = fill(seg)
            self._adopt_replica_segment(seg)
            self._add_replica(snap)
        except BaseException:
            self._drop_segment(seg)
            raise
        return snap

    def _reserve_replica(self, nbytes: int) -> Segment:
        with self._lock:
            if self.draining:
                raise AgentDrainingError("the agent is draining")
            self._reserve(nbytes)
            seg = self.segments.create(nbytes)
            self._orphans[seg.name] = seg  # counted as the agent's own until the replica is added
            return seg

    def _drop_segment(self, seg: Segment) -> None:
        with self._lock:
            self._orphans.pop(seg.name, None)
            self.segments.destroy(seg)
            self._update_gauges()

    def _adopt_replica_segment(self, seg: Segment) -> None:
        with self._lock:
            self._orphans.pop(seg.name, None)

    def find(self, run_url: str, writer: str, step: int) -> Snapshot:
        with self._lock:
            s = self._snapshots.get((run_url, writer, step))
            if s is None:
                raise AgentNotFoundError(f"no snapshot of step {step} of {writer} in {run_url} is held here")
            return s

    def snapshots(self, run_url: str = "") -> list[Snapshot]:
        with self._lock:
            return sorted((s for s in self._snapshots.values() if not run_url or s.run_url == run_url),
                          key=lambda s: (s.run_url, s.step, s.writer))

    def peer_state(self, run_url: str, writer: str, step: int, save_id: str, state: SnapshotState) -> None:
        """The origin of a replica says how far it got."""
        with self._lock:
            s = self._snapshots.get((run_url, writer, step))
            if s is None or s.save_id != save_id or not s.replica:
                return
            if HELD_STATES.index(state) > HELD_STATES.index(s.state):
                s.state = state
            self._update_gauges()
            if state == SnapshotState.COMMITTED:
                self._evict_older(s)
            elif state == SnapshotState.FAILED:
                self._evict(s)
            self._changed.notify_all()

    def mark_replicated(self, snap: Snapshot, peer: str) -> None:
        with self._lock:
            snap.replicated_to.add(peer)
            self._changed.notify_all()

    def _drop_all(self) -> None:
        """End every session and remove every segment (the agent stops)."""
        with self._lock:
            self.state = "stopped"
            for sess in self._sessions.values():
                sess.alive = False
                sess.events.put(None)
            self._sessions.clear()
            self._snapshots.clear()
            self._orphans.clear()
        self.segments.destroy_all()
