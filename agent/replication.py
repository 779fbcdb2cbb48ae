"""Peer replication: each agent streams its staged snapshots to the next ``replicas`` agents of
the ring, tells them when a snapshot is persisted and committed, and watches the origins of
the replicas it holds. When an origin stays unreachable for ``peer_dead_after_s`` (times its
successor's rank in the ring, so the first successor acts first) while one of its snapshots is
not yet persisted or committed, this agent persists it (and commits it, if the origin's trainer
was the committer). Takeover is idempotent: a fragment or commit point already in storage from
the same save is kept, never rewritten.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .config import AgentConfig
from .core import COMMITTED, PERSISTED, STAGED, Agent, Snapshot
from .pb import pb, rpc
from .server import STATE_TO_PB

log = logging.getLogger(__name__)


def peer_channel(address: str, config: AgentConfig) -> grpc.Channel:
    options = [("grpc.max_send_message_length", config.max_message_bytes),
               ("grpc.max_receive_message_length", config.max_message_bytes)]
    if config.tls:
        root = open(config.tls_ca, "rb").read() if config.tls_ca else None
        creds = grpc.ssl_channel_credentials(root_certificates=root)
        return grpc.secure_channel(address, creds, options=options)
    return grpc.insecure_channel(address, options=options)


class Replicator:
    def __init__(self, config: AgentConfig, agent: Agent) -> None:
        self.config = config
        self.agent = agent
        self._auth = (("authorization", f"Bearer {config.token}"),)
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="agent-replicate")
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._monitor_loop, name="agent-peer-monitor", daemon=True)
        self._monitor.start()

    def channel(self, address: str) -> grpc.Channel:
        with self._lock:
            ch = self._channels.get(address)
            if ch is None:
                ch = self._channels[address] = peer_channel(address, self.config)
            return ch

    # -- sending -------------------------------------------------------------------------------

    def replicate(self, snap: Snapshot) -> None:
        for rank, peer in enumerate(self.config.ring_successors(), start=1):
            self._pool.submit(self._send, snap, peer, rank)

    def _parts(self, snap: Snapshot, rank: int) -> Iterator[pb.ReplicaPart]:
        s = snap.settings
        yield pb.ReplicaPart(header=pb.ReplicaHeader(
            key=pb.SnapshotKey(run_url=snap.run_url, writer=snap.writer, step=snap.step), save_id=snap.save_id,
            writers=snap.writers, committer=snap.committer, plan_json=snap.plan_json, nbytes=snap.nbytes,
            origin_agent=self.config.agent_id, origin_address=self.config.self_address or "",
            retention=pb.Retention(keep_last=s.keep_last, keep_every=s.keep_every), durable=s.durable,
            commit_timeout_s=s.commit_timeout_s, library_versions=dict(s.library_versions), rank_in_ring=rank))
        buf = snap.segment.tensor
        step = self.config.stream_chunk_bytes
        for a in range(0, snap.nbytes, step):
            b = min(snap.nbytes, a + step)
            yield pb.ReplicaPart(data=pb.SnapshotData(offset=a, data=buf[a:b].numpy().tobytes()))

    def _send(self, snap: Snapshot, peer: str, rank: int) -> None:
        try:
            stub = rpc.PeerServiceStub(self.channel(peer))
            stub.Replicate(self._parts(snap, rank), metadata=self._auth, timeout=self.config.peer_timeout_s * 10)
        except grpc.RpcError as e:
            self.agent.metrics.failures.labels("replicate").inc()
            log.warning("replication failed", extra={"fields": {"peer": peer, "step": snap.step, "writer": snap.writer,
                                                                "code": str(e.code()), "error": e.details()}})
            return
        self.agent.metrics.bytes_replicated.inc(snap.nbytes)
        self.agent.mark_replicated(snap, peer)
        if snap.state in (PERSISTED, COMMITTED):  # it got there while the bytes were in flight
            self._notify_one(snap, peer)

    def notify(self, snap: Snapshot) -> None:
        for peer in list(snap.replicated_to):
            self._pool.submit(self._notify_one, snap, peer)

    def _notify_one(self, snap: Snapshot, peer: str) -> None:
        try:
            rpc.PeerServiceStub(self.channel(peer)).NotifySnapshotState(
                pb.NotifySnapshotStateRequest(key=pb.SnapshotKey(run_url=snap.run_url, writer=snap.writer,
                                                                 step=snap.step),
                                              save_id=snap.save_id, state=STATE_TO_PB[snap.state]),
                metadata=self._auth, timeout=self.config.peer_timeout_s)
        except grpc.RpcError as e:
            log.debug("notify %s failed: %s", peer, e)

    # -- watching origins ----------------------------------------------------------------------

    def origin_alive(self, address: str) -> bool:
        if not address:
            return False
        try:
            resp = health_pb2_grpc.HealthStub(self.channel(address)).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=min(2.0, self.config.peer_dead_after_s))
            return resp.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    def _monitor_loop(self) -> None:
        while not self._stop.wait(self.config.peer_check_interval_s):
            try:
                self.check_origins()
            except Exception:  # noqa: BLE001 - keep watching
                log.warning("peer monitor error", exc_info=True)

    def check_origins(self) -> None:
        now = time.monotonic()
        waiting = [s for s in self.agent.snapshots() if s.replica and not s.taken_over
                   and (s.state == STAGED or (s.state == PERSISTED and s.committer))]
        alive: dict[str, bool] = {}
        for s in waiting:
            if s.origin_address not in alive:
                alive[s.origin_address] = self.origin_alive(s.origin_address)
            if alive[s.origin_address]:
                s.origin_lost_since = None
                continue
            if s.origin_lost_since is None:
                s.origin_lost_since = now
            if now - s.origin_lost_since >= self.config.peer_dead_after_s * s.rank_in_ring:
                self.agent.take_over(s)

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()
