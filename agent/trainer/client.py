"""A typed client of one agent's Unix-socket API (trainers, the CLI, tests)."""

from __future__ import annotations

from typing import Any

import grpc

from ..errors import AgentUnavailableError
from ..pb import pb, rpc

MAX_MESSAGE_BYTES = 64 << 20


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

    def announce(self, request: pb.AnnounceStagedRequest) -> pb.AnnounceStagedResponse:
        return self.trainer.AnnounceStaged(request, timeout=self.timeout_s)

    def list_snapshots(self, run_url: str, *, with_plans: bool = False,
                       include_peers: bool = False) -> list[pb.SnapshotInfo]:
        resp = self.trainer.ListSnapshots(pb.ListSnapshotsRequest(run_url=run_url, with_plans=with_plans,
                                                                  include_peers=include_peers),
                                          timeout=self.timeout_s)
        return list(resp.snapshots)

    def fetch_snapshot(self, info: pb.SnapshotInfo, *, timeout_s: float | None = None) -> pb.SnapshotInfo:
        """Have the agent copy ``info`` (listed with ``include_peers``) from the peer holding it;
        returns it as now held here (segment, plan)."""
        return self.trainer.FetchSnapshot(pb.FetchSnapshotRequest(key=info.key, save_id=info.save_id,
                                                                  peer_address=info.peer_address),
                                          timeout=timeout_s or max(self.timeout_s, 600.0))

    def get_snapshot(self, run_url: str, writer: str, step: int) -> pb.SnapshotInfo:
        return self.trainer.GetSnapshot(pb.GetSnapshotRequest(key=pb.SnapshotKey(run_url=run_url, writer=writer,
                                                                                 step=step)), timeout=self.timeout_s)

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
