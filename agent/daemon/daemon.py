"""One running agent: the core, its gRPC servers (Unix socket; TCP for peers), replication,
metrics, and the drain/shutdown sequence."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import stat
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ..config import AgentConfig
from ..documents import MAX_LISTED_SEGMENTS
from ..errors import AgentConfigError
from ..pb import pb, rpc
from .core import Agent
from .metrics import AgentMetrics
from .replication import Replicator
from .segments import cleanup_stale
from .servicers import AdminServicer, PeerServicer, TokenInterceptor, TrainerServicer

log = logging.getLogger(__name__)


def _socket_in_use(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


class AgentDaemon:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.metrics = AgentMetrics()
        self.replicator: Replicator | None = None
        self.agent = Agent(config, metrics=self.metrics)
        if config.peer_listen is not None:
            # Also with no replicas of its own: a restore on this node may fetch from the ring.
            self.replicator = Replicator(config, self.agent)
            self.agent.replicate = self.replicator.replicate
            self.agent.notify_peers = self.replicator.notify
        self._servers: list[grpc.Server] = []
        self._health: list[health.HealthServicer] = []
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self.peer_port: int | None = None
        self.metrics_port: int | None = None
        self._metrics_server: object | None = None

    def _options(self) -> list[tuple[str, int]]:
        return [("grpc.max_send_message_length", self.config.max_message_bytes),
                ("grpc.max_receive_message_length", self.config.max_message_bytes),
                ("grpc.so_reuseport", 0)]

    def start(self) -> None:
        cfg = self.config
        removed = cleanup_stale(cfg.shm_dir, cfg.shm_prefix)
        if removed:
            log.warning("removed shared-memory segments of dead agents", extra={"fields": {"segments": removed}})
        path = cfg.socket_path
        if os.path.exists(path):
            if not stat.S_ISSOCK(os.stat(path).st_mode):
                raise AgentConfigError(f"socket_path {path} exists and is not a socket")
            if _socket_in_use(path):
                raise AgentConfigError(f"another agent is serving on {path}; stop it or choose another socket_path")
            os.unlink(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

        local = grpc.server(ThreadPoolExecutor(max_workers=cfg.max_sessions + 16, thread_name_prefix="agent-rpc"),
                            options=self._options(), maximum_concurrent_rpcs=cfg.max_sessions + 64)
        rpc.add_TrainerServiceServicer_to_server(TrainerServicer(self.agent, peers=lambda: self.replicator), local)
        rpc.add_AdminServiceServicer_to_server(AdminServicer(self), local)
        self._add_health(local)
        local.add_insecure_port(f"unix:{path}")
        old = os.umask(0o777 & ~cfg.socket_mode)  # the socket is born with its final permissions
        try:
            local.start()
        finally:
            os.umask(old)
        os.chmod(path, cfg.socket_mode)
        self._servers.append(local)

        if cfg.peer_listen is not None:
            peer = grpc.server(ThreadPoolExecutor(max_workers=16, thread_name_prefix="agent-peer"),
                               options=self._options(), interceptors=[TokenInterceptor(cfg.token or "")])
            rpc.add_PeerServiceServicer_to_server(PeerServicer(self.agent), peer)
            self._add_health(peer)
            if cfg.tls:
                key = open(cfg.tls_key, "rb").read()
                cert = open(cfg.tls_cert, "rb").read()
                creds = grpc.ssl_server_credentials([(key, cert)])
                self.peer_port = peer.add_secure_port(cfg.peer_listen, creds)
            else:
                self.peer_port = peer.add_insecure_port(cfg.peer_listen)
            peer.start()
            self._servers.append(peer)
            host, port = cfg.peer_listen.rsplit(":", 1)
            if port == "0" and cfg.advertise_address is None:
                # Port 0: the OS chose one; peers dial the port actually bound.
                self._reconfigure(advertise_address=f"{host}:{self.peer_port}")
                cfg = self.config
        if cfg.metrics_listen is not None:
            self._metrics_server, self.metrics_port = self.metrics.serve(cfg.metrics_listen)
        log.info("agent serving", extra={"fields": {
            "agent": cfg.agent_id, "socket": path, "peer_listen": cfg.peer_listen, "peer_port": self.peer_port,
            "metrics_port": self.metrics_port, "budget_bytes": cfg.memory_budget_bytes,
            "replicas": cfg.replicas, "ring": list(cfg.peers)}})

    def _reconfigure(self, **changes: object) -> None:
        new = dataclasses.replace(self.config, **changes)  # validated by AgentConfig.__post_init__
        self.config = new
        self.agent.config = new
        if self.replicator is not None:
            self.replicator.config = new

    def set_ring(self, peers: tuple[str, ...] | list[str], replicas: int) -> None:
        """Change the replication ring while serving (an orchestrator adds and removes nodes):
        ``peers`` is every agent's advertise address in ring order, this agent's among them;
        each snapshot staged from now on is streamed to the next ``replicas`` of them.
        Snapshots already held keep the replicas they have."""
        if self.config.peer_listen is None:
            raise AgentConfigError("set_ring needs peer_listen: this agent does not serve peers")
        with self._stop_lock:
            self._reconfigure(peers=tuple(peers), replicas=int(replicas))
        log.info("replication ring set", extra={"fields": {"ring": list(self.config.peers),
                                                           "replicas": self.config.replicas}})

    def _add_health(self, server: grpc.Server) -> None:
        h = health.HealthServicer()
        h.set("", health_pb2.HealthCheckResponse.SERVING)
        for name in ("ckpt.agent.v1.TrainerService", "ckpt.agent.v1.PeerService"):
            h.set(name, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(h, server)
        self._health.append(h)

    def status(self) -> pb.AgentStatus:
        a = self.agent
        names = a.segments.names()
        return pb.AgentStatus(
            agent_id=self.config.agent_id, state=a.state, budget_bytes=self.config.memory_budget_bytes,
            used_bytes=a.used_bytes(), sessions=a.session_count(), snapshots=len(a.snapshots()),
            persist_queue=a.persist_queue_depth(), socket_path=self.config.socket_path,
            peer_address=self.config.self_address or "", segments=names[:MAX_LISTED_SEGMENTS],
            segments_total=len(names))

    def drain(self, timeout_s: float | None = None, *, shutdown: bool = False) -> bool:
        for h in self._health:
            h.set("ckpt.agent.v1.TrainerService", health_pb2.HealthCheckResponse.NOT_SERVING)
        drained = self.agent.drain(timeout_s or self.config.drain_timeout_s)
        if shutdown:
            # Answer the caller first; stop from another thread.
            threading.Thread(target=self.stop, name="agent-stop", daemon=True).start()
        return drained

    def stop(self, grace_s: float = 2.0) -> None:
        with self._stop_lock:
            if self._stopped.is_set():
                return
            for h in self._health:
                h.enter_graceful_shutdown()
            events = [s.stop(grace_s) for s in self._servers]
            for e in events:
                e.wait(grace_s + 1)
            if self.replicator is not None:
                self.replicator.close()
            self.agent.close()
            if self._metrics_server is not None:
                self._metrics_server.shutdown()  # type: ignore[attr-defined]
            try:
                os.unlink(self.config.socket_path)
            except FileNotFoundError:
                pass
            log.info("agent stopped", extra={"fields": {"agent": self.config.agent_id}})
            self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)
