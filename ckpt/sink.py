"""Where staged snapshots go to be persisted and committed: the sink plug point.

The engine hands a :class:`PersistJob` (a save plan whose tensors are host copies) to a
:class:`Sink`. :class:`InProcessSink`, the default, writes with background threads of the
training process; the node agent is another sink behind the same interface. Both persist
through the same format writer (:func:`ckpt.write_plan`) and commit with :func:`ckpt.commit`.

Committing needs no collective: each writer's fragment, written last, says its part is
durable; the committer polls storage for the fragments of every writer of the save (a stale
fragment of an earlier attempt has another ``save_id`` and does not count), then commits.
A writer that fails writes a ``.failed`` marker beside its fragment so the committer stops
waiting at once.
"""

from __future__ import annotations

import abc
import json
import logging
import os
import sys
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from . import format as fmt
from .errors import CheckpointExistsError, CkptError, CommitError
from .hostpool import HostBufferPool, Slab
from .manifest import Fragment, Manifest
from .storage import Storage

log = logging.getLogger(__name__)


@dataclass(eq=False)
class PersistJob:
    """One staged snapshot of one writer, to persist (and commit, if ``committer``)."""

    step: int
    save_id: str
    writer: str
    writers: tuple[str, ...]
    plan: "SavePlan"  # noqa: F821 - from ckpt.api; typed loosely to keep this module's imports small
    committer: bool
    release: Callable[[], None] = lambda: None
    slab: Slab | None = None  # the host memory the plan's tensors are views of
    persisted: Future = field(default_factory=Future)
    committed: Future = field(default_factory=Future)


class Sink(abc.ABC):
    """The sink plug point: takes staged snapshots, resolves their futures."""

    @abc.abstractmethod
    def submit(self, job: PersistJob) -> None:
        """Take ownership of ``job``: persist it, call ``job.release()`` once the host copy is no
        longer needed, and resolve ``job.persisted`` and ``job.committed``."""

    @abc.abstractmethod
    def close(self, *, wait: bool = True) -> None:
        """Finish (or abandon, with ``wait=False``) every submitted job and stop."""

    after_commit: Callable[[Manifest], None] | None = None  # e.g. retention, run by the committer

    def _run_after_commit(self, job: PersistJob, manifest: Manifest) -> None:
        """The committer's ``after_commit`` hook; its failure never fails the checkpoint."""
        if job.committer and self.after_commit is not None:
            try:
                self.after_commit(manifest)
            except Exception:  # noqa: BLE001 - retention must never fail a checkpoint
                log.warning("retention after step %d failed", job.step, exc_info=True)

    def host_pool(self, budget_bytes: int, *, pin_memory: bool) -> HostBufferPool:
        """The host memory snapshots are staged into (the engine asks once). By default
        private memory of this process; a node agent hands out its shared memory instead."""
        return HostBufferPool(budget_bytes, pin_memory=pin_memory)

    def restore_storage(self, storage: Storage) -> Storage:
        """Where a restore reads from: ``storage``, or a storage that serves what this sink
        still holds in memory (a node agent's snapshots) and reads the rest from ``storage``."""
        return storage


SINK_ENTRY_POINTS = "ckpt.sinks"
# The sinks this distribution ships, by name, for a checkout that is on the path without being
# installed (no entry points then): imported only when asked for, so the arrows still point down.
_SHIPPED_SINKS = {"agent": ("agent.sink", "open_agent_sink")}


def open_sink(kind: str, address: str, **kwargs: Any) -> Sink:
    """A sink provided by another package through the ``ckpt.sinks`` entry-point group (the
    node agent registers ``agent``); ``ckpt`` itself never imports those packages."""
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group=SINK_ENTRY_POINTS) if ep.name == kind]
    if found:
        return found[0].load()(address, **kwargs)
    if kind in _SHIPPED_SINKS:
        import importlib

        module, name = _SHIPPED_SINKS[kind]
        try:
            factory = getattr(importlib.import_module(module), name)
        except ImportError as e:
            raise CkptError(f"the {kind!r} sink needs {module} ({e}); install ckpt with its dependencies") from e
        return factory(address, **kwargs)
    raise CkptError(
        f"no {kind!r} sink is installed (entry point group {SINK_ENTRY_POINTS!r}); "
        f"install the package that provides it, or reinstall ckpt"
    )


def failed_marker(step: int, writer: str) -> str:
    return f"{fmt.step_dir(step)}/{fmt.FRAGMENTS}/{writer}.failed"


@dataclass(frozen=True, kw_only=True, slots=True)
class SinkConfig:
    io_threads: int = 8
    durable: bool = True
    commit_timeout_s: float = 600.0
    poll_interval_s: float = 0.05
    library_versions: dict = field(default_factory=dict)
    # Niceness added to the persist and commit threads (and the I/O threads they start):
    # training threads keep the cores when both want them. None leaves the priority alone.
    nice: int | None = 10

    def __post_init__(self) -> None:
        if self.io_threads < 1:
            raise ValueError("SinkConfig.io_threads must be >= 1")
        if self.commit_timeout_s <= 0:
            raise ValueError("SinkConfig.commit_timeout_s must be > 0")
        if self.nice is not None and not 0 <= self.nice <= 19:
            raise ValueError("SinkConfig.nice must be within 0..19 or None")


def lower_thread_priority(nice: int | None) -> None:
    """Make the calling thread (and the threads it starts later) yield the CPU to training.

    Linux keeps a nice value per thread and new threads inherit their creator's; elsewhere
    this is a no-op (the value would apply to the whole process)."""
    if not nice or not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError:  # not permitted in this sandbox: run at normal priority
        log.debug("could not lower the priority of %s", threading.current_thread().name, exc_info=True)


def fragment_status(storage: Storage, step: int, save_id: str, writers: Sequence[str]) -> tuple[list[str], list[str]]:
    """One look at storage: (writers whose fragment of this save is not there yet, the errors
    of writers that left a failure marker for it). A fragment of another save (a stale
    attempt) does not count."""
    missing, errors = [], []
    for w in writers:
        try:
            if fmt.read_fragment(storage, step, w).save_id == save_id:
                continue
        except FileNotFoundError:
            pass
        try:
            marker = json.loads(storage.read(failed_marker(step, w)))
            if marker.get("save_id") == save_id:
                errors.append(f"{w}: {marker.get('error')}")
                continue
        except FileNotFoundError:
            pass
        missing.append(w)
    return missing, errors


def wait_for_fragments(
    storage: Storage, step: int, save_id: str, writers: Sequence[str], *, timeout_s: float, poll_s: float,
    stop: threading.Event | None = None,
) -> None:
    """Block until every writer's fragment of this save is in storage; raise if one failed."""
    pending = list(writers)
    deadline = time.monotonic() + timeout_s
    delay = poll_s
    while pending:
        pending, errors = fragment_status(storage, step, save_id, pending)
        if errors:
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise CommitError(f"step {step}: a writer failed: {errors[0]}{more}")
        if not pending:
            return
        if time.monotonic() > deadline:
            raise CommitError(
                f"step {step}: no fragment from {', '.join(pending[:8])}{' …' if len(pending) > 8 else ''} "
                f"after {timeout_s:.0f} s; those writers died or are stuck"
            )
        if stop is not None and stop.wait(delay):
            raise CommitError(f"step {step}: closed before every writer finished")
        if stop is None:
            time.sleep(delay)
        delay = min(delay * 2, 1.0)


def wait_for_commit(storage: Storage, step: int, save_id: str, *, timeout_s: float, poll_s: float,
                    stop: threading.Event | None = None) -> Manifest:
    deadline = time.monotonic() + timeout_s
    delay = poll_s
    while True:
        try:
            m = fmt.read_manifest(storage, step)
            if m.save_id == save_id:
                return m
            raise CommitError(f"step {step} was committed by another save ({m.save_id})")
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise CommitError(f"step {step}: not committed after {timeout_s:.0f} s")
        if stop is not None and stop.wait(delay):
            raise CommitError(f"step {step}: closed before the commit")
        delay = min(delay * 2, 1.0)


class InProcessSink(Sink):
    """Persists with threads of this process; commits on the committer's process.

    One persist thread takes jobs in order (each job's chunks are written by ``io_threads``
    threads); one commit thread waits for fragments and commits, then runs ``after_commit``
    (retention). Neither touches the training thread.
    """

    def __init__(self, storage: Storage, config: SinkConfig,
                 after_commit: Callable[[Manifest], None] | None = None) -> None:
        self.storage = storage
        self.config = config
        self.after_commit = after_commit
        self._persist_q: queue.Queue[PersistJob | None] = queue.Queue()
        self._commit_q: queue.Queue[PersistJob | None] = queue.Queue()
        self._stop = threading.Event()
        self._persist = threading.Thread(target=self._persist_loop, name="ckpt-persist", daemon=True)
        self._commit = threading.Thread(target=self._commit_loop, name="ckpt-commit", daemon=True)
        self._persist.start()
        self._commit.start()
        self._closed = False

    def submit(self, job: PersistJob) -> None:
        if self._closed:
            raise CkptError("the sink is closed")
        self._persist_q.put(job)

    def _persist_loop(self) -> None:
        from .api import write_plan

        lower_thread_priority(self.config.nice)
        while (job := self._persist_q.get()) is not None:
            try:
                if self.storage.exists(f"{fmt.step_dir(job.step)}/{fmt.META}"):
                    raise CheckpointExistsError(
                        f"step {job.step} is already committed in {self.storage.url}; not overwritten"
                    )
                frag: Fragment = write_plan(
                    self.storage, job.plan, step=job.step, writer=job.writer, save_id=job.save_id,
                    threads=self.config.io_threads, durable=self.config.durable,
                )
            except BaseException as e:  # noqa: BLE001 - reported through the future
                self._mark_failed(job, e)
                job.release()
                job.persisted.set_exception(e)
                job.committed.set_exception(e)
                continue
            job.release()
            job.persisted.set_result(frag)
            self._commit_q.put(job)
        self._commit_q.put(None)

    def _mark_failed(self, job: PersistJob, error: BaseException) -> None:
        try:
            doc = {"save_id": job.save_id, "error": f"{type(error).__name__}: {error}"}
            self.storage.write_atomic(failed_marker(job.step, job.writer), json.dumps(doc).encode())
        except Exception:  # noqa: BLE001 - the storage is failing already; the committer times out
            log.debug("could not write the failure marker of step %d", job.step, exc_info=True)

    def _commit_loop(self) -> None:
        lower_thread_priority(self.config.nice)
        while (job := self._commit_q.get()) is not None:
            try:
                if job.committer:
                    own: Fragment = job.persisted.result()  # this process's own: not read back
                    wait_for_fragments(
                        self.storage, job.step, job.save_id, [w for w in job.writers if w != job.writer],
                        timeout_s=self.config.commit_timeout_s, poll_s=self.config.poll_interval_s, stop=self._stop,
                    )
                    manifest = fmt.commit(self.storage, job.step, job.writers, save_id=job.save_id,
                                          library_versions=self.config.library_versions, known={job.writer: own})
                else:
                    manifest = wait_for_commit(
                        self.storage, job.step, job.save_id,
                        timeout_s=self.config.commit_timeout_s, poll_s=self.config.poll_interval_s, stop=self._stop,
                    )
            except BaseException as e:  # noqa: BLE001 - reported through the future
                job.committed.set_exception(e)
                continue
            job.committed.set_result(manifest)
            self._run_after_commit(job, manifest)

    def close(self, *, wait: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        if not wait:
            self._stop.set()
        self._persist_q.put(None)
        self._persist.join()
        self._commit.join()
