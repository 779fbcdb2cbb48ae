"""Retention: which steps of a run to delete, and deleting them safely.

:func:`plan_gc` is pure: from a listing of the run's steps (:class:`StepEntry`) and a
:class:`RetentionPolicy` to one :class:`GcDecision` per step. :func:`run_gc` lists the run,
plans, and deletes. The engine can run the same two in the background.

Rules:

- The newest committed step is never deleted, whatever the policy.
- Committed steps: the ``keep_last`` newest are kept; with ``keep_every=N`` so is every step
  with ``step % N == 0``; the others are deleted.
- Incomplete steps (no commit point) may be a save in progress, so one is deleted only when
  it is stale: its newest file is at least ``min_age_s`` old, or it precedes the newest
  committed step and nothing in it was written after that step was committed. A step whose
  file times storage cannot tell is treated as stale only by the second rule, or when
  ``min_age_s`` is 0.

A committed step is deleted commit point first, so a reader never sees a half-deleted step as
committed; if deletion stops midway, what is left is an incomplete step, which the next run
removes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from . import format as fmt
from .errors import CkptError
from .storage import TRASH_PREFIX, Storage

log = logging.getLogger(__name__)

KEEP = "keep"
DELETE = "delete"


@dataclass(frozen=True, kw_only=True, slots=True)
class RetentionPolicy:
    """How many steps to keep. ``keep_last`` >= 1: the newest committed step always stays."""

    keep_last: int
    keep_every: int | None = None
    min_age_s: float = 3600.0

    def __post_init__(self) -> None:
        if isinstance(self.keep_last, bool) or not isinstance(self.keep_last, int) or self.keep_last < 1:
            raise ValueError(
                f"RetentionPolicy.keep_last must be an integer >= 1 (the newest committed step is always "
                f"kept), got {self.keep_last!r}"
            )
        if self.keep_every is not None and (
            isinstance(self.keep_every, bool) or not isinstance(self.keep_every, int) or self.keep_every < 1
        ):
            raise ValueError(f"RetentionPolicy.keep_every must be an integer >= 1 or None, got {self.keep_every!r}")
        if not self.min_age_s >= 0:
            raise ValueError(f"RetentionPolicy.min_age_s must be >= 0, got {self.min_age_s!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class StepEntry:
    """One step directory as listed: what :func:`plan_gc` decides from.

    ``committed_at``: the manifest's creation time (committed steps; None if unknown).
    ``modified_at``: the newest modification time of any file in the step (None if unknown).
    ``nbytes``: size on storage, when it was measured.
    """

    step: int
    committed: bool
    committed_at: float | None = None
    modified_at: float | None = None
    nbytes: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class GcDecision:
    step: int
    committed: bool
    action: str  # KEEP or DELETE
    reason: str
    nbytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "committed": self.committed, "action": self.action, "reason": self.reason,
                "bytes": self.nbytes}


@dataclass(frozen=True, slots=True)
class GcPlan:
    decisions: tuple[GcDecision, ...]

    @property
    def to_delete(self) -> list[GcDecision]:
        return [d for d in self.decisions if d.action == DELETE]

    @property
    def to_keep(self) -> list[GcDecision]:
        return [d for d in self.decisions if d.action == KEEP]


def plan_gc(steps: Iterable[StepEntry], policy: RetentionPolicy, *, now: float,
            in_progress: Collection[int] = ()) -> GcPlan:
    """Pure: one decision per step, oldest first. See the module docstring for the rules.

    ``in_progress``: steps the caller itself is still saving or committing; they are kept
    whatever the rules say (saves may commit out of step order, so an incomplete step that
    precedes the newest committed one is not always abandoned)."""
    entries = sorted(steps, key=lambda e: e.step)
    committed = [e for e in entries if e.committed]
    newest = committed[-1] if committed else None
    kept_last = {e.step for e in committed[-policy.keep_last:]}
    out = []
    for e in entries:
        if e.step in in_progress:
            action, reason = KEEP, "a save of this step is in progress here"
        elif e.committed:
            if newest is not None and e.step == newest.step:
                action, reason = KEEP, "newest committed step"
            elif e.step in kept_last:
                action, reason = KEEP, f"among the {policy.keep_last} newest committed"
            elif policy.keep_every is not None and e.step % policy.keep_every == 0:
                action, reason = KEEP, f"multiple of --keep-every {policy.keep_every}"
            else:
                action, reason = DELETE, f"older than the {policy.keep_last} newest committed"
        else:
            action, reason = _incomplete_decision(e, newest, policy, now)
        out.append(GcDecision(step=e.step, committed=e.committed, action=action, reason=reason, nbytes=e.nbytes))
    return GcPlan(tuple(out))


def _incomplete_decision(
    e: StepEntry, newest: StepEntry | None, policy: RetentionPolicy, now: float
) -> tuple[str, str]:
    if policy.min_age_s == 0:
        # "No save is in progress": every incomplete step is stale, including one whose file
        # times storage cannot tell (a directory that holds no file yet).
        return DELETE, "incomplete (min age 0)"
    if e.modified_at is not None and now - e.modified_at >= policy.min_age_s:
        return DELETE, (f"incomplete, untouched for {format_age(now - e.modified_at)} "
                        f"(>= min age {format_age(policy.min_age_s)})")
    if newest is not None and e.step < newest.step:
        if e.modified_at is None:
            return DELETE, f"incomplete, precedes committed step {newest.step}"
        if newest.committed_at is not None and e.modified_at < newest.committed_at:
            return DELETE, f"incomplete, untouched since committed step {newest.step} was committed"
        return KEEP, "incomplete, written to recently: may be a save in progress"
    if e.modified_at is None:
        return KEEP, "incomplete, newer than every committed step: may be a save in progress"
    return KEEP, f"incomplete, written to {format_age(now - e.modified_at)} ago: may be a save in progress"


def format_age(seconds: float | None) -> str:
    """``45s``, ``12m``, ``3h``, ``2d``: the age of something, compactly."""
    if seconds is None:
        return "-"
    s = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.0f}{unit}" if s >= 10 * size else f"{s / size:.1f}{unit}"
    return f"{s:.0f}s"


# ---------------------------------------------------------------------------------------------
# Listing with sizes and times


@dataclass(frozen=True, slots=True)
class TreeUsage:
    files: int
    nbytes: int
    newest_mtime: float | None  # None where the storage does not tell file times


def tree_usage(storage: Storage, path: str) -> TreeUsage:
    """Number of files, total size and newest modification time of everything under ``path``."""
    entries = storage.walk_times(path)
    times = [t for _size, t in entries.values()]
    newest = None if not times or any(t is None for t in times) else max(times)  # type: ignore[type-var]
    return TreeUsage(len(entries), sum(size for size, _t in entries.values()), newest)


@dataclass(frozen=True, kw_only=True, slots=True)
class StepListing:
    """One step directory with what ``ckpt ls`` shows and :func:`plan_gc` needs."""

    step: int
    committed: bool
    files: int | None = None
    nbytes: int | None = None
    modified_at: float | None = None
    created_at: float | None = None  # from the manifest (committed steps)
    tensors: int | None = None
    error: str | None = None  # a committed step whose manifest is unreadable
    layout: str | None = None  # from the manifest: packs, shards or chunks

    def entry(self) -> StepEntry:
        return StepEntry(step=self.step, committed=self.committed, committed_at=self.created_at,
                         modified_at=self.modified_at, nbytes=self.nbytes)


def list_run(
    storage: Storage, *, usage: bool | Callable[[fmt.StepInfo], bool] = True, manifests: bool = True, threads: int = 8
) -> list[StepListing]:
    """Every step of the run, oldest first, with sizes/times (where ``usage``) and manifest facts."""
    infos = fmt.list_steps(storage)

    def one(info: fmt.StepInfo) -> StepListing:
        want_usage = usage(info) if callable(usage) else usage
        u = tree_usage(storage, fmt.step_dir(info.step)) if want_usage else None
        created = tensors = error = layout = None
        if info.committed and manifests:
            try:
                m = fmt.read_manifest(storage, info.step)
                created, tensors, layout = m.created_at, len(m.arrays), m.layout
            except CkptError as e:  # corrupt, or deleted between listing and reading
                error = str(e)
        return StepListing(
            step=info.step, committed=info.committed, files=u.files if u else None, nbytes=u.nbytes if u else None,
            modified_at=u.newest_mtime if u else None, created_at=created, tensors=tensors, error=error,
            layout=layout,
        )

    # Only the steps that need reading go to threads (a training process lists its run after
    # every commit, where a pool of threads made per listing cost more than the listing).
    slow = [i for i in infos if (usage(i) if callable(usage) else usage) or (manifests and i.committed)]
    slow_steps = {i.step for i in slow}
    out = {i.step: one(i) for i in infos if i.step not in slow_steps}
    if len(slow) == 1:
        out[slow[0].step] = one(slow[0])
    elif slow:
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(slow)))) as pool:
            out.update(zip((i.step for i in slow), pool.map(one, slow)))
    return [out[i.step] for i in infos]


# ---------------------------------------------------------------------------------------------
# Running


@dataclass(slots=True)
class GcResult:
    plan: GcPlan
    dry_run: bool
    deleted: list[int] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)
    stale_tmp: list[str] = field(default_factory=list)  # temporary files of killed writes (removed unless dry_run)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "steps": [d.to_dict() for d in self.plan.decisions],
            "deleted": self.deleted,
            "errors": {str(k): v for k, v in self.errors.items()},
            "stale_tmp": self.stale_tmp,
        }


def delete_step(storage: Storage, step: int, *, detached: bool = False) -> None:
    """Delete one step directory, commit point first (see the module docstring); with
    ``detached``, the rest goes in the background where the storage can do that."""
    sdir = fmt.step_dir(step)
    storage.delete(f"{sdir}/{fmt.META}")
    if detached:
        storage.delete_detached(sdir)
    else:
        storage.delete(sdir, recursive=True)


def run_gc(
    storage: Storage,
    policy: RetentionPolicy,
    *,
    dry_run: bool = False,
    now: float | None = None,
    measure: bool = True,
    on_delete: Callable[[GcDecision], None] | None = None,
    detached: bool = False,
    clean_trash: bool = True,
    clean_tmp: bool = False,
    in_progress: Collection[int] = (),
    committed_at: Mapping[int, float] | None = None,
) -> GcResult:
    """List the run, plan with :func:`plan_gc`, and delete (unless ``dry_run``).

    ``committed_at``: commit times the caller knows (a Checkpointer, of the step it just
    committed), so that no manifest is read for them.

    ``measure`` sizes the steps to delete (one listing each), for reporting. A step that
    fails to delete is recorded in ``errors`` and the others still proceed. ``detached``
    leaves the unlinking to the storage's background deletion (a training process's own
    retention); ``clean_trash`` removes what such deletions left behind after a crash.
    ``clean_tmp`` also walks the kept steps for the temporary files (``.NAME.HEX.tmp``) of
    writes that were killed before their rename, older than ``policy.min_age_s`` (a write in
    flight is younger), and removes them: one listing per kept step, so the command line does
    it and a training process's retention does not.
    """

    # File times are needed only for incomplete steps; sizes only for what will be deleted; of
    # the manifests, only the newest's creation time, and only when an incomplete step precedes
    # it (parsing every kept manifest at each commit cost a training process tens of ms of GIL).
    listing = list_run(storage, usage=lambda info: not info.committed, manifests=False)
    now = time.time() if now is None else now
    entries = [s.entry() for s in listing]
    newest_at = _newest_commit_time(storage, entries, committed_at or {})
    if newest_at is not None:
        entries = [dataclasses.replace(e, committed_at=newest_at[1]) if e.step == newest_at[0] else e for e in entries]
    plan = plan_gc(entries, policy, now=now, in_progress=in_progress)
    if measure:
        plan = GcPlan(tuple(
            dataclasses.replace(d, nbytes=tree_usage(storage, fmt.step_dir(d.step)).nbytes)
            if d.action == DELETE and d.nbytes is None else d
            for d in plan.decisions
        ))
    result = GcResult(plan=plan, dry_run=dry_run)
    if clean_tmp:
        result.stale_tmp = _stale_tmp(storage, [d.step for d in plan.to_keep], policy.min_age_s, now)
    if dry_run:
        return result
    for path in result.stale_tmp:
        try:
            storage.delete(path)
        except (OSError, CkptError) as e:
            log.warning("could not remove %s: %s", path, e)
    newest = max((s.step for s in listing if s.committed), default=None)
    for d in plan.to_delete:
        if d.step == newest:  # plan_gc never does this; deleting the newest would lose the run
            raise AssertionError("gc planned to delete the newest committed step")
        try:
            delete_step(storage, d.step, detached=detached)
        except (OSError, CkptError) as e:
            result.errors[d.step] = str(e)
            continue
        result.deleted.append(d.step)
        if on_delete is not None:
            on_delete(d)
    if clean_trash:
        for name in storage.list_dir(""):
            if name.startswith(TRASH_PREFIX):
                try:
                    storage.delete(name, recursive=True)
                except (OSError, CkptError) as e:
                    log.warning("could not remove %s: %s", name, e)
    return result


def _newest_commit_time(storage: Storage, entries: list[StepEntry],
                        known: Mapping[int, float]) -> tuple[int, float | None] | None:
    """The newest committed step and its commit time, where :func:`plan_gc` needs it (an
    incomplete step with file times precedes it); None where it does not."""
    newest = max((e.step for e in entries if e.committed), default=None)
    if newest is None or not any(not e.committed and e.step < newest and e.modified_at is not None for e in entries):
        return None
    if newest in known:
        return newest, known[newest]
    try:
        return newest, fmt.read_manifest(storage, newest).created_at
    except CkptError as e:  # corrupt, or deleted meanwhile: plan without it
        log.warning("could not read the manifest of step %d: %s", newest, e)
        return newest, None


def _stale_tmp(storage: Storage, steps: list[int], min_age_s: float, now: float) -> list[str]:
    out = []
    for step in steps:
        sdir = fmt.step_dir(step)
        for rel, (_size, mtime) in storage.walk_times(sdir).items():
            name = rel.rsplit("/", 1)[-1]
            if not (name.startswith(".") and name.endswith(".tmp")):
                continue
            if min_age_s > 0 and (mtime is None or now - mtime < min_age_s):
                continue
            out.append(f"{sdir}/{rel}")
    return sorted(out)
