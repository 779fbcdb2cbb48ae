"""What a snapshot the agent holds offers a restore, worked out from its listing: which chunks
it holds and where in its segment, with their crc32c (its chunk index; from an older agent,
its plan and its writer's fragment), and whether storage committed its step from the
very save it holds (storage's commit point, read and parsed once per step, is the truth; the
agent's copy serves where storage has none). Documents left out of the listing by reference
are read back only when needed, through ``document(info, kind)``.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable

import torch

from ckpt import format as fmt
from ckpt.manifest import MANIFEST_KEY
from ckpt.storage import Storage

from ..documents import inline_document
from ..pb import pb
from ..plan import ChunkIndex, decode_chunk_index, decode_plan

log = logging.getLogger(__name__)

ReadDocument = Callable[[pb.SnapshotInfo, int], "bytes | None"]


# How every commit point begins (ckpt.commit writes its keys in this order): the save id read
# from these first bytes instead of parsing a document of thousands of arrays to find it.
_SAVE_ID = re.compile(rb'\{"zarr_format":3,"node_type":"group","attributes":\{"' + MANIFEST_KEY.encode()
                      + rb'":\{"format":"ckpt","format_version":\d{1,3},"step":\d{1,20},"save_id":"([A-Za-z0-9._-]{1,200})",')


def save_of(commit_point: bytes) -> str:
    m = _SAVE_ID.match(commit_point, 0, 512)
    if m is not None:
        return m.group(1).decode()
    return json.loads(commit_point)["attributes"][MANIFEST_KEY]["save_id"]


class CommitPoints:
    """Per step, the commit point storage holds and the save it committed: one read and one
    parse per step, whatever the snapshots of the step (it is O(arrays))."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._steps: dict[int, tuple[bytes | None, str | None]] = {}
        self._lock = threading.Lock()

    def of(self, step: int) -> tuple[bytes | None, str | None]:
        with self._lock:
            if step not in self._steps:
                try:
                    data = self.storage.read(f"{fmt.step_dir(step)}/{fmt.META}")
                except FileNotFoundError:
                    data = None
                except Exception as e:  # noqa: BLE001 - storage failing: the agent's copy serves
                    log.warning("cannot read the commit point of step %d (%s): using the agent's copy", step, e)
                    data = None
                self._steps[step] = (data, save_of(data) if data else None)
            return self._steps[step]


class HeldSnapshot:
    """One listed snapshot, as a restore uses it."""

    def __init__(self, info: pb.SnapshotInfo, document: ReadDocument, commits: CommitPoints) -> None:
        self.info = info
        self._document = document
        self._commits = commits

    @property
    def step(self) -> int:
        return self.info.key.step

    def describe(self) -> str:
        where = f"peer agent {self.info.peer_address}" if self.info.peer_address else "the agent"
        return f"step {self.step} of {self.info.key.writer} held by {where}"

    def commit_point(self) -> tuple[bytes | None, str]:
        """(the step's commit point, '') if storage committed it from this very save, else
        (None, why not; '' when the step is simply not committed)."""
        s = self.info
        if s.state == pb.SNAPSHOT_STATE_FAILED:
            return None, ""
        data, committed = self._commits.of(s.key.step)
        if data is None:  # retention removed the step from storage, or storage cannot be read
            data = self._document(s, pb.DOCUMENT_KIND_COMMIT_POINT)
            committed = save_of(data) if data else None
        if data is None:
            return None, ""
        if committed != s.save_id:
            return None, f"{self.describe()} is from save {s.save_id}, but the step was committed from save {committed}"
        return data, ""

    def index(self, buffer: torch.Tensor) -> ChunkIndex:
        """Its chunks, over ``buffer`` (the mapped segment; a meta tensor for the keys alone):
        the agent's chunk index, or (an agent that serves none) its plan, with the crc32c from
        the writer's fragment."""
        index = self._document(self.info, pb.DOCUMENT_KIND_CHUNK_INDEX)
        if index is not None:
            return decode_chunk_index(index, buffer)
        plan = self._document(self.info, pb.DOCUMENT_KIND_PLAN)
        if plan is None:
            raise ValueError("listed without its chunk index or its plan")
        decoded = decode_plan(plan, buffer)
        return ChunkIndex([], decoded, [None] * len(decoded.plan.requests))

    def chunk_keys(self) -> list[str]:
        """The storage keys of its chunks (nothing mapped)."""
        meta = torch.empty(self.info.nbytes, dtype=torch.uint8, device="meta")
        return self.index(meta).keys(fmt.step_dir(self.step))

    def fragment_crcs(self, storage: Storage) -> dict[tuple[str, tuple[int, ...]], int] | None:
        """The crc32c of its writer's chunks from the fragment (the agent's copy, else storage's);
        None if that fragment is of another save."""
        s = self.info
        doc = self._document(s, pb.DOCUMENT_KIND_FRAGMENT)
        if doc is not None:
            save_id, _packs, records = fmt.fragment_locations(json.loads(doc))
        else:
            save_id, _packs, records = fmt.read_fragment_locations(storage, s.key.step, s.key.writer)
        if save_id != s.save_id:
            return None
        return {(p, tuple(r.index)): r.crc32c for p, recs in records.items() for r in recs}


def inline_only(info: pb.SnapshotInfo, kind: int) -> bytes | None:
    """A ``document`` reader for listings with everything inline (an older agent's)."""
    return inline_document(info, kind)


class RemoteSnapshot:
    """A snapshot held by a peer agent, fetched on first use."""

    def __init__(self, held: HeldSnapshot, keys: list[str]) -> None:
        self.held = held
        self.keys = keys
        self.lock = threading.Lock()
        self.done = False  # fetched (its chunks are then local), or failed (read from storage)
