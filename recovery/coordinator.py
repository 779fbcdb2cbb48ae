"""The coordinator: one Ray actor per job holding membership, heartbeats, the checkpoint
registry and the commit role, and detecting hangs, silent agents, failing storage and
stragglers.

Workers and agents talk to it fire-and-forget, so a coordinator that is down (Ray restarts it,
``max_restarts``) never stops training: checkpoints wait for their commit, heartbeats are
lost. A restarted coordinator rebuilds its state from storage (committed steps, saves in
flight) and from the next heartbeats (the attempt, its world size, the workers' run id).
The launcher pulls what happened with :meth:`Coordinator.poll`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Any

from ckpt.retention import RetentionPolicy
from ckpt.storage import open_storage

from . import events as ev
from .config import DetectConfig
from .detect import STORAGE, Failure, Membership
from .registry import CheckpointRegistry, PollResult

log = logging.getLogger(__name__)


class Coordinator:
    """Plain class; :class:`recovery.job.WorkerJob` wraps it with ``ray.remote``. Thread-safe: Ray calls land on
    the actor's thread, commits and checks run on a background thread."""

    def __init__(self, storage_url: str, detect: DetectConfig, *, keep_last: int | None = None,
                 keep_every: int | None = None, poll_s: float = 0.1,
                 clock: Any = time.time, start: bool = True) -> None:
        self.clock = clock
        self.storage = open_storage(storage_url)
        keep = RetentionPolicy(keep_last=keep_last, keep_every=keep_every) if keep_last else None
        self.registry = CheckpointRegistry(self.storage, keep=keep, clock=clock)
        self.membership = Membership(detect)
        self.incarnation = uuid.uuid4().hex[:8]
        self.started_at = clock()
        self.run_id: str | None = None
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._inbox: queue.Queue[tuple[str, tuple, Future | None]] = queue.Queue()
        self._events: list[dict[str, Any]] = []
        self._restores: dict[tuple[int, int], dict[str, Any]] = {}
        self._storage_reported = False
        self._agents: dict[str, Any] = {}  # node -> its agent actor, told of each commit
        self.notices_sent = 0
        self._stop = threading.Event()
        self.registry.rebuild()
        self._note(ev.COORDINATOR, f"coordinator {self.incarnation} up; storage has "
                   f"{len(self.registry.committed)} committed checkpoint(s), newest "
                   f"{self.registry.last_committed}", incarnation=self.incarnation,
                   committed=list(self.registry.committed))
        self._thread = threading.Thread(target=self._commit_loop, name="coordinator-commit", daemon=True)
        self._detector = threading.Thread(target=self._detect_loop, name="coordinator-detect", daemon=True)
        if start:
            self._thread.start()
            self._detector.start()

    # -- from workers and agents (fire-and-forget) --------------------------------------------

    def heartbeat(self, attempt: int, rank: int, world_size: int, step: int | None, metrics: dict[str, float],
                  node: str | None = None, run_id: str | None = None, timing: tuple | None = None) -> None:
        """A worker's heartbeat; ``timing``: its compute timing totals (``recovery.worker.Reporter``)."""
        with self._lock:
            if self.membership.heartbeat(attempt, rank, world_size, step, metrics, self.clock(), node,
                                         timing) and run_id:
                if run_id != self.run_id:  # first heard of this run (or this coordinator restarted)
                    self._inbox.put(("adopt", (), None))
                self.run_id = run_id

    def agent_heartbeat(self, node: str, status: dict[str, Any]) -> None:
        with self._lock:
            self.membership.agent_heartbeat(node, status, self.clock())

    # What a node agent relays for the ranks of its node, batched: one call per node and interval
    # instead of one per rank and event; the leader of a relay group sends its group's batches in
    # one call (the coordinator's load is O(nodes / group)).
    _RELAYED = frozenset({"heartbeat", "saving", "fragment_ready", "snapshot_report", "restored"})

    def relayed(self, node: str, status: dict[str, Any] | None, calls: list[tuple[str, tuple]]) -> None:
        if status is not None:
            self.agent_heartbeat(node, status)
        for method, args in calls:
            if method in self._RELAYED:
                getattr(self, method)(*args)

    def relayed_many(self, batches: list[tuple[str, dict[str, Any] | None, list[tuple[str, tuple]]]]) -> None:
        """The batches of a relay group's agents, sent by its leader: one call per group."""
        for node, status, calls in batches:
            self.relayed(node, status, calls)

    def saving(self, attempt: int, step: int, save_id: str, writers: list[str]) -> None:
        self._inbox.put(("saving", (step, save_id, tuple(writers), attempt), None))

    def fragment_ready(self, attempt: int, step: int, save_id: str, writer: str) -> None:
        """``writer``'s fragment of the save is durable (read and checked once, on arrival)."""
        self._inbox.put(("fragment", (step, save_id, writer), None))

    def snapshot_report(self, attempt: int, rank: int, step: int, save_id: str, stall_s: float, nbytes: int,
                        error: str | None = None) -> None:
        self._inbox.put(("report", (rank, step, save_id, stall_s, nbytes), None))
        if error:
            self._inbox.put(("writer_failed", (step, save_id, f"rank{rank:05d}", error), None))
            with self._lock:
                self._note(ev.CHECKPOINT_FAILED, f"rank {rank}: checkpoint of step {step} failed: {error}",
                           step=step, rank=rank, error=error)

    def restored(self, attempt: int, rank: int, info: dict[str, Any]) -> None:
        with self._lock:
            self._restores[(attempt, rank)] = dict(info)

    # -- from the launcher ----------------------------------------------------------------------

    def begin_attempt(self, attempt: int, world_size: int) -> None:
        with self._lock:
            self.membership.begin_attempt(attempt, world_size, self.clock())
            self.run_id = None

    def forget_agent(self, node: str) -> None:
        with self._lock:
            self.membership.forget_agent(node)
            self._agents.pop(node, None)

    def set_agents(self, agents: dict[str, Any]) -> None:
        """The node agents (node -> actor with ``committed(run_url, step, save_id)``) told of
        each commit: their writers waiting for it read the commit point at once, once per node,
        instead of polling storage for it (one small call per node and checkpoint)."""
        with self._lock:
            self._agents = dict(agents)

    def settle(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """Commit every save that can be completed now; the committed steps."""
        fut: Future = Future()
        self._inbox.put(("settle", (), fut))
        return fut.result(timeout_s)

    def rollback(self, step: int | None) -> list[int]:
        """The job resumes from ``step``: forget the saves in flight after it."""
        fut: Future = Future()
        self._inbox.put(("rollback", (step,), fut))
        return fut.result(60)

    def poll(self, cursor: int = 0, attempt: int | None = None) -> dict[str, Any]:
        """What happened since ``cursor`` (an index into this incarnation's notes), progress,
        and the restore reports of ``attempt``."""
        with self._lock:
            notes = self._events[cursor:]
            return {"incarnation": self.incarnation, "cursor": len(self._events), "notes": notes,
                    "progress": self.membership.progress(),
                    "restores": {r: info for (a, r), info in self._restores.items() if a == attempt},
                    "committed": list(self.registry.committed), "now": self.clock()}

    def checkpoints(self, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """Every committed checkpoint with its cost, once every report sent before is applied."""
        fut: Future = Future()
        self._inbox.put(("checkpoints", (), fut))
        return fut.result(timeout_s)

    def ping(self) -> str:
        return self.incarnation

    def node(self) -> str:
        """The Ray node this coordinator runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def stop(self) -> None:
        self._stop.set()

    def join(self) -> None:
        for t in (self._thread, self._detector):
            if t.is_alive():
                t.join()

    # -- the background thread ----------------------------------------------------------------

    def _note(self, kind: str, message: str, **fields: Any) -> None:
        # callers hold self._lock (or run before the thread starts)
        self._events.append({"kind": kind, "message": message, "fields": fields, "at": self.clock()})

    def _commit_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.commit_round()
            except Exception:  # noqa: BLE001 - the coordinator keeps going; the next round retries
                log.exception("coordinator commit round failed")
            self._stop.wait(self.poll_s)

    def _detect_loop(self) -> None:
        # Its own thread: a long commit or retention never delays seeing a hang or a dead agent.
        # A round is O(ranks): every poll_s for small jobs, up to once a second at 10,000 ranks
        # (timeouts are tens of seconds; a round every 0.1 s would cost 5% of a core there).
        while not self._stop.is_set():
            try:
                self.detect_round()
            except Exception:  # noqa: BLE001
                log.exception("coordinator detection round failed")
            self._stop.wait(max(self.poll_s, min(1.0, len(self.membership.ranks) * 1e-4)))

    def step_once(self, *, rescan: bool = False) -> None:
        """One round of both threads' work (for a coordinator built with ``start=False``)."""
        self.commit_round(rescan=rescan)
        self.detect_round()

    def commit_round(self, *, rescan: bool = False) -> None:
        """Apply what workers reported (a save began, a fragment is durable: read once, now),
        commit the saves that are complete, run retention. No storage is read per round
        unless a save went quiet (see ``CheckpointRegistry``)."""
        while True:
            try:
                op, args, fut = self._inbox.get_nowait()
            except queue.Empty:
                break
            try:
                if op == "saving":
                    self.registry.saving(*args)
                elif op == "fragment":
                    self.registry.fragment_ready(*args)
                elif op == "writer_failed":
                    self.registry.writer_failed(*args)
                elif op == "report":
                    self.registry.snapshot_report(*args)
                elif op == "adopt":
                    rescan = True
                elif op == "settle":
                    with self._lock:
                        run_id, world = self.run_id, self.membership.world_size
                    self.registry.rebuild(run_id, world)
                    self._record(self.registry.complete())
                    fut.set_result({"committed": list(self.registry.committed)})
                elif op == "checkpoints":
                    fut.set_result([rec.to_dict() for _step, rec in sorted(self.registry.saves.items())
                                    if rec.committed_at is not None])
                elif op == "rollback":
                    gone = self.registry.abandon_after(args[0])
                    fut.set_result(gone)
            except BaseException as e:  # noqa: BLE001 - back to the caller, if one waits
                if fut is not None and not fut.done():
                    fut.set_exception(e)
                else:
                    raise
        if rescan:  # this coordinator restarted: adopt the saves in flight of the current run
            with self._lock:
                run_id, world = self.run_id, self.membership.world_size
            self.registry.rebuild(run_id, world)
        self._record(self.registry.poll())

    def detect_round(self) -> None:
        now = self.clock()
        with self._lock:
            for f in self.membership.check(now):
                self._failure(f)
            changes, replace = self.membership.check_stragglers(now)
            for c in changes:
                where = f" on node {c.node[:12]}" if c.node else ""
                self._note(ev.STRAGGLER, f"rank {c.rank}{where} is a straggler: {c.describe()}" if c.slow else
                           f"rank {c.rank}{where} is no straggler any more after {now - (c.since or now):.1f} s: "
                           f"{c.describe()}", attempt=self.membership.attempt, **c.to_fields())
            for f in replace:
                self._failure(f)
            failures = self.registry.consecutive_failures
            limit = self.membership.config.storage_failure_limit
            if failures >= limit and not self._storage_reported:
                self._storage_reported = True
                self._failure(Failure(STORAGE, self.membership.attempt, f"{failures} checkpoints in a row failed", now,
                                      last_step=self.membership.last_step))
            elif failures == 0:
                self._storage_reported = False

    def _failure(self, f: Failure) -> None:
        self._note(ev.FAILURE, f.detail, failure=f.to_dict())

    def _record(self, result: PollResult) -> None:
        with self._lock:
            agents = list(self._agents.values())
        for rec in result.committed:
            for agent in agents:
                try:
                    agent.committed.remote(self.storage.url, rec.step, rec.save_id)
                    self.notices_sent += 1
                    rec.agents_told += 1
                except Exception:  # noqa: BLE001 - that agent finds the commit by polling storage
                    log.debug("cannot tell an agent of the commit of step %d", rec.step, exc_info=True)
        with self._lock:
            for rec in result.committed:
                self._note(ev.CHECKPOINT, f"committed step {rec.step} ({len(rec.writers)} writers)",
                           step=rec.step, writers=len(rec.writers), save_id=rec.save_id,
                           latency_s=round(rec.committed_at - rec.began_at, 3) if rec.committed_at else None)
            for rec in result.failed:
                self._note(ev.CHECKPOINT_FAILED, f"checkpoint of step {rec.step} failed: {rec.failed}",
                           step=rec.step, error=rec.failed)
            if result.deleted:
                self._note(ev.RETENTION, f"retention removed steps {list(result.deleted)}",
                           deleted=list(result.deleted))
