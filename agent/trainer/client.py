"""A typed client of one agent's Unix-socket API (trainers, the CLI, tests).

Listings stream (``StreamSnapshots``, one snapshot per message) and documents over the agent's
inline limit come by reference (:meth:`AgentClient.document` reads them back in pieces), so no
answer outgrows a message; :meth:`AgentClient.list_snapshots` and the other whole-snapshot
calls put them back in place for callers that want every document inline. An agent older than
the stream is asked the unary way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import grpc

from ..documents import (
    DEFAULT_DOCUMENTS,
    INFO_FIELDS,
    MAX_DOCUMENT_BYTES,
    assemble,
    inline_document,
    pieces,
    set_document,
    writers_from_wire,
    writers_to_wire,
)
from ..errors import AgentUnavailableError
from ..pb import pb, rpc

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 << 20
_PIECE_BYTES = 4 << 20


class AgentClient:
    def __init__(self, address: str, *, timeout_s: float = 30.0) -> None:
        if not address.startswith("unix:"):
            raise ValueError(f"a trainer talks to its node's agent over a Unix socket: 'unix:///path', got {address!r}")
        self.address = address
        self.timeout_s = timeout_s
        self.channel = grpc.insecure_channel(address, options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
        self.trainer = rpc.TrainerServiceStub(self.channel)
        self.admin = rpc.AdminServiceStub(self.channel)

    def wait_ready(self, timeout_s: float) -> None:
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise AgentUnavailableError(
                f"no node agent answers at {self.address} after {timeout_s:.0f} s; start one with "
                "`ckpt-agent serve --socket PATH`, or drop agent= to persist in-process"
            ) from None

    def register(self, request: pb.RegisterRequest) -> Any:
        """The session's event stream (a call object: iterate it, ``cancel()`` to end the session)."""
        return self.trainer.Register(request, wait_for_ready=True)

    def lease(self, session_id: str, nbytes: int) -> pb.LeaseBufferResponse:
        return self.trainer.LeaseBuffer(pb.LeaseBufferRequest(session_id=session_id, nbytes=nbytes),
                                        timeout=self.timeout_s)

    def release(self, session_id: str, segment: str) -> pb.ReleaseBufferResponse:
        return self.trainer.ReleaseBuffer(pb.ReleaseBufferRequest(session_id=session_id, segment=segment),
                                          timeout=self.timeout_s)

    def announce(self, request: pb.AnnounceStagedRequest, *, inline_limit: int = 0) -> pb.AnnounceStagedResponse:
        """Announce a staged snapshot. ``inline_limit``: the agent's (``Registered``); a plan over
        it goes in pieces, and writers rank00000.. as their count (0: an agent that knows
        neither)."""
        if not inline_limit:
            return self.trainer.AnnounceStaged(request, timeout=self.timeout_s)
        names, count = writers_to_wire(request.writers)
        request.writers[:] = names
        request.writer_count = count
        if len(request.plan_json) <= inline_limit:
            return self.trainer.AnnounceStaged(request, timeout=self.timeout_s)
        plan = request.plan_json.encode()
        request.plan_json, request.plan_bytes = "", len(plan)

        def parts() -> Iterator[pb.AnnouncePart]:
            yield pb.AnnouncePart(request=request)
            for piece in pieces(pb.DOCUMENT_KIND_PLAN, plan, min(_PIECE_BYTES, 4 * inline_limit)):
                yield pb.AnnouncePart(plan=piece)

        return self.trainer.AnnounceStagedStream(parts(), timeout=self.timeout_s)

    def stream_snapshots(self, run_url: str, *, documents: Sequence[int] = (), include_peers: bool = False,
                         peers: Sequence[str] = (), writers: Sequence[str] = (),
                         steps: Sequence[int] = ()) -> Iterator[pb.SnapshotInfo]:
        """What the agent holds of ``run_url`` (empty: every run), one snapshot at a time, with
        ``documents`` (those over the inline limit named in ``by_reference``). With
        ``include_peers``, also what the ring's other agents hold (only ``peers`` of them, if
        given); an agent of the ring that could not be listed is an entry with only
        ``peer_address`` and ``error`` set. ``writers``, ``steps``: only these writers', these
        steps' snapshots (an agent that knows no step filter lists every step's)."""
        return iter(self.trainer.StreamSnapshots(pb.ListSnapshotsRequest(
            run_url=run_url, with_plans=bool(documents), documents=documents, include_peers=include_peers,
            by_reference=True, peer_addresses=peers, writers=writers, steps=steps), timeout=max(self.timeout_s, 600.0)))

    def list_snapshots(self, run_url: str, *, with_plans: bool = False,
                       include_peers: bool = False) -> list[pb.SnapshotInfo]:
        """Every snapshot held, whole (documents in place, writers listed)."""
        kinds = DEFAULT_DOCUMENTS if with_plans else ()
        try:
            infos = [i for i in self.stream_snapshots(run_url, documents=kinds, include_peers=include_peers)
                     if i.key.run_url]
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            resp = self.trainer.ListSnapshots(pb.ListSnapshotsRequest(
                run_url=run_url, with_plans=with_plans, include_peers=include_peers), timeout=self.timeout_s)
            return list(resp.snapshots)
        for info in infos:
            self.resolve(info)
        return infos

    def step_table(self, run_url: str, step: int) -> pb.StepTable | None:
        """The agent's table of committed ``step`` (every array held whole on this node), or None:
        it holds the step otherwise, not at all, or is older than the table (then list)."""
        try:
            return self.trainer.GetStepTable(pb.StepTableRequest(run_url=run_url, step=step), timeout=self.timeout_s)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:  # the usual reasons: a sharded step, a step not held here
                log.info("no step table of step %d from the node agent (%s): listing its snapshots", step, e.details())
            elif e.code() != grpc.StatusCode.UNIMPLEMENTED:
                log.warning("the node agent gave no table of step %d (%s: %s): listing its snapshots",
                            step, e.code(), e.details())
            return None

    def read_document(self, info: pb.SnapshotInfo, kind: int) -> bytes:
        """A document of a listed snapshot, read in pieces (through this agent if a peer holds it)."""
        stream = self.trainer.ReadDocument(pb.ReadDocumentRequest(
            key=info.key, save_id=info.save_id, kind=kind, peer_address=info.peer_address),
            timeout=max(self.timeout_s, 600.0))
        return assemble(stream, kind, MAX_DOCUMENT_BYTES)

    def document(self, info: pb.SnapshotInfo, kind: int) -> bytes | None:
        """A document of ``info``: inline, else read back (a listing leaves out those over the
        inline limit and those not asked for); None if the agent has none."""
        data = inline_document(info, kind)
        if data is None:
            try:
                data = self.read_document(info, kind)
            except grpc.RpcError as e:
                if e.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED):
                    raise
        return data

    def resolve(self, info: pb.SnapshotInfo) -> pb.SnapshotInfo:
        """Put what ``info`` left out by reference in place, and its writers as names."""
        for ref in list(info.by_reference):
            if ref.kind in INFO_FIELDS:
                set_document(info, ref.kind, self.read_document(info, ref.kind))
        del info.by_reference[:]
        if info.writer_count:
            info.writers[:] = writers_from_wire([], info.writer_count)
            info.writer_count = 0
        return info

    def fetch_snapshot(self, info: pb.SnapshotInfo, *, timeout_s: float | None = None,
                       documents: Sequence[int] = DEFAULT_DOCUMENTS) -> pb.SnapshotInfo:
        """Have the agent copy ``info`` (listed with ``include_peers``) from the peer holding it;
        returns it as now held here (segment, ``documents`` in place)."""
        held = self.trainer.FetchSnapshot(pb.FetchSnapshotRequest(
            key=info.key, save_id=info.save_id, peer_address=info.peer_address, documents=documents,
            by_reference=True), timeout=timeout_s or max(self.timeout_s, 600.0))
        return self.resolve(held)

    def get_snapshot(self, run_url: str, writer: str, step: int) -> pb.SnapshotInfo:
        key = pb.SnapshotKey(run_url=run_url, writer=writer, step=step)
        return self.resolve(self.trainer.GetSnapshot(pb.GetSnapshotRequest(key=key, by_reference=True),
                                                     timeout=self.timeout_s))

    def notice_commit(self, run_url: str, step: int, save_id: str, error: str = "") -> None:
        """Tell the agent that ``save_id`` committed ``step`` of ``run_url``, or failed (``error``);
        see ``Agent.notice_commit``."""
        self.trainer.NoticeCommit(pb.NoticeCommitRequest(run_url=run_url, step=step, save_id=save_id, error=error),
                                  timeout=self.timeout_s)

    def notice_persisted(self, run_url: str, step: int, save_id: str, error: str = "") -> None:
        """Tell the committing agent that every writer of ``save_id`` persisted (or that one
        failed: ``error``), see ``Agent.notice_persisted``."""
        self.trainer.NoticePersisted(pb.NoticePersistedRequest(run_url=run_url, step=step, save_id=save_id,
                                                               error=error), timeout=self.timeout_s)

    def status(self) -> pb.AgentStatus:
        return self.admin.GetAgentStatus(pb.GetAgentStatusRequest(), timeout=self.timeout_s)

    def drain(self, *, shutdown: bool = False, timeout_s: float = 0.0) -> pb.DrainResponse:
        return self.admin.Drain(pb.DrainRequest(shutdown=shutdown, timeout_s=timeout_s), timeout=None)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
