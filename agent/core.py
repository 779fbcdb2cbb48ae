"""The agent's state and work, without gRPC: sessions, leased segments, held snapshots, the
persist/commit pipeline, eviction, drain. The servicers in :mod:`agent.server` only validate
requests and call in here.

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

import json
import logging
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ckpt import SnapshotState
from ckpt import format as fmt
from ckpt.commit import complete, ensure_not_committed, mark_failed
from ckpt.io import write_plan
from ckpt.retention import RetentionPolicy, run_gc
from ckpt.storage import Storage, open_storage

from .config import AgentConfig
from .errors import (
    AgentBudgetError,
    AgentDrainingError,
    AgentNotFoundError,
    AgentStateError,
    PlanError,
    SnapshotExistsError,
)
from .metrics import AgentMetrics
from .plan import DecodedPlan, decode_plan
from .shm import Segment, SegmentFactory

log = logging.getLogger(__name__)

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


class Agent:
    """Everything the servicers delegate to. Thread-safe; one lock guards the tables."""

    def __init__(self, config: AgentConfig, *, metrics: AgentMetrics | None = None,
                 notify_peers: Callable[[Snapshot], None] | None = None,
                 replicate: Callable[[Snapshot], None] | None = None) -> None:
        self.config = config
        self.metrics = metrics or AgentMetrics()
        self.metrics.memory_budget.set(config.memory_budget_bytes)
        self.segments = SegmentFactory(config.shm_dir, config.shm_prefix, config.shm_mode)
        self.notify_peers = notify_peers
        self.replicate = replicate
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._sessions: dict[str, Session] = {}
        self._snapshots: dict[tuple[str, str, int], Snapshot] = {}
        self._orphans: dict[str, Segment] = {}  # segments of gone sessions, holding a snapshot
        self._storages: dict[str, Storage] = {}
        self._persist_q: queue.Queue[Snapshot | None] = queue.Queue()
        self._stop = threading.Event()
        self.draining = False
        self.state = "serving"
        self._commit_pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="agent-commit")
        self._retention_lock = threading.Lock()  # one retention pass at a time: two would delete the same steps
        # (run, step) -> saves being persisted or committed here. Kept apart from the snapshots:
        # a persisted snapshot may be evicted (a newer one committed) while its commit is still
        # in flight, and retention must not delete that step under the commit.
        self._in_flight: Counter[tuple[str, int]] = Counter()
        self._persisters = [threading.Thread(target=self._persist_loop, name=f"agent-persist-{i}", daemon=True)
                            for i in range(config.persist_workers)]
        for t in self._persisters:
            t.start()

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

    def end_session(self, session_id: str) -> None:
        """The trainer went away: free its segments that hold no snapshot."""
        with self._lock:
            sess = self._sessions.pop(session_id, None)
            if sess is None:
                return
            sess.alive = False
            held = {s.segment.name for s in self._snapshots.values() if s.session is sess}
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
            if any(s.segment is seg for s in self._snapshots.values()):
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

    def announce(self, session_id: str, segment: str, step: int, save_id: str, writers: tuple[str, ...],
                 committer: bool, plan_json: str) -> Snapshot:
        with self._lock:
            sess = self.session(session_id)
            if self.draining:
                raise AgentDrainingError("the agent is draining")
            seg = sess.segments.get(segment)
            if seg is None:
                raise AgentStateError(f"segment {segment!r} is not leased to this session: lease it, stage into it, "
                               "then announce")
            busy = [s for s in self._snapshots.values() if s.segment is seg]
            if busy:
                raise AgentStateError(f"segment {segment!r} still holds step {busy[0].step}: wait for its release")
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
                raise AgentStateError(f"step {step} is older than step {max(newer)} already held for {sess.writer}: "
                               "snapshots must be announced in step order")
            if old is not None:
                self._evict(old)
        plan = decode_plan(plan_json, seg.tensor)  # outside the lock: parsing may take a while
        snap = Snapshot(sess.run_url, sess.writer, step, save_id, writers, committer, plan_json, plan, seg,
                        sess.settings, session=sess, replicas_wanted=len(self.config.ring_successors()))
        with self._lock:
            if self._snapshots.get(key) is not None:
                raise SnapshotExistsError(f"step {step} of {sess.writer} is already held")
            self._snapshots[key] = snap
            self._update_gauges()
        self.metrics.bytes_staged.inc(plan.end)
        log.info("snapshot staged", extra={"fields": {"run": snap.run_url, "writer": snap.writer, "step": step,
                                                      "bytes": plan.end}})
        self._enqueue_persist(snap)
        if self.replicate is not None and snap.replicas_wanted:
            self.replicate(snap)
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

    def add_replica(self, snap: Snapshot) -> None:
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
        seg = self.reserve_replica(nbytes)
        try:
            snap = fill(seg)
            self.adopt_replica_segment(seg)
            self.add_replica(snap)
        except BaseException:
            self.drop_segment(seg)
            raise
        return snap

    def reserve_replica(self, nbytes: int) -> Segment:
        with self._lock:
            if self.draining:
                raise AgentDrainingError("the agent is draining")
            self._reserve(nbytes)
            seg = self.segments.create(nbytes)
            self._orphans[seg.name] = seg  # counted as the agent's own until the replica is added
            return seg

    def drop_segment(self, seg: Segment) -> None:
        with self._lock:
            self._orphans.pop(seg.name, None)
            self.segments.destroy(seg)
            self._update_gauges()

    def adopt_replica_segment(self, seg: Segment) -> None:
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

    # -- persist and commit --------------------------------------------------------------------

    def _enqueue_persist(self, snap: Snapshot) -> None:
        self._persist_q.put(snap)
        self.metrics.persist_queue.set(self._persist_q.qsize())

    def take_over(self, snap: Snapshot) -> None:
        """The origin of this replica is lost: persist it (and commit, if it was the committer)."""
        with self._lock:
            if (snap.taken_over or self._snapshots.get(snap.key) is not snap
                    or snap.state in (SnapshotState.COMMITTED, SnapshotState.FAILED)):
                return
            snap.taken_over = True
        self.metrics.takeovers.inc()
        log.warning("origin agent lost: persisting its replica here", extra={"fields": {
            "run": snap.run_url, "writer": snap.writer, "step": snap.step, "origin": snap.origin_agent}})
        self._enqueue_persist(snap)

    def storage(self, run_url: str) -> Storage:
        with self._lock:
            st = self._storages.get(run_url)
            if st is None:
                st = self._storages[run_url] = open_storage(run_url)
            return st

    def _persist_loop(self) -> None:
        while (snap := self._persist_q.get()) is not None:
            self.metrics.persist_queue.set(self._persist_q.qsize())
            with self._lock:
                self._in_flight[(snap.run_url, snap.step)] += 1
            try:
                self._persist(snap)
            except BaseException as e:  # noqa: BLE001 - reported through the snapshot's state
                self._landed(snap)
                self.metrics.failures.labels("takeover" if snap.replica else "persist").inc()
                log.error("persist failed", extra={"fields": {"run": snap.run_url, "writer": snap.writer,
                                                              "step": snap.step, "error": f"{type(e).__name__}: {e}"}})
                self._mark_failed(snap, e)
                self._set_state(snap, SnapshotState.FAILED, error=f"{type(e).__name__}: {e}")
                continue
            self._commit_pool.submit(self._commit, snap)

    def _persist(self, snap: Snapshot) -> None:
        storage = self.storage(snap.run_url)
        if snap.replica:
            try:  # the origin may have persisted it before it was lost
                frag = fmt.read_fragment(storage, snap.step, snap.writer)
                if frag.save_id == snap.save_id:
                    self._set_state(snap, SnapshotState.PERSISTED, fragment_json=json.dumps(frag.to_dict()))
                    return
            except FileNotFoundError:
                pass
        if ensure_not_committed(storage, snap.step, snap.save_id):  # a replica whose step was committed meanwhile
            self._set_state(snap, SnapshotState.PERSISTED)
            return
        t0 = time.perf_counter()
        frag = write_plan(storage, snap.plan.plan, step=snap.step, writer=snap.writer, save_id=snap.save_id,
                          threads=snap.settings.io_threads, durable=snap.settings.durable)
        self.metrics.persist_seconds.observe(time.perf_counter() - t0)
        self.metrics.bytes_persisted.inc(snap.nbytes)
        log.info("snapshot persisted", extra={"fields": {"run": snap.run_url, "writer": snap.writer,
                                                         "step": snap.step, "seconds": round(time.perf_counter() - t0, 3)}})
        self._set_state(snap, SnapshotState.PERSISTED, fragment_json=json.dumps(frag.to_dict()))

    def _mark_failed(self, snap: Snapshot, error: BaseException) -> None:
        mark_failed(self.storage(snap.run_url), snap.step, snap.writer, snap.save_id, error)

    def _landed(self, snap: Snapshot) -> None:
        """``snap``'s persist or commit is over (done or failed)."""
        with self._lock:
            key = (snap.run_url, snap.step)
            self._in_flight[key] -= 1
            if self._in_flight[key] <= 0:
                del self._in_flight[key]

    def _commit(self, snap: Snapshot) -> None:
        storage = self.storage(snap.run_url)
        cfg = snap.settings
        t0 = time.perf_counter()
        try:
            manifest = complete(storage, snap.step, snap.save_id, snap.writers, committer=snap.committer,
                                timeout_s=cfg.commit_timeout_s, poll_s=0.05, stop=self._stop,
                                library_versions=dict(cfg.library_versions))
            root = storage.read(f"{fmt.step_dir(snap.step)}/{fmt.META}")
        except BaseException as e:  # noqa: BLE001
            self._landed(snap)
            self.metrics.failures.labels("commit").inc()
            log.error("commit failed", extra={"fields": {"run": snap.run_url, "writer": snap.writer,
                                                         "step": snap.step, "error": f"{type(e).__name__}: {e}"}})
            self._set_state(snap, SnapshotState.FAILED, error=f"{type(e).__name__}: {e}")
            return
        self._landed(snap)  # committed: from here on retention judges the step by the rules
        self.metrics.commit_seconds.observe(time.perf_counter() - t0)
        self._set_state(snap, SnapshotState.COMMITTED, commit_point=root, document=json.dumps(manifest.to_dict()))
        if snap.committer and cfg.keep_last:
            # Steps of this run still being persisted or committed here are never retired:
            # commits run in parallel and may finish out of step order, so an incomplete step
            # older than the newest committed one can still be on its way.
            try:
                with self._retention_lock:
                    with self._lock:
                        busy = {s.step for s in self._snapshots.values() if s.run_url == snap.run_url
                                and s.state in (SnapshotState.STAGED, SnapshotState.PERSISTED)}
                        busy |= {step for (run, step) in self._in_flight if run == snap.run_url}
                    result = run_gc(storage, RetentionPolicy(keep_last=cfg.keep_last,
                                                             keep_every=cfg.keep_every or None),
                                    measure=False, in_progress=busy)
                if result.deleted:
                    log.info("retention removed steps", extra={"fields": {"run": snap.run_url,
                                                                          "steps": result.deleted}})
            except Exception:  # noqa: BLE001 - retention never fails a checkpoint
                self.metrics.failures.labels("retention").inc()
                log.warning("retention failed", exc_info=True)

    def _set_state(self, snap: Snapshot, state: SnapshotState, *, error: str = "", fragment_json: str = "",
                   commit_point: bytes = b"", document: str = "") -> None:
        with self._lock:
            snap.state = state
            snap.error = error
            if fragment_json:
                snap.fragment_json = fragment_json
            if commit_point:
                snap.commit_point = commit_point
            sess = snap.session
            if sess is not None and sess.alive and not snap.replica:
                doc = fragment_json if state == SnapshotState.PERSISTED else document
                sess.events.put(("snapshot", snap.step, snap.save_id, state, error, doc))
            if state == SnapshotState.COMMITTED:
                self._evict_older(snap)
            elif state == SnapshotState.FAILED:
                self._evict(snap)
            self._update_gauges()
            self._changed.notify_all()
        if self.notify_peers is not None and not snap.replica and snap.replicas_wanted:
            self.notify_peers(snap)

    def _evict_older(self, snap: Snapshot) -> None:
        """``snap`` committed: every snapshot of its writer older than the newest committed one
        may go. Commits finish out of step order, so that newest may be a later step than
        ``snap``, and then ``snap`` goes too (else it would hold its buffer for good)."""
        same = [s for s in self._snapshots.values() if (s.run_url, s.writer) == (snap.run_url, snap.writer)]
        newest = max((s.step for s in same if s.state == SnapshotState.COMMITTED and not s.replica), default=snap.step)
        for s in [s for s in same if s.step < newest and self._evictable(s)]:
            self._evict(s)

    def mark_replicated(self, snap: Snapshot, peer: str) -> None:
        with self._lock:
            snap.replicated_to.add(peer)
            self._changed.notify_all()

    # -- drain and shutdown --------------------------------------------------------------------

    def pending(self) -> list[Snapshot]:
        """Snapshots this agent still has work on: not persisted, or (as committer) not committed."""
        with self._lock:
            return [s for s in self._snapshots.values() if s.our_duty and (
                s.state == SnapshotState.STAGED or (s.state == SnapshotState.PERSISTED and s.committer))]

    def drain(self, timeout_s: float) -> bool:
        """Refuse new work; wait for held snapshots to be persisted and committed."""
        with self._lock:
            self.draining = True
            self.state = "draining"
        log.info("draining", extra={"fields": {"pending": len(self.pending())}})
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self.pending():
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("drain timed out", extra={"fields": {"pending": len(self.pending())}})
                    return False
                self._changed.wait(min(left, 0.5))
        return True

    def close(self) -> None:
        """Stop the workers and remove every segment."""
        self._stop.set()
        for _ in self._persisters:
            self._persist_q.put(None)
        for t in self._persisters:
            t.join(timeout=5)
        self._commit_pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            self.state = "stopped"
            for sess in self._sessions.values():
                sess.alive = False
                sess.events.put(None)
            self._sessions.clear()
            self._snapshots.clear()
            self._orphans.clear()
        self.segments.destroy_all()
