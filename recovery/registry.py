"""The checkpoint registry: which saves are in flight, committing them, retention, and what
each committed checkpoint cost. Driven by the coordinator; storage is any ``ckpt.Storage``.

Workers save with ``Checkpointer(commit_by="external")``: each persists its own fragment (in
process or through its node agent) and nobody among them commits. Rank 0 tells the
coordinator a save began (step, save id, writers); :meth:`CheckpointRegistry.poll` commits
it once every writer's fragment of that save is in storage, and counts the saves that fail.
After a coordinator restart :meth:`rebuild` finds the same from storage alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ckpt import format as fmt
from ckpt.commit import commit, fragment_status, save_id
from ckpt.errors import CkptError
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

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "save_id": self.save_id, "writers": len(self.writers), "attempt": self.attempt,
                "began_at": self.began_at, "committed_at": self.committed_at, "failed": self.failed,
                "stall_s": max(self.stall_s.values()) if self.stall_s else None,
                "bytes": sum(self.nbytes.values()) if self.nbytes else None}


@dataclass(frozen=True, slots=True)
class PollResult:
    committed: tuple[SaveRecord, ...] = ()
    failed: tuple[SaveRecord, ...] = ()
    deleted: tuple[int, ...] = ()


class CheckpointRegistry:
    def __init__(self, storage: Storage, *, keep: RetentionPolicy | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.storage = storage
        self.keep = keep
        self.clock = clock
        self.pending: dict[int, SaveRecord] = {}
        self.saves: dict[int, SaveRecord] = {}  # every save seen, by step (the latest save of a step)
        self.committed: list[int] = []
        self.consecutive_failures = 0
        self._versions = library_versions()

    # -- what workers report ------------------------------------------------------------------

    def saving(self, step: int, save_id: str, writers: Sequence[str], attempt: int) -> None:
        rec = self.saves.get(step)
        if rec is not None and rec.save_id == save_id:
            return
        rec = SaveRecord(step, save_id, tuple(writers), attempt, self.clock())
        self.saves[step] = rec
        if step not in self.committed:
            self.pending[step] = rec

    def snapshot_report(self, rank: int, step: int, save_id: str, stall_s: float, nbytes: int) -> None:
        rec = self.saves.get(step)
        if rec is not None and rec.save_id == save_id:
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
            adopted.append(info.step)
        return adopted

    def poll(self) -> PollResult:
        """Commit every pending save whose fragments are all in storage, oldest first; fail
        those a writer reported failed. Then retention, if something was committed."""
        committed, failed = [], []
        for step in sorted(self.pending):
            rec = self.pending[step]
            try:
                missing, errors = fragment_status(self.storage, step, rec.save_id, rec.writers)
                if errors:
                    raise CkptError("; ".join(errors))
                if missing:
                    continue
                commit(self.storage, step, rec.writers, save_id=rec.save_id, library_versions=self._versions)
            except Exception as e:  # noqa: BLE001 - a failed checkpoint is recorded, never raised here
                rec.failed = f"{type(e).__name__}: {e}"
                del self.pending[step]
                self.consecutive_failures += 1
                failed.append(rec)
                continue
            rec.committed_at = self.clock()
            del self.pending[step]
            self.committed = sorted(set(self.committed) | {step})
            self.consecutive_failures = 0
            committed.append(rec)
        deleted: tuple[int, ...] = ()
        if committed and self.keep is not None:
            try:
                result = run_gc(self.storage, self.keep, measure=False)
                deleted = tuple(result.deleted)
                self.committed = [s for s in self.committed if s not in deleted]
            except Exception:  # noqa: BLE001 - retention never fails a checkpoint
                log.warning("retention failed", exc_info=True)
        return PollResult(tuple(committed), tuple(failed), deleted)

    def complete(self) -> PollResult:
        """Commit what can be committed now (after the workers were stopped)."""
        return self.poll()

    @property
    def last_committed(self) -> int | None:
        return self.committed[-1] if self.committed else None
