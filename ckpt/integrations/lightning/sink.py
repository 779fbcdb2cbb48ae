"""The sink behind :class:`~ckpt.integrations.lightning.CkptCheckpointIO`: each snapshot goes to
the folder of its Lightning path.

Lightning names every checkpoint by a file path (``.../epoch=0-step=10.ckpt``); here that path
is a ckpt run holding one step, the global step. The engine (a :class:`ckpt.Checkpointer`)
numbers its snapshots with *tickets* (1, 2, 3, ...: two checkpoints of the same global step,
the top-k one and ``last.ckpt``, are two snapshots); :meth:`FolderSink.expect` tells the sink
which folder and step a ticket is for, and :meth:`FolderSink.submit` re-labels the job.

One thread persists and commits the jobs in order, through ``ckpt.commit`` (the one persist
path). Before a write, a step of the same number in the folder (``last.ckpt`` saved twice at
one global step) is deleted, commit point first; after the commit, the folder's other steps
are (``last.ckpt`` overwritten). A removal asked for while the path's snapshot is still being
staged runs after its write, so the write cannot bring the folder back.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ckpt import format as fmt
from ckpt.commit import complete, persist
from ckpt.errors import CkptError
from ckpt.retention import delete_step
from ckpt.sink import PersistJob, Sink, SinkConfig, lower_thread_priority
from ckpt.storage import RetryPolicy, open_storage

from ._tree import split_url

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Target:
    """Where one snapshot goes: the folder of a Lightning path, and the step inside it."""

    url: str
    step: int
    remove_after: bool = False  # removal was asked for before the snapshot reached the sink


def remove_folder(url: str, *, storage_options: dict[str, Any] | None = None, retry: RetryPolicy | None = None) -> None:
    """Delete the checkpoint folder ``url``: every step's commit point first (readers stop seeing
    it at once), then the files, then the folder. A path that does not exist is left alone; a
    symbolic link (``ModelCheckpoint(save_last="link")``) is removed, not what it points to."""
    if os.path.islink(url):
        os.unlink(url)
        return
    storage = open_storage(url, storage_options=storage_options, retry=retry)
    for info in fmt.list_steps(storage):
        delete_step(storage, info.step)
    parent, name = split_url(url)
    open_storage(parent, storage_options=storage_options, retry=retry).delete(name, recursive=True)


class FolderSink(Sink):
    """Persists each snapshot into the folder of its Lightning path; see the module docstring."""

    def __init__(
        self, config: SinkConfig, *, storage_options: dict[str, Any] | None = None, retry: RetryPolicy | None = None
    ) -> None:
        self.config = config
        self.storage_options = storage_options
        self.retry = retry
        self._expected: dict[int, Target] = {}  # ticket -> target, until the job is submitted
        self._lock = threading.Lock()
        self._q: queue.Queue[tuple[PersistJob, Target] | Callable[[], None] | None] = queue.Queue()
        self._stop = threading.Event()
        self._errors: list[str] = []
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="ckpt-lightning-persist", daemon=True)
        self._thread.start()

    def expect(self, ticket: int, target: Target) -> None:
        """Before ``Checkpointer.save(ticket, ...)``: where that snapshot goes."""
        with self._lock:
            self._expected[ticket] = target

    def submit(self, job: PersistJob) -> None:
        with self._lock:
            if self._closed:
                raise CkptError("the Lightning checkpoint sink is closed")
            target = self._expected.pop(job.step, None)
            if target is None:
                raise CkptError(f"snapshot {job.step} has no Lightning path (CkptCheckpointIO.expect was not called)")
            job.step = target.step
            job.save_id = f"{uuid.uuid4().hex[:12]}-{target.step}"
            self._q.put((job, target))

    def remove(self, url: str) -> None:
        """Remove the folder ``url`` in the background, after any snapshot of it not written yet."""
        with self._lock:
            pending = [t for t in self._expected.values() if t.url == url]
            if pending:
                pending[-1].remove_after = True
            else:
                self._q.put(lambda: self._remove(url))

    def forget(self) -> list[Target]:
        """The targets whose snapshot never reached the sink (its staging failed), forgotten."""
        with self._lock:
            left, self._expected = list(self._expected.values()), {}
        return left

    def errors(self) -> list[str]:
        with self._lock:
            out, self._errors = self._errors, []
        return out

    # -- the persist thread ------------------------------------------------------------------

    def _loop(self) -> None:
        lower_thread_priority(self.config.nice)
        while (item := self._q.get()) is not None:
            if callable(item):
                item()
                continue
            job, target = item
            self._write(job, target)
            if target.remove_after:
                self._remove(target.url)

    def _write(self, job: PersistJob, target: Target) -> None:
        cfg = self.config
        try:
            storage = open_storage(target.url, storage_options=self.storage_options, retry=self.retry)
            if any(info.step == target.step for info in fmt.list_steps(storage)):
                delete_step(storage, target.step)  # the same path saved again at this step: replaced
            frag = persist(
                storage,
                job.plan,
                step=target.step,
                writer=job.writer,
                save=job.save_id,
                threads=cfg.io_threads,
                durable=cfg.durable,
                layout=cfg.layout,
            )
        except BaseException as e:  # noqa: BLE001 - reported through the futures
            job.release()
            job.persisted.set_exception(e)
            job.committed.set_exception(e)
            return
        job.release()
        job.persisted.set_result(frag)
        try:
            manifest = complete(
                storage,
                target.step,
                job.save_id,
                job.writers,
                committer=True,
                timeout_s=cfg.commit_timeout_s,
                poll_s=cfg.poll_interval_s,
                stop=self._stop,
                known={job.writer: frag},
                library_versions=cfg.library_versions,
            )
        except BaseException as e:  # noqa: BLE001 - reported through the future
            job.committed.set_exception(e)
            return
        # One path, one checkpoint: the older steps of an overwritten path go once this one is readable.
        try:
            for info in fmt.list_steps(storage):
                if info.step != target.step:
                    delete_step(storage, info.step)
        except Exception as e:  # noqa: BLE001 - the new checkpoint is committed; say what is left
            self._record(f"{target.url}: the steps before {target.step} could not be deleted: {e}")
        job.committed.set_result(manifest)

    def _remove(self, url: str) -> None:
        try:
            remove_folder(url, storage_options=self.storage_options, retry=self.retry)
        except Exception as e:  # noqa: BLE001 - reported at the next save or at teardown
            self._record(f"removing the checkpoint {url} failed: {type(e).__name__}: {e}")

    def _record(self, msg: str) -> None:
        log.error(msg)
        with self._lock:
            self._errors.append(msg)

    def close(self, *, wait: bool = True) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if not wait:
            self._stop.set()
        self._q.put(None)
        self._thread.join()
