"""The checkpoint registry: which saves are in flight, committing them, retention, and what
each committed checkpoint cost. Driven by the coordinator; storage is any ``ckpt.Storage``.

Workers save with ``Checkpointer(commit_by="external")``: each persists its own fragment (in
process or through its node agent) and nobody among them commits. Rank 0 tells the
coordinator a save began (step, save id, writers); each writer tells it when its fragment is
durable (:meth:`CheckpointRegistry.fragment_ready`), and the registry reads and validates that
fragment then, once (``ckpt.coverage.CommitBuilder``). A save whose last fragment arrived is
committed by :meth:`CheckpointRegistry.poll` without reading anything again: nothing is re-read
or re-listed per polling round, and commit time does not grow with how long a save took.

Announcements are fire-and-forget. A save whose fragments stop arriving for ``rescan_after_s``
is looked up in storage once (one listing of its fragments; only the fragments not yet seen are
read), and so is every save in flight after a coordinator restart (:meth:`rebuild`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ckpt import format as fmt
from ckpt.commit import failed_marker, save_id, write_commit_point
from ckpt.coverage import CommitBuilder, check_packs
from ckpt.errors import CkptError, FormatError
from ckpt.retention import RetentionPolicy, run_gc
from ckpt.storage import Storage
from ckpt.version import library_versions

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SaveRecord:
    step: int
    save_id: str
    writers: tuple[str, ...]
    attempt: int
    began_at: float
    committed_at: float | None = None
    failed: str | None = None
    stall_s: dict[int, float] = field(default_factory=dict)  # rank -> save() + hook stall
    nbytes: dict[int, int] = field(default_factory=dict)
    builder: CommitBuilder | None = field(default=None, repr=False)
    last_news_at: float = 0.0  # the last fragment that arrived (or the save's start)
    complete_at: float | None = None  # when its last fragment was added
    agents_told: int = 0  # node agents the coordinator told of the commit (they read it once, no polling)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "save_id": self.save_id, "writers": len(self.writers), "attempt": self.attempt,
                "began_at": self.began_at, "committed_at": self.committed_at, "failed": self.failed,
                "stall_s": max(self.stall_s.values()) if self.stall_s else None,
                "bytes": sum(self.nbytes.values()) if self.nbytes else None, "agents_told": self.agents_told,
                "commit_latency_s": (None if self.committed_at is None or self.complete_at is None
                                     else round(self.committed_at - self.complete_at, 4))}


@dataclass(frozen=True, slots=True)
class PollResult:
    committed: tuple[SaveRecord, ...] = ()
    failed: tuple[SaveRecord, ...] = ()
    deleted: tuple[int, ...] = ()


class CheckpointRegistry:
    def __init__(self, storage: Storage, *, keep: RetentionPolicy | None = None,
                 clock: Callable[[], float] = time.time, rescan_after_s: float = 10.0) -> None:
        self.storage = storage
        self.keep = keep
        self.clock = clock
        self.rescan_after_s = rescan_after_s
        self.pending: dict[int, SaveRecord] = {}
        self.saves: dict[int, SaveRecord] = {}  # every save seen, by step (the latest save of a step)
        self.committed: list[int] = []
        self.consecutive_failures = 0
        self.fragment_reads = 0  # fragments read from storage (each at most once per save)
        self._versions = library_versions()
        self._early: dict[tuple[int, str], set[str]] = {}  # fragments announced before their save

    # -- what workers report ------------------------------------------------------------------

    def saving(self, step: int, save: str, writers: Sequence[str], attempt: int) -> None:
        rec = self.saves.get(step)
        if rec is not None and rec.save_id == save:
            return
        now = self.clock()
        rec = SaveRecord(step, save, tuple(writers), attempt, now, builder=CommitBuilder(step, writers, save),
                         last_news_at=now)
        self.saves[step] = rec
        if step not in self.committed:
            self.pending[step] = rec
            for writer in self._early.pop((step, save), ()):
                self.fragment_ready(step, save, writer)

    def fragment_ready(self, step: int, save: str, writer: str) -> None:
        """``writer``'s fragment of ``save`` is durable: read and check it now, once."""
        rec = self.pending.get(step)
        if rec is None or rec.save_id != save:
            if step not in self.saves or self.saves[step].save_id != save:
                self._early.setdefault((step, save), set()).add(writer)  # before rank 0's "saving"
            return
        if rec.builder is None or writer in rec.builder.added or rec.failed:
            return
        try:
            frag = fmt.read_fragment(self.storage, step, writer, records=False)
            self.fragment_reads += 1
        except FileNotFoundError:
            return  # announced but not visible yet: the rescan finds it
        except FormatError as e:
            rec.failed = f"{type(e).__name__}: {e}"
            return
        if frag.save_id != save:
            # A stale attempt's fragment (its agent persisted it after the job rolled back):
            # this save's own replaces it, and is announced or found by the next rescan.
            return
        rec.builder.add(frag)
        rec.last_news_at = self.clock()
        if rec.builder.complete:
            rec.complete_at = rec.last_news_at

    def writer_failed(self, step: int, save: str, writer: str, error: str) -> None:
        rec = self.pending.get(step)
        if rec is not None and rec.save_id == save and rec.failed is None:
            rec.failed = f"{writer}: {error}"

    def snapshot_report(self, rank: int, step: int, save: str, stall_s: float, nbytes: int) -> None:
        rec = self.saves.get(step)
        if rec is not None and rec.save_id == save:
            rec.stall_s[rank] = stall_s
            rec.nbytes[rank] = nbytes

    def abandon_after(self, step: int | None) -> list[int]:
        """The job rolled back to ``step``: saves in flight after it will never complete."""
        gone = [s for s in self.pending if step is None or s > step]
        for s in gone:
            del self.pending[s]
        return gone

    # -- from storage ---------------------------------------------------------------------------

    def rebuild(self, run_id: str | None = None, world_size: int | None = None) -> list[int]:
        """Relearn the run from storage: the committed steps, and the saves in flight of the
        current attempt (``run_id``, the workers' Checkpointer run id, and its world size, both
        from heartbeats) that this registry did not hear of: any incomplete step newer than
        the newest committed one. Returns the steps adopted."""
        self.committed = fmt.committed_steps(self.storage)
        if run_id is None or not world_size:
            return []
        newest = self.committed[-1] if self.committed else -1
        writers = tuple(fmt.writer_name(r) for r in range(world_size))
        adopted = []
        for info in fmt.list_steps(self.storage):
            if info.committed or info.step <= newest or info.step in self.pending:
                continue
            sid = save_id(run_id, info.step)  # how ckpt.Checkpointer names its saves
            rec = self.saves.get(info.step)
            if rec is not None and rec.save_id == sid:
                continue  # already failed or committed once
            self.saving(info.step, sid, writers, attempt=-1)
            self.rescan(info.step)
            adopted.append(info.step)
        return adopted

    def rescan(self, step: int) -> None:
        """Look up in storage what a save in flight has: one listing of its fragments; the ones
        not seen yet are read, a failure marker fails the save."""
        rec = self.pending.get(step)
        if rec is None or rec.builder is None:
            return
        names = self.storage.list_dir(f"{fmt.step_dir(step)}/{fmt.FRAGMENTS}")
        rec.last_news_at = self.clock()
        for name in names:
            writer, _, ext = name.rpartition(".")
            if ext == "json" and writer in rec.writers and writer not in rec.builder.added:
                self.fragment_ready(step, rec.save_id, writer)
            elif ext == "failed" and writer in rec.writers and rec.failed is None:
                try:
                    import json

                    marker = json.loads(self.storage.read(failed_marker(step, writer)))
                    if marker.get("save_id") == rec.save_id:
                        rec.failed = f"{writer}: {marker.get('error')}"
                except (FileNotFoundError, ValueError):
                    pass

    def poll(self) -> PollResult:
        """Commit every pending save whose fragments are all in, oldest first; fail those a
        writer reported failed; rescan those that went quiet. Then retention, if something was
        committed."""
        committed, failed = [], []
        now = self.clock()
        for step in sorted(self.pending):
            rec = self.pending[step]
            builder = rec.builder
            try:
                if rec.failed:
                    raise CkptError(rec.failed)
                if builder is None:
                    continue
                if not builder.complete:
                    if now - rec.last_news_at > self.rescan_after_s:
                        self.rescan(step)
                    if not builder.complete:
                        continue
                self._commit(rec)
            except Exception as e:  # noqa: BLE001 - a failed checkpoint is recorded, never raised here
                rec.failed = rec.failed or f"{type(e).__name__}: {e}"
                rec.builder = None
                del self.pending[step]
                self.consecutive_failures += 1
                failed.append(rec)
                continue
            rec.committed_at = self.clock()
            rec.builder = None  # its per-chunk tables are not needed any more
            del self.pending[step]
            self.committed = sorted(set(self.committed) | {step})
            self.consecutive_failures = 0
            committed.append(rec)
        deleted: tuple[int, ...] = ()
        if committed and self.keep is not None:
            deleted = self.retain()
        return PollResult(tuple(committed), tuple(failed), deleted)

    def _commit(self, rec: SaveRecord) -> None:
        assert rec.builder is not None
        outcome = rec.builder.finish()
        problems = outcome.problems
        if not problems and outcome.layout == "packs":
            problems = check_packs(self.storage, rec.step, rec.builder.pack_ends)
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise CkptError(f"cannot commit step {rec.step}: " + "; ".join(problems[:5]) + more)
        write_commit_point(self.storage, rec.step, rec.writers, outcome, save_id=rec.save_id,
                           library_versions=self._versions)

    def retain(self) -> tuple[int, ...]:
        if self.keep is None:
            return ()
        try:
            result = run_gc(self.storage, self.keep, measure=False)
        except Exception:  # noqa: BLE001 - retention never fails a checkpoint
            log.warning("retention failed", exc_info=True)
            return ()
        self.committed = [s for s in self.committed if s not in result.deleted]
        return tuple(result.deleted)

    def complete(self) -> PollResult:
        """Commit what can be committed now (after the workers were stopped): every save in
        flight is looked up in storage first."""
        for step in list(self.pending):
            self.rescan(step)
        return self.poll()

    @property
    def last_committed(self) -> int | None:
        return self.committed[-1] if self.committed else None
