"""A held snapshot's documents as the wire carries them (see :mod:`agent.documents`): each
one asked for goes inline up to the inline limit, else by reference (``ReadDocument`` streams
it in pieces). The chunk index, what a restore reads of a snapshot, is built here once per
snapshot from the plan the agent decoded and the fragment it persisted, as it persists it (a
replica's from storage, on its first listing), so that no trainer parses a plan or a fragment of
O(arrays) per snapshot it restores from, and no restore waits while the agent does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence

from ckpt import SnapshotState
from ckpt import format as fmt
from ckpt.manifest import Fragment
from ckpt.storage import Storage

from ..documents import INFO_FIELDS, kind_name, writers_to_wire
from ..errors import AgentNotFoundError, InvalidRequestError
from ..pb import pb
from ..plan import encode_chunk_index
from ..wire import STATE_TO_PB
from .snapshot import Snapshot

log = logging.getLogger(__name__)

StorageOf = Callable[[str], Storage]  # a run's storage, by its URL


def _fragment_crcs(snap: Snapshot, storage: StorageOf) -> dict[tuple[str, tuple[int, ...]], int] | None:
    """The crc32c of the snapshot's chunks from its writer's fragment: the one the agent persisted,
    else (a replica told of the persist, not sent the fragment) the one in storage."""
    if snap.fragment_json:
        save_id, _packs, records = fmt.fragment_locations(json.loads(snap.fragment_json))
    elif snap.state in (SnapshotState.PERSISTED, SnapshotState.COMMITTED):
        try:
            save_id, _packs, records = fmt.read_fragment_locations(storage(snap.run_url), snap.step, snap.writer)
        except Exception as e:  # noqa: BLE001 - the index goes without them; a restore reads those chunks from storage
            log.warning("no fragment for the chunk index of step %d of %s: %s", snap.step, snap.writer, e)
            return None
    else:
        return None
    if save_id != snap.save_id:
        return None
    return {(p, tuple(r.index)): r.crc32c for p, recs in records.items() for r in recs}


def index_persisted(snap: Snapshot, frag: Fragment) -> None:
    """Build ``snap``'s chunk index as it is persisted, from the fragment in hand: off the path of
    a restore, which would otherwise wait while the agent parses every writer's fragment back
    (2,000 arrays: tens of ms each, for every snapshot of the node, on the first listing)."""
    if frag.save_id != snap.save_id:
        return
    crcs = {(p, tuple(r.index)): r.crc32c for p, recs in frag.chunks.items() for r in recs}
    snap.chunk_index = encode_chunk_index(snap.plan.plan, snap.segment.tensor, crcs)
    snap.chunk_index_crcs = True


def chunk_index(snap: Snapshot, storage: StorageOf) -> str:
    """The snapshot's chunk index: built once, and again once the crc32c become known."""
    if snap.chunk_index and snap.chunk_index_crcs:
        return snap.chunk_index
    crcs = _fragment_crcs(snap, storage)
    if crcs is not None or not snap.chunk_index:
        snap.chunk_index = encode_chunk_index(snap.plan.plan, snap.segment.tensor, crcs)
        snap.chunk_index_crcs = crcs is not None
    return snap.chunk_index


def document(snap: Snapshot, kind: int, storage: StorageOf) -> bytes:
    """The document ``kind`` of ``snap`` (empty: it has none yet, e.g. a fragment before persist)."""
    if kind == pb.DOCUMENT_KIND_PLAN:
        return snap.plan_json.encode()
    if kind == pb.DOCUMENT_KIND_FRAGMENT:
        return snap.fragment_json.encode()
    if kind == pb.DOCUMENT_KIND_COMMIT_POINT:
        return snap.commit_point
    if kind == pb.DOCUMENT_KIND_CHUNK_INDEX:
        if snap.state == SnapshotState.FAILED:
            return b""
        return chunk_index(snap, storage).encode()
    raise InvalidRequestError(f"kind: a held snapshot has no {kind_name(kind)}")


def held_document(snap: Snapshot, kind: int, storage: StorageOf) -> bytes:
    data = document(snap, kind, storage)
    if not data:
        raise AgentNotFoundError(f"step {snap.step} of {snap.writer} has no {kind_name(kind)} (yet)")
    return data


def check_kinds(kinds: Sequence[int]) -> None:
    bad = [k for k in kinds if k not in INFO_FIELDS]
    if bad:
        raise InvalidRequestError(f"documents: a snapshot carries no {kind_name(bad[0])}")


def snapshot_info(s: Snapshot, kinds: Sequence[int], *, limit: int | None, storage: StorageOf) -> pb.SnapshotInfo:
    """``s`` as listed, with the documents ``kinds``. ``limit``: documents over it are left out
    and named in ``by_reference``, and writers rank00000.. go as their count; None: everything
    inline (for clients that know no references)."""
    names, count = writers_to_wire(s.writers) if limit is not None else (list(s.writers), 0)
    info = pb.SnapshotInfo(
        key=pb.SnapshotKey(run_url=s.run_url, writer=s.writer, step=s.step), save_id=s.save_id,
        state=STATE_TO_PB[s.state], error=s.error, segment=s.segment.name, nbytes=s.nbytes, replica=s.replica,
        origin_agent=s.origin_agent, writers=names, writer_count=count, committer=s.committer)
    for kind in kinds:
        data = document(s, kind, storage)
        if not data:
            continue
        if limit is not None and len(data) > limit:
            info.by_reference.add(kind=kind, nbytes=len(data))
        else:
            setattr(info, INFO_FIELDS[kind], data if kind == pb.DOCUMENT_KIND_COMMIT_POINT else data.decode())
    return info
