"""The waits and markers of the commit protocol (:mod:`ckpt.commit`): a writer's failure
marker (and a skipped snapshot told), the look at storage for every writer's fragment or
failure, the committer's wait for the fragments, a writer's wait for the commit point."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence

from . import format as fmt
from .errors import CommitError
from .format import read_fragment, step_dir
from .manifest import Fragment, Manifest
from .signals import CommitSignals
from .storage import Storage

log = logging.getLogger(__name__)


def failed_marker(step: int, writer: str) -> str:
    return f"{step_dir(step)}/{fmt.FRAGMENTS}/{writer}.failed"


def mark_failed(storage: Storage, step: int, writer: str, save: str, error: BaseException | str) -> None:
    """Leave the failure marker of ``writer``'s part of save ``save`` (best effort: storage may
    be what failed; the committer then times out instead of stopping at once)."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    try:
        storage.write_atomic(failed_marker(step, writer), json.dumps({"save_id": save, "error": text}).encode())
    except Exception:
        log.debug("could not write the failure marker of step %d (%s)", step, writer, exc_info=True)


def skipped(storage: Storage, step: int, save: str, writer: str, writers: Sequence[str], *, committer: bool,
            signals: CommitSignals | None,
            why: str = "skipped its snapshot: no host memory was free (when_busy='skip')") -> None:
    """``writer`` took no snapshot for save ``save`` (``when_busy="skip"`` found no free host
    memory) while the other writers of the step may have. Without word of it the committer would
    wait ``commit_timeout_s`` for a fragment that never comes, and, where ``writer`` is the
    committer, the others for a commit that never happens. So ``writer`` leaves its failure
    marker and tells them through the job's store: the step fails at once on every rank."""
    if len(writers) < 2:
        return
    mark_failed(storage, step, writer, save, why)
    if signals is not None:
        signals.persisted(save, why)  # (the committer names the writer)
        if committer:
            signals.committed(save, list(writers), error=f"{writer}: {why}")


def fragment_status(storage: Storage, step: int, save_id: str, writers: Sequence[str],
                    found: dict[str, Fragment] | None = None) -> tuple[list[str], list[str]]:
    """One look at storage: (writers whose fragment of this save is not there yet, the errors
    of writers that left a failure marker for it). A fragment of another save (a stale
    attempt) does not count. The fragments of this save are put in ``found`` if given."""
    missing, errors = [], []
    for w in writers:
        try:
            frag = read_fragment(storage, step, w, records=False)
            if frag.save_id == save_id:
                if found is not None:
                    found[w] = frag
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
    stop: threading.Event | None = None, since: float | None = None,
) -> dict[str, Fragment]:
    """Block until every writer's fragment of this save is in storage; raise if one failed.
    Returns the fragments read (each once), for the commit to validate without reading again.
    ``since``: when the wait began (``time.monotonic``; a wait through the job's store before
    this one counts), for the error's "after N s"."""
    since = time.monotonic() if since is None else since
    pending = list(writers)
    found: dict[str, Fragment] = {}
    deadline = time.monotonic() + timeout_s
    delay = poll_s
    while pending:
        pending, errors = fragment_status(storage, step, save_id, pending, found)
        if errors:
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise CommitError(f"step {step}: a writer failed: {errors[0]}{more}")
        if not pending:
            return found
        if time.monotonic() > deadline:
            raise CommitError(
                f"step {step}: no fragment from {', '.join(pending[:8])}{' …' if len(pending) > 8 else ''} "
                f"after {time.monotonic() - since:.0f} s; those writers died or are stuck"
            )
        if stop is not None and stop.wait(delay):
            raise CommitError(f"step {step}: closed before every writer finished")
        if stop is None:
            time.sleep(delay)
        delay = min(delay * 2, 1.0)
    return found


def wait_for_commit(storage: Storage, step: int, save_id: str, *, timeout_s: float, poll_s: float,
                    stop: threading.Event | None = None) -> Manifest:
    return wait_for_commit_point(storage, step, save_id, timeout_s=timeout_s, poll_s=poll_s, stop=stop)[0]


def wait_for_commit_point(storage: Storage, step: int, save_id: str, *, timeout_s: float, poll_s: float,
                          stop: threading.Event | None = None, wake: threading.Event | None = None,
                          max_poll_s: float = 1.0, failed: Callable[[], str | None] | None = None,
                          ) -> tuple[Manifest, bytes]:
    """Block until ``save_id`` committed ``step``: its manifest and the commit point's bytes.
    Storage is read after ``poll_s``, then at intervals doubling up to ``max_poll_s``; ``wake``
    set (someone says the commit happened, or that the save failed) reads it at once; a reason
    from ``failed()`` (the save failed, as someone said) ends the wait with it."""
    deadline = time.monotonic() + timeout_s
    delay = poll_s
    if wake is not None:  # told of the commit, or the first poll: storage is read then
        if wake.wait(delay):
            wake.clear()
        else:
            delay = min(delay * 2, max_poll_s)
    while True:
        try:
            m, data = fmt.read_manifest_bytes(storage, step)
            if m.save_id == save_id:
                return m, data
            raise CommitError(f"step {step} was committed by another save ({m.save_id})")
        except FileNotFoundError:
            pass
        if failed is not None and (why := failed()):
            raise CommitError(f"step {step}: the save failed: {why}")
        if time.monotonic() > deadline:
            raise CommitError(f"step {step}: not committed after {timeout_s:.0f} s")
        if stop is not None and stop.is_set():
            raise CommitError(f"step {step}: closed before the commit")
        if wake is not None:
            if wake.wait(delay):  # (a stop sets it too: seen above, next round)
                wake.clear()
                continue
        elif stop is not None and stop.wait(delay):
            raise CommitError(f"step {step}: closed before the commit")
        delay = min(delay * 2, max_poll_s)
