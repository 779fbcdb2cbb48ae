"""Notices for a job that commits itself (``ckpt.Checkpointer(..., agent=...)`` on several nodes,
no coordinator): the trainers tell each other through the job's store, each tells its own node
agent, so that no agent polls storage for what a trainer already knows.

Without it, the agent of every node but the committer's learns of a commit by polling the commit
point in storage (50 ms at first, backing off to 1 s): one GET per round per node, and up to a
second of delay before the writers of that node hear that their checkpoint committed. With a
process group, every trainer already shares torch.distributed's c10d store (:mod:`ckpt.signals`):

- the committer's trainer, told by its agent that a save committed (or failed), sets every other
  writer's key of that save at once (one ``multi_set``);
- every other trainer waits on its own key (a blocking wait served by the store, no polling), and
  passes a commit on to its node agent (``NoticeCommit`` over the agent's socket); its agent then
  reads the commit point once, at once, and polls for the run's later commits only rarely.

The committing agent likewise used to look for every other writer's fragment in storage in
rounds. Now every trainer whose agent persisted its part (or failed) says so through the store
(``ckpt.signals``: its key, and one added to the save's count); the committer's trainer waits for
the count (two store requests per round, none to storage) and tells its agent
(``NoticePersisted``), which then reads each fragment once (:mod:`agent.daemon.heard`).

A notice is a hint: storage stays the truth, and an agent never told (the store is gone, the
committer died) still finds the fragments and the commit by polling, only less often.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import grpc

from ckpt.signals import FAILED, OK, CommitSignals, StoreUnusable

log = logging.getLogger(__name__)


class CommitRelay:
    """Waits on the job's store for the commits of this writer's saves (or, on the committer, for
    every writer's persist) and tells its agent.

    ``tell(step, save_id, error)`` passes one commit on (``AgentClient.notice_commit`` bound to
    the run), or its failure (``error``: the writers waiting for it on that node stop);
    ``tell_persisted(step, save_id, error)`` says every writer persisted (``error`` empty) or one
    failed (``AgentClient.notice_persisted``).
    """

    def __init__(self, signals: CommitSignals, tell: Callable[..., None], *, timeout_s: float,
                 tell_persisted: Callable[[int, str, str], None] | None = None) -> None:
        self.signals = signals
        self.tell = tell
        self.tell_persisted = tell_persisted
        self.timeout_s = timeout_s
        self.told = 0  # commits passed on to the agent
        self.told_failed = 0  # failed saves passed on (the agent's writers waiting for them stop)
        self.told_persisted = 0  # saves whose writers all persisted (or one failed), passed on
        self.failed_notices = 0  # notices the agent did not take (it polls storage for those)
        self._queue: queue.SimpleQueue[tuple[int, str, tuple[str, ...] | None] | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._waiting: str | None = None  # the save whose key the thread blocks on now
        self._thread = threading.Thread(target=self._loop, name="ckpt-commit-relay", daemon=True)
        self._thread.start()

    # -- the committer's trainer ---------------------------------------------------------------

    def ended(self, save_id: str, writers: tuple[str, ...], error: str | None = None) -> None:
        """This writer's agent committed ``save_id`` (``error`` None) or failed it: tell the others."""
        self.signals.committed(save_id, list(writers), error)

    def expect_persisted(self, step: int, save_id: str, writers: tuple[str, ...]) -> None:
        """Wait (in the background) until every writer of ``save_id`` persisted, and tell the agent."""
        if not self._stop.is_set() and self.tell_persisted is not None:
            self._queue.put((step, save_id, writers))

    # -- every trainer --------------------------------------------------------------------------

    def persisted(self, save_id: str, error: str | None = None) -> None:
        """This writer's agent persisted its part of ``save_id`` (``error`` None) or failed."""
        self.signals.persisted(save_id, error)

    # -- every other trainer --------------------------------------------------------------------

    def expect(self, step: int, save_id: str) -> None:
        """Wait (in the background) for the commit of ``save_id`` and tell the agent of it."""
        if not self._stop.is_set():
            self._queue.put((step, save_id, None))

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None or self._stop.is_set():
                return
            step, save_id, writers = item
            try:
                if writers is not None:
                    self._relay_persisted(step, save_id, writers)
                else:
                    self._relay_commit(step, save_id)
            except StoreUnusable as e:  # the store is gone: the agent finds what comes later by polling
                log.warning("the job's store is gone (%s): the node agent polls storage for persists and commits", e)
                self._stop.set()  # nothing more is queued
                return
            except grpc.RpcError as e:  # the agent polls for it instead: said once, then quietly
                self.failed_notices += 1
                (log.warning if self.failed_notices == 1 else log.debug)(
                    "telling the node agent about step %d failed (%s): it polls storage instead, which "
                    "delays its commits by up to its poll interval", step, e.code() if hasattr(e, "code") else e)

    def _relay_commit(self, step: int, save_id: str) -> None:
        with self._lock:
            self._waiting = save_id
        try:
            outcome = self.signals.wait_committed(save_id, timeout_s=self.timeout_s, stop=self._stop)
        finally:
            with self._lock:
                self._waiting = None
        if outcome == OK:
            self.tell(step, save_id)
            self.told += 1
        elif outcome is not None and outcome.startswith(FAILED):  # (closed, or not heard of in time: nothing to tell)
            self.tell(step, save_id, outcome.removeprefix(FAILED) or "failed")
            self.told_failed += 1

    def _relay_persisted(self, step: int, save_id: str, writers: tuple[str, ...]) -> None:
        missing, errors = self.signals.wait_persisted(save_id, list(writers), timeout_s=self.timeout_s, poll_s=0.05,
                                                      stop=self._stop)
        if errors:
            writer, why = next(iter(errors.items()))
            self.tell_persisted(step, save_id, f"{writer}: {why}")  # type: ignore[misc]
        elif not missing:
            self.tell_persisted(step, save_id, "")  # type: ignore[misc]
        else:
            return  # not heard of in time (or closing): the agent finds them in storage
        self.told_persisted += 1

    def close(self) -> None:
        """Stop waiting (a wait in progress ends at once) and end the thread."""
        with self._lock:
            self._stop.set()
            waiting = self._waiting
        if waiting is not None:
            self.signals.wake(waiting)
        self._queue.put(None)
        self._thread.join(timeout=10)
