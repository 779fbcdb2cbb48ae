"""The gRPC servicers: thin. Each validates its request, calls :class:`agent.daemon.core.Agent`,
and answers an error with the status code :func:`agent.wire.status_of` gives it (unknown
session/segment/snapshot: NOT_FOUND; malformed: INVALID_ARGUMENT; out of order or wrong state:
FAILED_PRECONDITION; over budget: RESOURCE_EXHAUSTED; draining: UNAVAILABLE); a peer without
the right token gets UNAUTHENTICATED. A bad request never takes the daemon down.
"""

from __future__ import annotations

import functools
import hmac
import logging
import queue
import re
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import grpc

from ..errors import AgentNotFoundError, PeerError
from ..pb import pb, rpc
from ..plan import decode_plan
from ..wire import PB_TO_STATE, STATE_TO_PB, status_of
from .core import Agent
from .replication import Replicator
from .segments import Segment
from .snapshot import PersistSettings, Snapshot

log = logging.getLogger(__name__)

_WRITER_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_MAX_URL = 4096
_MAX_ID = 256
_MAX_WRITERS = 1 << 20


def _abort(context: grpc.ServicerContext, e: BaseException) -> None:
    code = status_of(e)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("internal error in an RPC")
    context.abort(code, str(e) if code is not grpc.StatusCode.INTERNAL else f"internal error: {type(e).__name__}: {e}")


def rpc_errors(fn: Callable) -> Callable:
    """Map the agent's exceptions to gRPC status codes (unary and streaming handlers)."""
    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except Exception as e:  # noqa: BLE001 - every error becomes a status
            if isinstance(e, grpc.RpcError) or context.code() is not None:
                raise
            _abort(context, e)
    return wrapper


def stream_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from fn(self, request, context)
        except Exception as e:  # noqa: BLE001
            if isinstance(e, grpc.RpcError) or context.code() is not None:
                raise
            _abort(context, e)
    return wrapper


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check_key(key: pb.SnapshotKey) -> tuple[str, str, int]:
    _check(0 < len(key.run_url) <= _MAX_URL, "key.run_url: required")
    _check(bool(_WRITER_RE.match(key.writer)), "key.writer: required (letters, digits, _.-)")
    _check(key.step >= 0, "key.step: must be >= 0")
    return key.run_url, key.writer, key.step


def snapshot_info(s: Snapshot, *, with_plan: bool) -> pb.SnapshotInfo:
    return pb.SnapshotInfo(
        key=pb.SnapshotKey(run_url=s.run_url, writer=s.writer, step=s.step), save_id=s.save_id,
        state=STATE_TO_PB[s.state], error=s.error, segment=s.segment.name, nbytes=s.nbytes,
        plan_json=s.plan_json if with_plan else "", fragment_json=s.fragment_json if with_plan else "",
        commit_point=s.commit_point if with_plan else b"", replica=s.replica, origin_agent=s.origin_agent,
        writers=s.writers, committer=s.committer,
    )


class _SnapshotReads:
    """ListSnapshots and ReadSnapshot, shared by the trainer and peer services."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def _list(self, request: pb.ListSnapshotsRequest) -> pb.ListSnapshotsResponse:
        _check(len(request.run_url) <= _MAX_URL, "run_url: too long")
        snaps = self.agent.snapshots(request.run_url)
        return pb.ListSnapshotsResponse(snapshots=[snapshot_info(s, with_plan=request.with_plans) for s in snaps])

    @rpc_errors
    def ListSnapshots(self, request: pb.ListSnapshotsRequest, context: grpc.ServicerContext) -> pb.ListSnapshotsResponse:
        return self._list(request)

    @rpc_errors
    def GetSnapshot(self, request: pb.GetSnapshotRequest, context: grpc.ServicerContext) -> pb.SnapshotInfo:
        return snapshot_info(self.agent.find(*check_key(request.key)), with_plan=True)

    @stream_errors
    def ReadSnapshot(self, request: pb.ReadSnapshotRequest, context: grpc.ServicerContext) -> Iterator[pb.SnapshotData]:
        s = self.agent.find(*check_key(request.key))
        if request.save_id and request.save_id != s.save_id:
            raise AgentNotFoundError(f"step {s.step} of {s.writer} is held from save {s.save_id}, not {request.save_id}")
        end = s.nbytes if not request.length else request.offset + request.length
        _check(request.offset <= s.nbytes and end <= s.nbytes, f"range {request.offset}..{end} outside {s.nbytes} bytes")
        step = self.agent.config.stream_chunk_bytes
        buf = s.segment.tensor
        for a in range(request.offset, end, step):
            if not context.is_active():
                return
            b = min(end, a + step)
            self.agent.metrics.bytes_served.inc(b - a)
            yield pb.SnapshotData(offset=a, data=buf[a:b].numpy().tobytes())


class TrainerServicer(_SnapshotReads, rpc.TrainerServiceServicer):
    def __init__(self, agent: Agent, peers: Callable[[], Replicator | None] | None = None) -> None:
        super().__init__(agent)
        self._peers = peers or (lambda: None)  # -> the daemon's Replicator, if it serves a ring

    @rpc_errors
    def ListSnapshots(self, request: pb.ListSnapshotsRequest, context: grpc.ServicerContext) -> pb.ListSnapshotsResponse:
        resp = self._list(request)
        replicator = self._peers()
        if (request.include_peers and request.run_url and replicator is not None
                and self.agent.config.restore_from_peers):
            held = {(i.key.run_url, i.key.writer, i.key.step, i.save_id) for i in resp.snapshots}
            resp.snapshots.extend(replicator.list_peer_snapshots(request.run_url, held))
        return resp

    @rpc_errors
    def FetchSnapshot(self, request: pb.FetchSnapshotRequest, context: grpc.ServicerContext) -> pb.SnapshotInfo:
        key = check_key(request.key)
        _check(0 < len(request.save_id) <= _MAX_ID, "save_id: required")
        replicator = self._peers()
        if replicator is None:
            raise PeerError("this agent serves no ring (no peer_listen/peers): it cannot fetch from peers")
        return snapshot_info(replicator.fetch(*key, request.save_id, request.peer_address), with_plan=True)

    @stream_errors
    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> Iterator[pb.SessionEvent]:
        _check(0 < len(request.run_url) <= _MAX_URL, "run_url: required")
        _check(bool(_WRITER_RE.match(request.writer)), f"writer: expected a writer name like rank00000, got {request.writer!r}")
        _check(request.commit_timeout_s >= 0 and request.io_threads <= 256, "commit_timeout_s/io_threads out of range")
        ret = request.retention
        settings = PersistSettings(
            durable=request.durable, io_threads=request.io_threads or self.agent.config.io_threads,
            commit_timeout_s=request.commit_timeout_s or 600.0, keep_last=ret.keep_last, keep_every=ret.keep_every,
            library_versions=tuple(sorted(request.library_versions.items())),
        )
        sess = self.agent.register(request.run_url, request.writer, request.pid, settings)
        context.add_callback(lambda: self.agent.end_session(sess.id))
        try:
            yield pb.SessionEvent(registered=pb.Registered(
                session_id=sess.id, agent_id=self.agent.config.agent_id,
                budget_bytes=self.agent.config.memory_budget_bytes, shm_dir=self.agent.config.shm_dir))
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
                    yield pb.SessionEvent(snapshot=pb.SnapshotEvent(
                        step=step, save_id=save_id, state=STATE_TO_PB[state], error=error, document_json=doc or ""))
        finally:
            self.agent.end_session(sess.id)

    @rpc_errors
    def LeaseBuffer(self, request: pb.LeaseBufferRequest, context: grpc.ServicerContext) -> pb.LeaseBufferResponse:
        _check(request.nbytes > 0, "nbytes: must be > 0")
        seg = self.agent.lease(request.session_id, request.nbytes)
        return pb.LeaseBufferResponse(segment=seg.name, nbytes=seg.nbytes)

    @rpc_errors
    def ReleaseBuffer(self, request: pb.ReleaseBufferRequest, context: grpc.ServicerContext) -> pb.ReleaseBufferResponse:
        return pb.ReleaseBufferResponse(freed=self.agent.release_buffer(request.session_id, request.segment))

    @rpc_errors
    def AnnounceStaged(self, request: pb.AnnounceStagedRequest,
                       context: grpc.ServicerContext) -> pb.AnnounceStagedResponse:
        _check(request.step >= 0, "step: must be >= 0")
        _check(0 < len(request.save_id) <= _MAX_ID, "save_id: required (<= 256 characters)")
        _check(0 < len(request.writers) <= _MAX_WRITERS, "writers: required")
        _check(all(_WRITER_RE.match(w) for w in request.writers), "writers: bad writer name")
        _check(len(set(request.writers)) == len(request.writers), "writers: duplicates")
        _check(0 < len(request.plan_json) <= self.agent.config.max_plan_bytes, "plan_json: empty or too large")
        snap = self.agent.announce(request.session_id, request.segment, request.step, request.save_id,
                                   tuple(request.writers), request.committer, request.plan_json)
        return pb.AnnounceStagedResponse(replicas=snap.replicas_wanted)


class PeerServicer(_SnapshotReads, rpc.PeerServiceServicer):
    @rpc_errors
    def Replicate(self, request_iterator: Iterator[pb.ReplicaPart], context: grpc.ServicerContext) -> pb.ReplicateResponse:
        first = next(request_iterator, None)
        _check(first is not None and first.WhichOneof("part") == "header", "the first part must be a header")
        h = first.header
        run_url, writer, step = check_key(h.key)
        _check(0 < len(h.save_id) <= _MAX_ID, "save_id: required")
        _check(0 < h.nbytes <= self.agent.config.memory_budget_bytes, "nbytes: out of range")
        _check(0 < len(h.plan_json) <= self.agent.config.max_plan_bytes, "plan_json: empty or too large")
        _check(writer in h.writers, "writers: must include the key's writer")
        def fill(seg: Segment) -> Snapshot:
            pos = 0
            buf = seg.tensor.numpy()
            for part in request_iterator:
                _check(part.WhichOneof("part") == "data", "only data parts may follow the header")
                d = part.data
                _check(d.offset == pos, f"data at offset {d.offset}, expected {pos} (parts arrive in order)")
                _check(pos + len(d.data) <= h.nbytes, "more data than the header announced")
                buf[pos : pos + len(d.data)] = memoryview(d.data)
                pos += len(d.data)
            _check(pos == h.nbytes, f"received {pos} of {h.nbytes} bytes")
            plan = decode_plan(h.plan_json, seg.tensor)
            ret = h.retention
            settings = PersistSettings(durable=h.durable, io_threads=self.agent.config.io_threads,
                                       commit_timeout_s=h.commit_timeout_s or 600.0, keep_last=ret.keep_last,
                                       keep_every=ret.keep_every,
                                       library_versions=tuple(sorted(h.library_versions.items())))
            return Snapshot(run_url, writer, step, h.save_id, tuple(h.writers), h.committer, h.plan_json, plan, seg,
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
        _check(state is not None, "state: required")
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
        _check(request.timeout_s >= 0, "timeout_s: must be >= 0")
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
