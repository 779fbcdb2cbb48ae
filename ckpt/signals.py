"""A save's progress told through the job's key-value store instead of storage polled in rounds.

Writers of a job with a process group and no node agent used to learn of the commit by reading
the commit point again and again, and the committer looked for every missing fragment and failure
marker on every round: O(writers) storage requests per round (34 of the 42 GETs of an 8-writer
save on an object store were writers polling for the commit point). Every job with a process
group has torch.distributed's c10d store (served by rank 0's process), so:

- a writer that persisted its part (or failed) sets its key and adds one to the save's count;
- the committer waits for the count (two requests per round to the store, none to storage; a
  failed writer ends the wait), reads the writers' keys once, reads each fragment once and
  commits;
- it then sets every other writer's commit key at once; each writer blocks on its own key (a
  wait served by the store, no polling), then reads the commit point once.

Keys are deleted as they are read. When the store cannot be used (the job has none, rank 0's
process is gone), the callers fall back to storage, which stays the truth: a commit point
exists or it does not.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta
from typing import Any

from .dist import Group

log = logging.getLogger(__name__)

OK = "ok"
CLOSED = "closed"
FAILED = "failed: "  # then the reason
_WAIT_CHUNK_S = 30.0  # a blocked wait returns at least this often (its timeout is logged by c10d)


class StoreUnusable(Exception):
    """The store failed (its server's process is gone): use storage instead."""


class CommitSignals:
    """One writer's view of the job's store for the saves of one Checkpointer (``run_id``)."""

    def __init__(self, store: Any, prefix: str, writer: str) -> None:
        self.store = store
        self.prefix = prefix
        self.writer = writer
        self._waiter: Any = None  # a connection of its own for blocking waits (a store client serves
        # one request at a time: a wait on the job's own would hold up the process group's use of it)

    @classmethod
    def of(cls, group: Group, run_id: str, writer: str) -> CommitSignals | None:
        """The signals of ``group``'s job, or None when it has no store (no process group)."""
        if not group.distributed or group.pg is None:
            return None
        try:
            from torch.distributed import distributed_c10d

            store = distributed_c10d._get_default_store()
        except Exception:  # no store: storage is polled, as without a process group
            log.debug("no c10d store: writers poll storage for the commit", exc_info=True)
            return None
        signals = cls(store, f"ckpt/{run_id}", writer)
        try:  # connected now, while rank 0's process serves: later it may be gone
            signals._waiter = store.clone()
        except Exception:  # noqa: BLE001 - waits then go through the job's store itself
            signals._waiter = store
        return signals

    def _key(self, save: str, kind: str, writer: str = "") -> str:
        return f"{self.prefix}/{save}/{kind}/{writer}"

    def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as e:  # the store's server is gone, or refused
            raise StoreUnusable(f"{type(e).__name__}: {e}") from e

    # -- writers -----------------------------------------------------------------------------------

    def persisted(self, save: str, error: str | None = None) -> None:
        """This writer's part of ``save`` is durable (``error`` None) or failed. Best effort: a
        committer that does not hear of it finds the fragment or failure marker in storage."""
        try:
            self._call(self.store.set, self._key(save, "p", self.writer), OK if error is None else f"{FAILED}{error}")
            self._call(self.store.add, self._key(save, "n" if error is None else "f"), 1)
        except StoreUnusable as e:
            log.debug("could not signal the persist of %s: %s", save, e)

    def wait_committed(self, save: str, *, timeout_s: float, stop: threading.Event | None = None) -> str | None:
        """Block until the committer says how ``save`` ended: ``OK``, the error, or ``CLOSED``
        (this writer's :meth:`wake`); None when ``timeout_s`` passed. ``StoreUnusable``."""
        key = self._key(save, "c", self.writer)
        if self._waiter is None:
            self._waiter = self._call(self.store.clone)
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                self._waiter.wait([key], timedelta(seconds=min(left, _WAIT_CHUNK_S)))
                break
            except Exception as e:  # a timeout of this chunk, or the store gone
                if "timeout" not in str(e).lower():
                    raise StoreUnusable(f"{type(e).__name__}: {e}") from e
                if stop is not None and stop.is_set():
                    return CLOSED
        value = self._call(self.store.get, key).decode()
        self._call(self.store.delete_key, key)
        return value

    def wake(self, save: str) -> None:
        """End this writer's :meth:`wait_committed` on ``save`` (the Checkpointer closes)."""
        try:
            self._call(self.store.set, self._key(save, "c", self.writer), CLOSED)
        except StoreUnusable:
            pass

    # -- the committer -------------------------------------------------------------------------------

    def wait_persisted(self, save: str, writers: list[str], *, timeout_s: float, poll_s: float,
                       stop: threading.Event | None = None) -> tuple[list[str], dict[str, str]]:
        """Block until every writer of ``writers`` (all of the save's, this one included)
        signalled ``save``, one failed, ``timeout_s`` passed or ``stop`` is set: (the writers
        not heard of, the errors of those that failed). Two requests to the store per round,
        whatever the writers. ``StoreUnusable``."""
        count_key, failed_key = self._key(save, "n"), self._key(save, "f")
        deadline = time.monotonic() + timeout_s
        delay = poll_s
        while True:
            n = self._call(self.store.add, count_key, 0)
            if n >= len(writers) or self._call(self.store.add, failed_key, 0) > 0 or time.monotonic() > deadline:
                break
            if stop is not None and stop.wait(delay):
                break
            delay = min(delay * 2, 1.0)
        keys = {w: self._key(save, "p", w) for w in writers}
        present = list(keys) if n >= len(writers) else [w for w, k in keys.items() if self._call(self.store.check, [k])]
        values = self._call(self.store.multi_get, [keys[w] for w in present]) if present else []
        for key in [keys[w] for w in present] + [count_key, failed_key]:
            self._call(self.store.delete_key, key)
        heard = dict(zip(present, (v.decode() for v in values)))
        errors = {w: v.removeprefix(FAILED) for w, v in heard.items() if v != OK}
        return [w for w in writers if w not in heard], errors

    def committed(self, save: str, writers: list[str], error: str | None = None) -> None:
        """Tell every other writer how ``save`` ended (best effort: they fall back to storage)."""
        others = [w for w in writers if w != self.writer]
        if not others:
            return
        value = OK if error is None else f"{FAILED}{error}"
        try:
            self._call(self.store.multi_set, [self._key(save, "c", w) for w in others], [value] * len(others))
        except StoreUnusable as e:
            log.warning("could not tell the writers of %s that it %s: %s; they read storage", save,
                        "committed" if error is None else "failed", e)
