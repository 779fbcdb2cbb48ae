"""Where staged snapshots go to be persisted and committed: the sink plug point.

The engine hands a :class:`PersistJob` (a save plan whose tensors are host copies) to a
:class:`Sink`. :class:`InProcessSink`, the default, writes with background threads of the
training process; the node agent is another sink behind the same interface. Both persist and
commit through ``ckpt.commit`` (the protocol: persist, fragment or failure marker, wait,
validate, commit point), so there is one persist path. ``ckpt.testing.sink`` is the
conformance suite every sink passes.
"""

from __future__ import annotations

import abc
import logging
import os
import queue
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from .commit import complete, persist
from .errors import CkptError
from .hostpool import HostBufferPool, Slab
from .manifest import Manifest
from .plan import SavePlan
from .restore import RestoreSource, StorageSource
from .signals import CommitSignals
from .storage import Storage

log = logging.getLogger(__name__)


@dataclass(eq=False)
class PersistJob:
    """One staged snapshot of one writer, to persist (and commit, if ``committer``)."""

    step: int
    save_id: str
    writer: str
    writers: tuple[str, ...]
    plan: "SavePlan"
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
            except Exception:
                log.warning("retention after step %d failed", job.step, exc_info=True)

    def host_pool(self, budget_bytes: int, *, pin_memory: bool) -> HostBufferPool:
        """The host memory snapshots are staged into (the engine asks once). By default
        private memory of this process; a node agent hands out its shared memory instead."""
        return HostBufferPool(budget_bytes, pin_memory=pin_memory)

    def restore_source(self, storage: Storage, *, holders: Mapping[str, Sequence[str]] | None = None,
                       step: int | None = None) -> RestoreSource:
        """Where a restore reads from: storage by default; a node agent's sink puts its memory
        and peer tiers above it. The caller reads back what each tier served. ``holders``: who
        holds which writer's snapshot (writer -> agent addresses), where a coordinator knows;
        ``step``: the restore reads that step only (None: not known yet)."""
        return StorageSource(storage)


SINK_ENTRY_POINTS = "ckpt.sinks"
# The sinks this distribution ships, by name, for a checkout that is on the path without being
# installed (no entry points then): imported only when asked for, so the arrows still point down.
_SHIPPED_SINKS = {"agent": ("agent.trainer.sink", "open_agent_sink")}


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


@dataclass(frozen=True, kw_only=True, slots=True)
class SinkConfig:
    io_threads: int = 8
    durable: bool = True
    layout: str = "packs"  # how a writer lays out its chunks: "packs" or "chunks" (ckpt.io.write_plan)
    commit_timeout_s: float = 600.0
    poll_interval_s: float = 0.05
    library_versions: dict = field(default_factory=dict)
    # Niceness added to the persist and commit threads (and the I/O threads they start):
    # training threads keep the cores when both want them. None leaves the priority alone.
    nice: int | None = 10

    def __post_init__(self) -> None:
        if self.io_threads < 1:
            raise ValueError("SinkConfig.io_threads must be >= 1")
        if self.layout not in ("packs", "chunks"):
            raise ValueError(f"SinkConfig.layout must be 'packs' or 'chunks', got {self.layout!r}")
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


class InProcessSink(Sink):
    """Persists with threads of this process; commits on the committer's process.

    One persist thread takes jobs in order (each job's chunks are written by ``io_threads``
    threads); one commit thread waits for fragments and commits, then runs ``after_commit``
    (retention). Neither touches the training thread.
    """

    def __init__(self, storage: Storage, config: SinkConfig,
                 after_commit: Callable[[Manifest], None] | None = None, signals: CommitSignals | None = None) -> None:
        self.storage = storage
        self.config = config
        self.after_commit = after_commit
        self.signals = signals  # the job's store: writers and committer tell each other (ckpt.signals)
        self._waiting: str | None = None  # the save whose commit the commit thread waits for
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
        lower_thread_priority(self.config.nice)
        while (job := self._persist_q.get()) is not None:
            try:
                frag = persist(self.storage, job.plan, step=job.step, writer=job.writer, save=job.save_id,
                               threads=self.config.io_threads, durable=self.config.durable, layout=self.config.layout)
            except BaseException as e:  # noqa: BLE001 - reported through the futures
                job.release()
                if self.signals is not None:
                    self.signals.persisted(job.save_id, f"{type(e).__name__}: {e}")  # (the committer names the writer)
                job.persisted.set_exception(e)
                job.committed.set_exception(e)
                continue
            job.release()
            if self.signals is not None:
                self.signals.persisted(job.save_id)
            job.persisted.set_result(frag)
            self._commit_q.put(job)
        self._commit_q.put(None)

    def _commit_loop(self) -> None:
        lower_thread_priority(self.config.nice)
        while (job := self._commit_q.get()) is not None:
            self._waiting = job.save_id
            try:
                # The committer's own fragment is not read back.
                manifest = complete(
                    self.storage, job.step, job.save_id, job.writers, committer=job.committer,
                    timeout_s=self.config.commit_timeout_s, poll_s=self.config.poll_interval_s, stop=self._stop,
                    known={job.writer: job.persisted.result()}, library_versions=self.config.library_versions,
                    signals=self.signals)
            except BaseException as e:  # noqa: BLE001 - reported through the future
                job.committed.set_exception(e)
                continue
            finally:
                self._waiting = None
            job.committed.set_result(manifest)
            self._run_after_commit(job, manifest)

    def close(self, *, wait: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        if not wait:
            self._stop.set()
            waiting = self._waiting
            if waiting is not None and self.signals is not None:
                self.signals.wake(waiting)  # a writer blocked on the job's store for this commit
        self._persist_q.put(None)
        self._persist.join()
        self._commit.join()
