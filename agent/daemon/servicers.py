"""The gRPC servicers: thin. Each validates its request, calls :class:`agent.daemon.core.Agent`,
and answers an error with the status code :func:`agent.wire.status_of` gives it (unknown
session/segment/snapshot: NOT_FOUND; malformed: INVALID_ARGUMENT; out of order or wrong state:
FAILED_PRECONDITION; over budget, or an answer over a message: RESOURCE_EXHAUSTED; draining:
UNAVAILABLE); a peer without the right token gets UNAUTHENTICATED. A bad request never takes the
daemon down. Listing and reading back is :mod:`agent.daemon.reads`, shared by both services.
"""

from __future__ import annotations

import hmac
import logging
import queue
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import grpc

from ckpt import SnapshotState

from ..documents import DEFAULT_DOCUMENTS, Assembly, pieces, writers_from_wire
from ..errors import AgentNotFoundError, PeerError
from ..pb import pb, rpc
from ..plan import decode_plan
from ..wire import PB_TO_STATE, STATE_TO_PB
from .core import Agent
from .handlers import MAX_ID, MAX_PEERS, MAX_URL, WRITER_RE, check, check_key, rpc_errors, stream_errors
from .reads import SnapshotReads, documents_asked
from .replication import Replicator
from .segments import Segment
from .snapshot import PersistSettings, Snapshot

log = logging.getLogger(__name__)


def check_writers(names: Any, count: int) -> tuple[str, ...]:
    writers = writers_from_wire(names, count)
    check(len(writers) > 0, "writers: required")
    check(all(WRITER_RE.match(w) for w in writers), "writers: bad writer name")
    check(len(set(writers)) == len(writers), "writers: duplicates")
    return writers


def read_plan(first: str, nbytes: int, parts: Iterator[Any], limit: int) -> str:
    """The plan of an announce or a replica header: inline, or in the ``plan`` pieces that
    follow it (``nbytes`` of them)."""
    if not nbytes:
        check(0 < len(first) <= limit, "plan_json: empty or too large")
        return first
    check(not first and nbytes <= limit, f"plan_bytes: {nbytes} is over the agent's max_plan_bytes of {limit}")
    doc = Assembly(pb.DOCUMENT_KIND_PLAN, limit, nbytes)
    for part in parts:
        check(part.WhichOneof("part") == "plan", "the plan's pieces must follow the header")
        if doc.add(part.plan):
            break
    return doc.data().decode()


class TrainerServicer(SnapshotReads, rpc.TrainerServiceServicer):
    def __init__(self, agent: Agent, peers: Callable[[], Replicator | None] | None = None) -> None:
        super().__init__(agent)
        self._peers = peers or (lambda: None)  # -> the daemon's Replicator, if it serves a ring

    def _ring(self, request: pb.ListSnapshotsRequest) -> Replicator | None:
        replicator = self._peers()
        if request.include_peers and request.run_url and self.agent.config.restore_from_peers:
            return replicator
        return None

    def _peer_infos(self, request: pb.ListSnapshotsRequest, replicator: Replicator,
                    held: list[pb.SnapshotInfo]) -> Iterator[pb.SnapshotInfo]:
        kinds = documents_asked(request, DEFAULT_DOCUMENTS) if request.with_plans or request.documents else []
        keys = {(i.key.run_url, i.key.writer, i.key.step, i.save_id) for i in held}
        check(len(request.peer_addresses) <= MAX_PEERS, "peer_addresses: too many")
        return replicator.peer_snapshots(request.run_url, keys, kinds, peers=request.peer_addresses,
                                         writers=request.writers, steps=request.steps)

    @rpc_errors
    def ListSnapshots(self, request: pb.ListSnapshotsRequest, context: grpc.ServicerContext) -> pb.ListSnapshotsResponse:
        infos = list(self.list_infos(request, streamed=False))
        replicator = self._ring(request)
        if replicator is not None:
            for info in self._peer_infos(request, replicator, infos):
                if not info.key.run_url:
                    continue  # a peer that did not answer (the stream says so; this answer never could)
                if not request.by_reference:
                    replicator.resolve(info)  # a client that knows no references gets them inline
                infos.append(info)
        return self.answer(request, infos)

    @stream_errors
    def StreamSnapshots(self, request: pb.ListSnapshotsRequest,
                        context: grpc.ServicerContext) -> Iterator[pb.SnapshotInfo]:
        held = []
        for info in self.list_infos(request, streamed=True):
            held.append(info)
            yield info
        replicator = self._ring(request)
        if replicator is not None and context.is_active():
            yield from self._peer_infos(request, replicator, held)

    @stream_errors
    def ReadDocument(self, request: pb.ReadDocumentRequest, context: grpc.ServicerContext) -> Iterator[pb.DocumentPiece]:
        if not request.peer_address:
            yield from self.document_pieces(request)
            return
        check(0 < len(request.save_id) <= MAX_ID, "save_id: required")
        key = check_key(request.key)
        replicator = self._peers()
        if replicator is None:
            raise PeerError("this agent serves no ring (no peer_listen/peers): it cannot read from peers")
        yield from replicator.peer_document(request.peer_address, key, request.save_id, request.kind)

    @rpc_errors
    def GetStepTable(self, request: pb.StepTableRequest, context: grpc.ServicerContext) -> pb.StepTable:
        check(0 < len(request.run_url) <= MAX_URL, "run_url: required")
        try:
            table = self.agent.step_tables.get(request.run_url, request.step)
        except AgentNotFoundError:
            self.agent.metrics.step_tables.labels("refused").inc()
            raise
        self.agent.metrics.step_tables.labels("served").inc()
        return table

    @rpc_errors
    def FetchSnapshot(self, request: pb.FetchSnapshotRequest, context: grpc.ServicerContext) -> pb.SnapshotInfo:
        key = check_key(request.key)
        check(0 < len(request.save_id) <= MAX_ID, "save_id: required")
        replicator = self._peers()
        if replicator is None:
            raise PeerError("this agent serves no ring (no peer_listen/peers): it cannot fetch from peers")
        info = self.held_info(replicator.fetch(*key, request.save_id, request.peer_address), request)
        self.fits(info, "the fetched snapshot with its documents")
        return info

    @rpc_errors
    def NoticeCommit(self, request: pb.NoticeCommitRequest, context: grpc.ServicerContext) -> pb.NoticeCommitResponse:
        check(0 < len(request.run_url) <= MAX_URL, "run_url: required")
        check(0 < len(request.save_id) <= MAX_ID, "save_id: required")
        check(len(request.error) <= MAX_URL, "error: too long")
        self.agent.notice_commit(request.run_url, request.step, request.save_id, request.error)
        return pb.NoticeCommitResponse()

    @rpc_errors
    def NoticePersisted(self, request: pb.NoticePersistedRequest,
                        context: grpc.ServicerContext) -> pb.NoticePersistedResponse:
        check(0 < len(request.run_url) <= MAX_URL, "run_url: required")
        check(0 < len(request.save_id) <= MAX_ID, "save_id: required")
        check(len(request.error) <= MAX_URL, "error: too long")
        self.agent.notice_persisted(request.run_url, request.step, request.save_id, request.error)
        return pb.NoticePersistedResponse()

    @stream_errors
    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> Iterator[pb.SessionEvent]:
        check(0 < len(request.run_url) <= MAX_URL, "run_url: required")
        check(bool(WRITER_RE.match(request.writer)), f"writer: expected a writer name like rank00000, got {request.writer!r}")
        check(request.commit_timeout_s >= 0 and request.io_threads <= 256, "commit_timeout_s/io_threads out of range")
        ret = request.retention
        settings = PersistSettings(
            durable=request.durable, io_threads=request.io_threads or self.agent.config.io_threads,
            commit_timeout_s=request.commit_timeout_s or 600.0, keep_last=ret.keep_last, keep_every=ret.keep_every,
            library_versions=tuple(sorted(request.library_versions.items())),
        )
        sess = self.agent.register(request.run_url, request.writer, request.pid, settings)
        context.add_callback(lambda: self.agent.end_session(sess.id))
        cfg = self.agent.config
        # A trainer that cannot take a document in pieces gets it inline, as before.
        limit = cfg.inline_document_bytes if request.document_pieces else None
        try:
            yield pb.SessionEvent(registered=pb.Registered(
                session_id=sess.id, agent_id=cfg.agent_id, budget_bytes=cfg.memory_budget_bytes, shm_dir=cfg.shm_dir,
                inline_limit_bytes=cfg.inline_document_bytes))
            while context.is_active():
                try:
                    ev = sess.events.get(timeout=0.5)
                except queue.Empty:
                    continue
                if ev is None:
                    return
                if ev[0] == "released":
                    yield pb.SessionEvent(released=pb.BufferReleased(segment=ev[1]))
                else:
                    _, step, save_id, state, error, doc = ev
                    doc = doc or ""
                    event = pb.SnapshotEvent(step=step, save_id=save_id, state=STATE_TO_PB[state], error=error)
                    if limit is not None and len(doc) > limit:
                        kind = (pb.DOCUMENT_KIND_FRAGMENT if state == SnapshotState.PERSISTED
                                else pb.DOCUMENT_KIND_MANIFEST)
                        data = doc.encode()
                        for piece in pieces(kind, data, cfg.stream_chunk_bytes):
                            yield pb.SessionEvent(piece=piece)
                        event.document_bytes = len(data)
                    else:
                        event.document_json = doc
                    yield pb.SessionEvent(snapshot=event)
        finally:
            self.agent.end_session(sess.id)

    @rpc_errors
    def LeaseBuffer(self, request: pb.LeaseBufferRequest, context: grpc.ServicerContext) -> pb.LeaseBufferResponse:
        check(request.nbytes > 0, "nbytes: must be > 0")
        seg = self.agent.lease(request.session_id, request.nbytes)
        return pb.LeaseBufferResponse(segment=seg.name, nbytes=seg.nbytes)

    @rpc_errors
    def ReleaseBuffer(self, request: pb.ReleaseBufferRequest, context: grpc.ServicerContext) -> pb.ReleaseBufferResponse:
        return pb.ReleaseBufferResponse(freed=self.agent.release_buffer(request.session_id, request.segment))

    def _announce(self, request: pb.AnnounceStagedRequest, parts: Iterator[pb.AnnouncePart]) -> pb.AnnounceStagedResponse:
        check(request.step >= 0, "step: must be >= 0")
        check(0 < len(request.save_id) <= MAX_ID, "save_id: required (<= 256 characters)")
        writers = check_writers(request.writers, request.writer_count)
        plan_json = read_plan(request.plan_json, request.plan_bytes, parts, self.agent.config.max_plan_bytes)
        snap = self.agent.announce(request.session_id, request.segment, request.step, request.save_id,
                                   writers, request.committer, plan_json)
        return pb.AnnounceStagedResponse(replicas=snap.replicas_wanted)

    @rpc_errors
    def AnnounceStaged(self, request: pb.AnnounceStagedRequest,
                       context: grpc.ServicerContext) -> pb.AnnounceStagedResponse:
        check(not request.plan_bytes, "plan_bytes: a plan in pieces goes through AnnounceStagedStream")
        return self._announce(request, iter(()))

    @rpc_errors
    def AnnounceStagedStream(self, request_iterator: Iterator[pb.AnnouncePart],
                             context: grpc.ServicerContext) -> pb.AnnounceStagedResponse:
        first = next(request_iterator, None)
        check(first is not None and first.WhichOneof("part") == "request", "the first part must be the request")
        return self._announce(first.request, request_iterator)


class PeerServicer(SnapshotReads, rpc.PeerServiceServicer):
    @rpc_errors
    def Replicate(self, request_iterator: Iterator[pb.ReplicaPart], context: grpc.ServicerContext) -> pb.ReplicateResponse:
        first = next(request_iterator, None)
        check(first is not None and first.WhichOneof("part") == "header", "the first part must be a header")
        h = first.header
        run_url, writer, step = check_key(h.key)
        check(0 < len(h.save_id) <= MAX_ID, "save_id: required")
        check(0 < h.nbytes <= self.agent.config.memory_budget_bytes, "nbytes: out of range")
        writers = check_writers(h.writers, h.writer_count)
        check(writer in writers, "writers: must include the key's writer")
        plan_json = read_plan(h.plan_json, h.plan_bytes, request_iterator, self.agent.config.max_plan_bytes)

        def fill(seg: Segment) -> Snapshot:
            pos = 0
            buf = seg.tensor.numpy()
            for part in request_iterator:
                check(part.WhichOneof("part") == "data", "only data parts may follow the header (and the plan)")
                d = part.data
                check(d.offset == pos, f"data at offset {d.offset}, expected {pos} (parts arrive in order)")
                check(pos + len(d.data) <= h.nbytes, "more data than the header announced")
                buf[pos : pos + len(d.data)] = memoryview(d.data)
                pos += len(d.data)
            check(pos == h.nbytes, f"received {pos} of {h.nbytes} bytes")
            plan = decode_plan(plan_json, seg.tensor)
            ret = h.retention
            settings = PersistSettings(durable=h.durable, io_threads=self.agent.config.io_threads,
                                       commit_timeout_s=h.commit_timeout_s or 600.0, keep_last=ret.keep_last,
                                       keep_every=ret.keep_every,
                                       library_versions=tuple(sorted(h.library_versions.items())))
            return Snapshot(run_url, writer, step, h.save_id, writers, h.committer, plan_json, plan, seg,
                            settings, replica=True, origin_agent=h.origin_agent, origin_address=h.origin_address,
                            rank_in_ring=max(1, h.rank_in_ring))

        self.agent.receive_replica(h.nbytes, fill)
        self.agent.metrics.bytes_received.inc(h.nbytes)
        log.info("replica received", extra={"fields": {"run": run_url, "writer": writer, "step": step,
                                                       "origin": h.origin_agent, "bytes": h.nbytes}})
        return pb.ReplicateResponse(received_bytes=h.nbytes)

    @rpc_errors
    def NotifySnapshotState(self, request: pb.NotifySnapshotStateRequest,
                            context: grpc.ServicerContext) -> pb.NotifySnapshotStateResponse:
        key = check_key(request.key)
        state = PB_TO_STATE.get(request.state)
        check(state is not None, "state: required")
        self.agent.peer_state(*key, request.save_id, state)
        return pb.NotifySnapshotStateResponse()


class Administered(Protocol):
    """What the admin service drives: the running daemon (which builds the servicers, so they
    know it by this protocol rather than by import)."""

    agent: Agent

    def status(self) -> pb.AgentStatus: ...

    def drain(self, timeout_s: float | None = None, *, shutdown: bool = False) -> bool: ...


class AdminServicer(rpc.AdminServiceServicer):
    def __init__(self, daemon: Administered) -> None:
        self.daemon = daemon

    @rpc_errors
    def GetAgentStatus(self, request: pb.GetAgentStatusRequest, context: grpc.ServicerContext) -> pb.AgentStatus:
        return self.daemon.status()

    @rpc_errors
    def Drain(self, request: pb.DrainRequest, context: grpc.ServicerContext) -> pb.DrainResponse:
        check(request.timeout_s >= 0, "timeout_s: must be >= 0")
        drained = self.daemon.drain(request.timeout_s or None, shutdown=request.shutdown)
        return pb.DrainResponse(drained=drained, pending=len(self.daemon.agent.pending()))


class TokenInterceptor(grpc.ServerInterceptor):
    """Peers must send ``authorization: Bearer <token>``; health checks need none."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        if details.method.startswith("/grpc.health.v1.Health/"):
            return continuation(details)
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(got.encode() if isinstance(got, str) else got, self._expected):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None

        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong peer token")

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)
