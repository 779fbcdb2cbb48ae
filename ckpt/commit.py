"""The commit protocol, in one place: the in-process sink, the node agent and the recovery
coordinator all commit through this module.

One checkpoint of a run, as every party sees it:

1. every writer *persists* its part (:func:`persist`): its chunks and array metadata, made
   durable, then its fragment (last; atomic). A writer that fails leaves a *failure marker*
   beside where its fragment would be (:func:`mark_failed`), so the committer stops waiting.
2. one *committer* waits until every writer's fragment of this save is there
   (:func:`wait_for_fragments`; a fragment of another save, a stale attempt, does not count),
   then *validates* (:func:`commit`: every chunk of every array written exactly once, nothing
   outside the grid, every chunk in storage with its recorded size) and writes the *commit
   point* (the step's root ``zarr.json``) in one atomic write. Nothing is visible before it.
3. the others learn of the commit by reading the commit point (:func:`wait_for_commit`). In a job
   with a process group and no node agent, writers and committer signal each other through
   the job's store instead of polling storage (:mod:`ckpt.signals`).

Saves are told apart by a *save id*: :func:`save_id` of the run id and the step, the same on
every rank without a collective.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import crc32c

from . import format as fmt
from .coverage import CommitBuilder, Outcome, check_listing, check_packs, intermediate_groups
from .errors import CheckpointExistsError, CommitError, FormatError
from .format import (
    META,
    SEAL_KEY,
    dumps,
    group_document,
    read_fragment,
    seal_root,
    step_dir,
    write_array_metadata,
    zarr_array_document,
)
from .gcpause import gc_paused
from .io import write_plan
from .layouts import CHUNKS, PACKS, SHARDS
from .manifest import MANIFEST_KEY, Fragment, Manifest
from .signals import CLOSED, OK, CommitSignals, StoreUnusable
from .storage import Storage
from .waits import (  # noqa: F401 - the protocol's waits and markers, also imported from here
    failed_marker,
    fragment_status,
    mark_failed,
    skipped,
    wait_for_commit,
    wait_for_commit_point,
    wait_for_fragments,
)

log = logging.getLogger(__name__)


def save_id(run_id: str, step: int) -> str:
    """The id of ``run_id``'s save of ``step``: every rank derives it alone."""
    return f"{run_id}-{step}"


def ensure_not_committed(storage: Storage, step: int, save: str | None = None) -> bool:
    """Before persisting: raise if ``step`` was committed by another save; True if it was
    committed by this very save (a replica whose step is done), False if not committed."""
    if not storage.exists(f"{step_dir(step)}/{META}"):
        return False
    if save is not None and fmt.read_manifest(storage, step).save_id == save:
        return True
    raise CheckpointExistsError(f"step {step} is already committed in {storage.url}; not overwritten")


def persist(storage: Storage, plan: Any, *, step: int, writer: str, save: str, threads: int, durable: bool,
            progress: Any = None, layout: str = "packs") -> Fragment:
    """A writer's part of save ``save``: its chunks and array metadata, durable, then its
    fragment. Refuses a step that another save committed. On failure the failure marker is left
    (so the committer stops waiting) and the error raised."""
    try:
        ensure_not_committed(storage, step)
        return write_plan(storage, plan, step=step, writer=writer, save_id=save, threads=threads, durable=durable,
                          progress=progress, layout=layout)
    except BaseException as e:
        mark_failed(storage, step, writer, save, e)
        raise


def complete(storage: Storage, step: int, save: str, writers: Sequence[str], *, committer: bool, timeout_s: float,
             poll_s: float = 0.05, stop: threading.Event | None = None, known: Mapping[str, Fragment] | None = None,
             library_versions: dict[str, str] | None = None, signals: CommitSignals | None = None) -> Manifest:
    """After this writer persisted: the committer waits for every other writer's fragment of
    the save and commits; any other writer waits for the commit point. A step this very save
    committed already (a committer taking over after a crash) is returned as it is. With
    ``signals`` (the job's store, :mod:`ckpt.signals`) they wait on it instead of polling
    storage, and storage is read once per document."""
    if not committer:
        if signals is not None:
            heard = _commit_heard(signals, storage, step, save, timeout_s=timeout_s, stop=stop)
            if heard is not None:
                return heard
        return wait_for_commit(storage, step, save, timeout_s=timeout_s, poll_s=poll_s, stop=stop)
    try:
        manifest = _commit_as_committer(storage, step, save, writers, timeout_s=timeout_s, poll_s=poll_s, stop=stop,
                                        known=known, library_versions=library_versions, signals=signals)
    except BaseException as e:
        if signals is not None:
            signals.committed(save, list(writers), error=f"{type(e).__name__}: {e}")
        raise
    if signals is not None:
        signals.committed(save, list(writers))
    return manifest


def _commit_as_committer(storage: Storage, step: int, save: str, writers: Sequence[str], *, timeout_s: float,
                         poll_s: float, stop: threading.Event | None, known: Mapping[str, Fragment] | None,
                         library_versions: dict[str, str] | None, signals: CommitSignals | None) -> Manifest:
    try:
        manifest = fmt.read_manifest(storage, step)
    except FileNotFoundError:
        pass
    else:
        if manifest.save_id != save:
            raise CommitError(f"step {step} was committed by another save ({manifest.save_id})")
        return manifest
    known = dict(known or {})
    others = [w for w in writers if w not in known]
    found: dict[str, Fragment] | None = None
    deadline = time.monotonic() + timeout_s
    if signals is not None:
        try:
            missing, errors = signals.wait_persisted(save, list(writers), timeout_s=timeout_s, poll_s=poll_s, stop=stop)
        except StoreUnusable as e:
            log.warning("step %d: the job's store failed (%s): looking for the fragments in storage", step, e)
        else:
            if errors:
                first = next(iter(errors.items()))
                more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
                raise CommitError(f"step {step}: a writer failed: {first[0]}: {first[1]}{more}")
            if not missing:  # every fragment of this save is in storage: each read once
                found = {w: read_fragment(storage, step, w, records=False) for w in others}
    if found is None:
        # Each fragment is read once: those found while waiting are the ones the commit validates.
        found = wait_for_fragments(storage, step, save, others, timeout_s=max(0.0, deadline - time.monotonic()),
                                   poll_s=poll_s, stop=stop, since=deadline - timeout_s)
    return commit(storage, step, writers, save_id=save, library_versions=library_versions, known=known, found=found)


def _commit_heard(signals: CommitSignals, storage: Storage, step: int, save: str, *, timeout_s: float,
                  stop: threading.Event | None) -> Manifest | None:
    """A non-committer's wait through the job's store; None: the store failed (poll storage)."""
    try:
        outcome = signals.wait_committed(save, timeout_s=timeout_s, stop=stop)
    except StoreUnusable as e:
        log.warning("step %d: the job's store failed (%s): waiting for the commit point in storage", step, e)
        return None
    if outcome is None:  # not heard of: one look at storage decides
        return wait_for_commit(storage, step, save, timeout_s=0, poll_s=0)
    if outcome == CLOSED:
        raise CommitError(f"step {step}: closed before the commit")
    if outcome != OK:
        raise CommitError(f"step {step}: the committer failed: {outcome.removeprefix('failed: ')}")
    manifest = fmt.read_manifest(storage, step)
    if manifest.save_id != save:
        raise CommitError(f"step {step} was committed by another save ({manifest.save_id})")
    return manifest


@dataclass(frozen=True, slots=True)
class CommitOptions:
    check_listing: bool = True  # confirm every recorded chunk is in storage with its size
    threads: int = 16


def commit(
    storage: Storage,
    step: int,
    writers: Sequence[str],
    *,
    save_id: str | None = None,
    library_versions: dict[str, str] | None = None,
    user_metadata: dict[str, Any] | None = None,
    options: CommitOptions = CommitOptions(),
    known: Mapping[str, Fragment] | None = None,
    found: Mapping[str, Fragment] | None = None,
) -> Manifest:
    """Validate the fragments of ``writers`` and write the commit point.

    Raises :class:`CommitError` listing every problem if anything is missing, duplicated or
    inconsistent; in that case nothing becomes visible.

    ``known``: fragments the caller wrote itself in this process (after making their chunks
    durable); they are not read back, and their chunks are not listed again. ``found``: fragments
    the caller read from storage already (waiting for them): not read again, checked like the
    ones read here.
    """
    if not writers:
        raise CommitError("commit needs at least one writer")
    known = dict(known or {})
    to_read = [w for w in writers if w not in known and w not in (found or {})]
    with ThreadPoolExecutor(max_workers=max(1, min(options.threads, len(to_read)))) as pool:
        read: dict[str, Fragment | str] = dict(zip(to_read, pool.map(lambda w: _try_read_fragment(storage, step, w),
                                                                     to_read)))
    read.update({w: f for w, f in (found or {}).items() if w not in known})
    results = [known[w] if w in known else read[w] for w in writers]
    problems = [r for r in results if isinstance(r, str)]
    fragments = [r for r in results if isinstance(r, Fragment)]
    if problems:
        raise CommitError(f"cannot commit step {step}: " + "; ".join(problems), )
    ids = {f.save_id for f in fragments}
    if save_id is not None and ids != {save_id} or len(ids) > 1:
        raise CommitError(
            f"cannot commit step {step}: fragments come from different saves {sorted(ids)} "
            f"(expected {save_id}); a stale attempt left fragments behind, save the step again"
        )
    with gc_paused():  # short-lived records and documents by the thousand, none cyclic: see ckpt.gcpause
        builder = CommitBuilder(step, writers, save_id)
        for frag in fragments:
            builder.add(frag)
        outcome = builder.finish()
    problems = outcome.problems
    if not problems and options.check_listing and read:
        rest = [f for f in fragments if f.writer not in known]
        problems = (check_packs(storage, step, {w: e for w, e in builder.pack_ends.items() if w not in known})
                    if outcome.layout == PACKS else check_listing(storage, step, outcome.arrays, rest))
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise CommitError(f"cannot commit step {step}: " + "; ".join(problems[:10]) + more)
    return write_commit_point(storage, step, writers, outcome, save_id=fragments[0].save_id,
                              library_versions=library_versions, user_metadata=user_metadata, threads=options.threads)


def write_commit_point(storage: Storage, step: int, writers: Sequence[str], outcome: Outcome, *, save_id: str,
                       library_versions: dict[str, str] | None = None, user_metadata: dict[str, Any] | None = None,
                       threads: int = 16) -> Manifest:
    """Write the commit point of a validated save (and, for a step of chunk files, the metadata
    of arrays without chunks and of intermediate groups first)."""
    sdir = step_dir(step)
    arrays = outcome.arrays
    if outcome.layout == CHUNKS:
        # Arrays without chunks (a zero-sized dim) have no first-chunk writer: their metadata is ours.
        empty = [a for a in arrays.values() if a.num_chunks == 0]
        groups = intermediate_groups(arrays)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(lambda a: write_array_metadata(storage, step, a), empty))
            list(pool.map(lambda g: storage.write(f"{sdir}/{g}/{META}", [dumps(group_document())]), groups))
    with gc_paused():
        manifest, data = _commit_point(step, writers, outcome, save_id, library_versions, user_metadata)
    storage.write_atomic(f"{sdir}/{META}", data)
    return manifest


def _commit_point(step: int, writers: Sequence[str], outcome: Outcome, save_id: str,
                  library_versions: dict[str, str] | None, user_metadata: dict[str, Any] | None) -> tuple[Manifest, bytes]:
    manifest = Manifest(
        step=step,
        save_id=save_id,
        created_at=time.time(),
        writers=tuple(writers),
        arrays=outcome.arrays,
        values=outcome.values,
        library_versions=library_versions or {},
        user_metadata=user_metadata or {},
        layout=outcome.layout,
        writer_runs=outcome.writer_runs,
        varying_values=outcome.varying_values,
        containers=outcome.containers,
    )
    return manifest, sealed_root_bytes(commit_document(manifest))


def sealed_root_bytes(root: dict[str, Any]) -> bytes:
    """``dumps(seal_root(root))``, encoded once where the attributes close the document (a packs
    step: the seal is their last member, its crc32c over the bytes without it); a commit point of
    thousands of arrays was encoded twice at every save."""
    if list(root)[-1] != "attributes" or SEAL_KEY in root["attributes"]:
        return dumps(seal_root(root))
    data = dumps(root)
    return data[:-2] + b',"%s":%d}}' % (SEAL_KEY.encode(), crc32c.crc32c(data))


def commit_document(manifest: Manifest) -> dict[str, Any]:
    """The step's root ``zarr.json``: the manifest in the group's attributes, and, where the
    chunks are where zarr looks for them (layouts chunks and shards), the consolidated metadata
    of every array and group. A packs step lists no arrays: a zarr reader sees an empty group
    rather than arrays whose chunks it would not find (and would read as fill values)."""
    root = group_document({MANIFEST_KEY: manifest.to_dict()})
    if manifest.layout != PACKS:
        consolidated: dict[str, Any] = {g: group_document() for g in intermediate_groups(manifest.arrays)}
        consolidated.update({p: zarr_array_document(a, shards=manifest.layout == SHARDS)
                             for p, a in manifest.arrays.items()})
        root["consolidated_metadata"] = {"kind": "inline", "must_understand": False, "metadata": consolidated}
    return root


def _try_read_fragment(storage: Storage, step: int, writer: str) -> Fragment | str:
    try:
        return read_fragment(storage, step, writer, records=False)
    except FileNotFoundError:
        return f"writer {writer} has not written its fragment"
    except FormatError as e:
        return str(e)
