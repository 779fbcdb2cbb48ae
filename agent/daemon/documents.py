"""A held snapshot's documents as the wire carries them (see :mod:`agent.documents`): each
one asked for goes inline up to the inline limit, else by reference (``ReadDocument`` streams
it in pieces). The chunk index, what a restore reads of a snapshot, is built here once per
snapshot from the plan the agent decoded and the fragment it persisted, so that no trainer
parses a plan or a fragment of O(arrays) per snapshot it restores from.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from ckpt import SnapshotState
from ckpt import format as fmt

from ..documents import INFO_FIELDS, kind_name, writers_to_wire
from ..errors import AgentNotFoundError, InvalidRequestError
from ..pb import pb
from ..plan import encode_chunk_index
from ..wire import STATE_TO_PB
from .snapshot import Snapshot


def chunk_index(snap: Snapshot) -> str:
    """The snapshot's chunk index (cached; rebuilt once the fragment arrives with the crc32c)."""
    has_fragment = bool(snap.fragment_json)
    if snap.chunk_index and (snap.chunk_index_crcs or not has_fragment):
        return snap.chunk_index
    crcs = {}
    if has_fragment:
        _save_id, _packs, records = fmt.fragment_locations(json.loads(snap.fragment_json))
        crcs = {(p, tuple(r.index)): r.crc32c for p, recs in records.items() for r in recs}
    index = encode_chunk_index(snap.plan.plan, snap.segment.tensor, crcs)
    snap.chunk_index, snap.chunk_index_crcs = index, has_fragment
    return index


def document(snap: Snapshot, kind: int) -> bytes:
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
        return chunk_index(snap).encode()
    raise InvalidRequestError(f"kind: a held snapshot has no {kind_name(kind)}")


def held_document(snap: Snapshot, kind: int) -> bytes:
    data = document(snap, kind)
    if not data:
        raise AgentNotFoundError(f"step {snap.step} of {snap.writer} has no {kind_name(kind)} (yet)")
    return data


def check_kinds(kinds: Sequence[int]) -> None:
    bad = [k for k in kinds if k not in INFO_FIELDS]
    if bad:
        raise InvalidRequestError(f"documents: a snapshot carries no {kind_name(bad[0])}")


def snapshot_info(s: Snapshot, kinds: Sequence[int], *, limit: int | None) -> pb.SnapshotInfo:
    """``s`` as listed, with the documents ``kinds``. ``limit``: documents over it are left out
    and named in ``by_reference``, and writers rank00000.. go as their count; None: everything
    inline (for clients that know no references)."""
    names, count = writers_to_wire(s.writers) if limit is not None else (list(s.writers), 0)
    info = pb.SnapshotInfo(
        key=pb.SnapshotKey(run_url=s.run_url, writer=s.writer, step=s.step), save_id=s.save_id,
        state=STATE_TO_PB[s.state], error=s.error, segment=s.segment.name, nbytes=s.nbytes, replica=s.replica,
        origin_agent=s.origin_agent, writers=names, writer_count=count, committer=s.committer)
    for kind in kinds:
        data = document(s, kind)
        if not data:
            continue
        if limit is not None and len(data) > limit:
            info.by_reference.add(kind=kind, nbytes=len(data))
        else:
            setattr(info, INFO_FIELDS[kind], data if kind == pb.DOCUMENT_KIND_COMMIT_POINT else data.decode())
    return info
