"""The agent's work on what it holds, without gRPC: a staged snapshot is persisted by a pool of
persist workers (``ckpt.io.write_plan``), then committed through ``ckpt.commit`` (the committer
writes the commit point once every writer's fragment is there), then retention runs if the
trainer sent a policy; each state change goes to the trainer's session and the ring. Drain and
shutdown. The servicers in :mod:`agent.daemon.servicers` only validate requests and call in here;
what is held, and eviction, is :class:`agent.daemon.holding.Holding`.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ckpt import SnapshotState
from ckpt import format as fmt
from ckpt.commit import complete, ensure_not_committed
from ckpt.io import write_plan
from ckpt.retention import RetentionPolicy, run_gc
from ckpt.storage import Storage, open_storage
from ckpt.waits import mark_failed, wait_for_commit_point

from ..config import AgentConfig
from .documents import index_persisted
from .heard import FragmentsHeard, PersistNotice
from .holding import Holding
from .metrics import AgentMetrics
from .snapshot import Snapshot
from .steptable import StepTables

log = logging.getLogger(__name__)


class Agent(Holding):
    """Everything the servicers delegate to. Thread-safe; one lock guards the tables."""

    def __init__(self, config: AgentConfig, *, metrics: AgentMetrics | None = None,
                 notify_peers: Callable[[Snapshot], None] | None = None,
                 replicate: Callable[[Snapshot], None] | None = None) -> None:
        super().__init__(config, metrics or AgentMetrics())
        self.notify_peers = notify_peers
        self.replicate = replicate
        self.step_tables = StepTables(self)  # GetStepTable: each committed step's, built as it commits
        self._storages: dict[str, Storage] = {}
        self._persist_q: queue.Queue[Snapshot | None] = queue.Queue()
        self._stop = threading.Event()
        self._commit_pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="agent-commit")
        self._retention_lock = threading.Lock()  # one retention pass at a time: two would delete the same steps
        self._commit_points: dict[tuple[str, int], tuple[str, bytes, str]] = {}
        self._commit_locks: dict[tuple[str, int], threading.Lock] = {}
        self._notices: dict[tuple[str, int], threading.Event] = {}  # notice_commit: (run, step) -> wakes its wait
        self._failed_saves: dict[tuple[str, int, str], str] = {}  # notice_commit with an error: (run, step, save) -> why
        self._told_runs: set[str] = set()  # runs whose commits are announced to this agent
        # notice_persisted: (run, step, save) -> the notice its commit waits on; runs that announce
        self._persisted: dict[tuple[str, int, str], PersistNotice] = {}
        self._told_persisted_runs: set[str] = set()
        # (run, step) -> saves being persisted or committed here. Kept apart from the snapshots:
        # a persisted snapshot may be evicted (a newer one committed) while its commit is still
        # in flight, and retention must not delete that step under the commit.
        self._in_flight: Counter[tuple[str, int]] = Counter()
        self._persisters = [threading.Thread(target=self._persist_loop, name=f"agent-persist-{i}", daemon=True)
                            for i in range(config.persist_workers)]
        for t in self._persisters:
            t.start()

    def announce(self, session_id: str, segment: str, step: int, save_id: str, writers: tuple[str, ...],
                 committer: bool, plan_json: str) -> Snapshot:
        """A trainer staged a snapshot into ``segment``: hold it, persist it, replicate it."""
        snap = self.hold(session_id, segment, step, save_id, writers, committer, plan_json)
        self.metrics.bytes_staged.inc(snap.nbytes)
        log.info("snapshot staged", extra={"fields": {"run": snap.run_url, "writer": snap.writer, "step": step,
                                                      "bytes": snap.nbytes}})
        self._enqueue_persist(snap)
        if self.replicate is not None and snap.replicas_wanted:
            self.replicate(snap)
        return snap

    # -- persist and commit --------------------------------------------------------------------

    def persist_queue_depth(self) -> int:
        return self._persist_q.qsize()

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
                    index_persisted(snap, frag)
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
        index_persisted(snap, frag)
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

    # The commit points this agent read lately, by (run, step): its node's writers of a step wait
    # for one commit and read its commit point once, not once each.
    COMMIT_POINTS_KEPT = 8

    def _commit_point(self, storage: Storage, snap: Snapshot) -> tuple[bytes, str]:
        """Commit (the committer) or wait for the commit of ``snap``'s save; its commit point's
        bytes and document."""
        cfg = snap.settings
        key = (snap.run_url, snap.step)
        with self._lock:
            lock = self._commit_locks.setdefault(key, threading.Lock())
        # A committer never waits behind a writer that waits for it.
        with threading.Lock() if snap.committer else lock:
            hit = self._commit_points.get(key)
            if hit is not None and hit[0] == snap.save_id and not snap.committer:
                return hit[1], hit[2]
            if snap.committer:
                with self._lock:  # a run whose persists are announced: wait for the notice, poll rarely
                    told = snap.run_url in self._told_persisted_runs
                    heard = FragmentsHeard(storage, snap.step, self._persist_notice(
                        snap.run_url, snap.step, snap.save_id), self.TOLD_POLL_S, self._stop) if told else None
                manifest = complete(storage, snap.step, snap.save_id, snap.writers, committer=True,
                                    timeout_s=cfg.commit_timeout_s, poll_s=0.05, stop=self._stop,
                                    library_versions=dict(cfg.library_versions), signals=heard)
                root = storage.read(f"{fmt.step_dir(snap.step)}/{fmt.META}")
            else:  # the commit point read once, as it is found (or as the committer says it is there)
                with self._lock:
                    wake = self._notices.setdefault(key, threading.Event())
                    first, most = self.TOLD_POLL_S if snap.run_url in self._told_runs else (0.05, 1.0)
                failed_key = (snap.run_url, snap.step, snap.save_id)
                manifest, root = wait_for_commit_point(storage, snap.step, snap.save_id, timeout_s=cfg.commit_timeout_s,
                                                       poll_s=first, max_poll_s=most, stop=self._stop, wake=wake,
                                                       failed=lambda: self._failed_saves.get(failed_key))
            document = json.dumps(manifest.to_dict())
            with self._lock:
                self._commit_points[key] = (snap.save_id, root, document)
                while len(self._commit_points) > self.COMMIT_POINTS_KEPT:
                    old = next(iter(self._commit_points))
                    del self._commit_points[old]
                    self._commit_locks.pop(old, None)
            return root, document

    # Storage polls for the commit of a run whose commits are announced (the first after this
    # long, at most this far apart): the notice, not the poll, tells of the commit.
    TOLD_POLL_S = (2.0, 10.0)
    NOTICES_KEPT = 64

    def notice_commit(self, run_url: str, step: int, save_id: str, error: str = "") -> None:
        """The committer of ``run_url`` (the job's coordinator) says ``save_id`` committed
        ``step``: the writers of this node waiting for it read the commit point now, not at the
        next poll of storage, and the run's later commits are polled for rarely. With ``error``
        the save failed (a writer skipped its snapshot, say): they stop waiting, with that reason."""
        with self._lock:
            if error:
                self._failed_saves[(run_url, step, save_id)] = error
                while len(self._failed_saves) > self.NOTICES_KEPT:
                    self._failed_saves.pop(next(iter(self._failed_saves)))
            self._told_runs.add(run_url)
            wake = self._notices.setdefault((run_url, step), threading.Event())
            while len(self._notices) > self.NOTICES_KEPT:
                self._notices.pop(next(iter(self._notices)))
        wake.set()

    def notice_persisted(self, run_url: str, step: int, save_id: str, error: str = "") -> None:
        """The committer's trainer of ``run_url`` (a job that commits itself, through the job's
        store) says every writer of ``save_id`` persisted ``step`` (``error``: ``"<writer>: <why>"``
        of one that failed): the commit reads each fragment once, now; the run's later saves look
        for fragments in storage only rarely (:mod:`agent.daemon.heard`)."""
        with self._lock:
            self._told_persisted_runs.add(run_url)
            notice = self._persist_notice(run_url, step, save_id)
            notice.error = error
        notice.wake.set()

    def _persist_notice(self, run_url: str, step: int, save_id: str) -> PersistNotice:
        """(Under the lock.) The notice of that save, made if new; the oldest beyond NOTICES_KEPT dropped."""
        notice = self._persisted.setdefault((run_url, step, save_id), PersistNotice())
        while len(self._persisted) > self.NOTICES_KEPT:
            self._persisted.pop(next(iter(self._persisted)))
        return notice

    def _commit(self, snap: Snapshot) -> None:
        storage = self.storage(snap.run_url)
        cfg = snap.settings
        t0 = time.perf_counter()
        try:
            root, document = self._commit_point(storage, snap)
        except BaseException as e:  # noqa: BLE001
            self._landed(snap)
            self.metrics.failures.labels("commit").inc()
            log.error("commit failed", extra={"fields": {"run": snap.run_url, "writer": snap.writer,
                                                         "step": snap.step, "error": f"{type(e).__name__}: {e}"}})
            self._set_state(snap, SnapshotState.FAILED, error=f"{type(e).__name__}: {e}")
            return
        self._landed(snap)  # committed: from here on retention judges the step by the rules
        self.metrics.commit_seconds.observe(time.perf_counter() - t0)
        self._set_state(snap, SnapshotState.COMMITTED, commit_point=root, document=document)
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
        if state == SnapshotState.COMMITTED:
            self.step_tables.soon(snap.run_url, snap.step)
        if self.notify_peers is not None and not snap.replica and snap.replicas_wanted:
            self.notify_peers(snap)

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
        with self._lock:
            for wake in self._notices.values():  # a commit waited for ends now
                wake.set()
            for notice in self._persisted.values():
                notice.wake.set()
        for _ in self._persisters:
            self._persist_q.put(None)
        for t in self._persisters:
            t.join(timeout=5)
        self._commit_pool.shutdown(wait=False, cancel_futures=True)
        self._drop_all()
