"""Commit notices for a job that commits itself (``ckpt.Checkpointer(..., agent=...)`` on several
nodes, no coordinator): the committer's trainer tells the others through the job's store, each
tells its own node agent.

Without it, the agent of every node but the committer's learns of a commit by polling the commit
point in storage (50 ms at first, backing off to 1 s): one GET per round per node, and up to a
second of delay before the writers of that node hear that their checkpoint committed. With a
process group, every trainer already shares torch.distributed's c10d store (:mod:`ckpt.signals`):

- the committer's trainer, told by its agent that a save committed (or failed), sets every other
  writer's key of that save at once (one ``multi_set``);
- every other trainer waits on its own key (a blocking wait served by the store, no polling), and
  passes a commit on to its node agent (``NoticeCommit`` over the agent's socket); its agent then
  reads the commit point once, at once, and polls for the run's later commits only rarely.

A notice is a hint: the commit point in storage stays the truth, and an agent never told (the
store is gone, the committer died) still finds the commit by polling.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import grpc

from ckpt.signals import OK, CommitSignals, StoreUnusable

log = logging.getLogger(__name__)


class CommitRelay:
    """Waits on the job's store for the commits of this writer's saves and tells its agent.

    ``tell(step, save_id)`` passes one commit on (``AgentClient.notice_commit`` bound to the run).
    """

    def __init__(self, signals: CommitSignals, tell: Callable[[int, str], None], *, timeout_s: float) -> None:
        self.signals = signals
        self.tell = tell
        self.timeout_s = timeout_s
        self.told = 0  # commits passed on to the agent
        self._queue: queue.SimpleQueue[tuple[int, str] | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._waiting: str | None = None  # the save whose key the thread blocks on now
        self._thread = threading.Thread(target=self._loop, name="ckpt-commit-relay", daemon=True)
        self._thread.start()

    # -- the committer's trainer ---------------------------------------------------------------

    def ended(self, save_id: str, writers: tuple[str, ...], error: str | None = None) -> None:
        """This writer's agent committed ``save_id`` (``error`` None) or failed it: tell the others."""
        self.signals.committed(save_id, list(writers), error)

    # -- every other trainer --------------------------------------------------------------------

    def expect(self, step: int, save_id: str) -> None:
        """Wait (in the background) for the commit of ``save_id`` and tell the agent of it."""
        if not self._stop.is_set():
            self._queue.put((step, save_id))

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None or self._stop.is_set():
                return
            step, save_id = item
            with self._lock:
                self._waiting = save_id
            try:
                outcome = self.signals.wait_committed(save_id, timeout_s=self.timeout_s, stop=self._stop)
            except StoreUnusable as e:  # the store is gone: the agent finds later commits by polling
                log.info("the job's store is gone (%s): the node agent polls storage for commits", e)
                return
            finally:
                with self._lock:
                    self._waiting = None
            if outcome != OK:
                continue  # failed, closed, or not heard of in time: nothing to tell
            try:
                self.tell(step, save_id)
                self.told += 1
            except grpc.RpcError as e:  # the agent polls for it instead
                log.debug("telling the node agent of step %d's commit failed: %s", step, e)

    def close(self) -> None:
        """Stop waiting (a wait in progress ends at once) and end the thread."""
        with self._lock:
            self._stop.set()
            waiting = self._waiting
        if waiting is not None:
            self.signals.wake(waiting)
        self._queue.put(None)
        self._thread.join(timeout=10)
