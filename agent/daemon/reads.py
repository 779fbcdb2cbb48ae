"""Listing and reading back what the agent holds, for the trainer and the peer services alike:
``ListSnapshots``/``GetSnapshot`` (unary: whole for clients that know no references, refused
with RESOURCE_EXHAUSTED where the answer would outgrow a message), ``StreamSnapshots`` (one
snapshot per message, documents over the inline limit by reference), ``ReadDocument`` (one
document in pieces) and ``ReadSnapshot`` (the bytes, in pieces).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import grpc

from ..documents import DEFAULT_DOCUMENTS, MAX_WRITERS, pieces
from ..errors import AgentNotFoundError, AnswerTooLargeError
from ..pb import pb
from .core import Agent
from .documents import check_kinds, held_document, snapshot_info
from .handlers import MAX_ID, MAX_URL, check, check_key, rpc_errors, stream_errors
from .metrics import ANSWER_TOO_LARGE, DOCUMENT_UNAVAILABLE
from .snapshot import Snapshot

_MESSAGE_SLACK = 4096  # framing beyond a message's own bytes
MAX_STEPS = 1 << 16  # steps a listing may be asked for


def documents_asked(request: pb.ListSnapshotsRequest | pb.GetSnapshotRequest | pb.FetchSnapshotRequest,
                    default: Sequence[int]) -> list[int]:
    kinds = list(request.documents) or list(default)
    check_kinds(kinds)
    return kinds


class SnapshotReads:
    """The reads both services share; the trainer service adds what the ring's agents hold."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    @property
    def inline_limit(self) -> int:
        return self.agent.config.inline_document_bytes

    def fits(self, message: pb.SnapshotInfo | pb.ListSnapshotsResponse, what: str) -> None:
        """Refuse, visibly, an answer that gRPC would fail to send."""
        size = message.ByteSize()
        if size + _MESSAGE_SLACK > self.agent.config.max_message_bytes:
            self.agent.metrics.restore_fallbacks.labels(ANSWER_TOO_LARGE).inc()
            raise AnswerTooLargeError(
                f"{what} would be {size} bytes, over the agent's max_message_bytes of "
                f"{self.agent.config.max_message_bytes}: list with StreamSnapshots, or ask with by_reference")

    def list_infos(self, request: pb.ListSnapshotsRequest, *, streamed: bool) -> Iterator[pb.SnapshotInfo]:
        check(len(request.run_url) <= MAX_URL, "run_url: too long")
        kinds = documents_asked(request, DEFAULT_DOCUMENTS) if request.with_plans or request.documents else []
        limit = self.inline_limit if streamed or request.by_reference else None
        check(len(request.writers) <= MAX_WRITERS, "writers: too many")
        check(len(request.steps) <= MAX_STEPS, "steps: too many")
        wanted, steps = set(request.writers), set(request.steps)
        for s in self.agent.snapshots(request.run_url):
            if (not wanted or s.writer in wanted) and (not steps or s.step in steps):
                yield snapshot_info(s, kinds, limit=limit, storage=self.agent.storage)

    def answer(self, request: pb.ListSnapshotsRequest, infos: Sequence[pb.SnapshotInfo]) -> pb.ListSnapshotsResponse:
        resp = pb.ListSnapshotsResponse(snapshots=infos)
        self.fits(resp, f"the listing of {len(infos)} snapshots")
        return resp

    @rpc_errors
    def ListSnapshots(self, request: pb.ListSnapshotsRequest, context: grpc.ServicerContext) -> pb.ListSnapshotsResponse:
        return self.answer(request, list(self.list_infos(request, streamed=False)))

    @stream_errors
    def StreamSnapshots(self, request: pb.ListSnapshotsRequest,
                        context: grpc.ServicerContext) -> Iterator[pb.SnapshotInfo]:
        for info in self.list_infos(request, streamed=True):
            if not context.is_active():
                return
            yield info

    @rpc_errors
    def GetSnapshot(self, request: pb.GetSnapshotRequest, context: grpc.ServicerContext) -> pb.SnapshotInfo:
        info = self.held_info(self.agent.find(*check_key(request.key)), request)
        self.fits(info, "the snapshot with its documents")
        return info

    def held_info(self, s: Snapshot, request: pb.GetSnapshotRequest | pb.FetchSnapshotRequest) -> pb.SnapshotInfo:
        return snapshot_info(s, documents_asked(request, DEFAULT_DOCUMENTS),
                             limit=self.inline_limit if request.by_reference else None, storage=self.agent.storage)

    def find_save(self, key: pb.SnapshotKey, save_id: str) -> Snapshot:
        s = self.agent.find(*check_key(key))
        if save_id and save_id != s.save_id:
            raise AgentNotFoundError(f"step {s.step} of {s.writer} is held from save {s.save_id}, not {save_id}")
        return s

    @stream_errors
    def ReadDocument(self, request: pb.ReadDocumentRequest, context: grpc.ServicerContext) -> Iterator[pb.DocumentPiece]:
        yield from self.document_pieces(request)

    def document_pieces(self, request: pb.ReadDocumentRequest) -> Iterator[pb.DocumentPiece]:
        """The pieces of a document this agent holds."""
        check(0 < len(request.save_id) <= MAX_ID, "save_id: required")
        check_kinds([request.kind])
        try:
            snap = self.find_save(request.key, request.save_id)
        except AgentNotFoundError:  # evicted, or replaced by another save, since it was listed
            self.agent.metrics.restore_fallbacks.labels(DOCUMENT_UNAVAILABLE).inc()
            raise
        data = held_document(snap, request.kind, self.agent.storage)
        yield from pieces(request.kind, data, self.agent.config.stream_chunk_bytes)

    @stream_errors
    def ReadSnapshot(self, request: pb.ReadSnapshotRequest, context: grpc.ServicerContext) -> Iterator[pb.SnapshotData]:
        s = self.find_save(request.key, request.save_id)
        end = s.nbytes if not request.length else request.offset + request.length
        check(request.offset <= s.nbytes and end <= s.nbytes, f"range {request.offset}..{end} outside {s.nbytes} bytes")
        step = self.agent.config.stream_chunk_bytes
        buf = s.segment.tensor
        for a in range(request.offset, end, step):
            if not context.is_active():
                return
            b = min(end, a + step)
            self.agent.metrics.bytes_served.inc(b - a)
            yield pb.SnapshotData(offset=a, data=buf[a:b].numpy().tobytes())
