"""One node agent per node: the ``ckpt-agent`` daemon run inside a Ray actor pinned to the
node, on a Unix socket in a per-job directory. Workers on the node pass its address to their
Checkpointer; the launcher asks it what it holds when choosing where to restore from.

With ``RunConfig.agent = "unix:///path"`` an agent already runs on every node (the
DaemonSet, a systemd unit); the launcher then only lists it, with a task pinned to the node.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from typing import Any

log = logging.getLogger(__name__)


def agent_actor_name(coordinator_name: str, node: str) -> str:
    """The name of the agent actor of ``node`` in the job whose coordinator is ``coordinator_name``."""
    return f"{coordinator_name.replace('coordinator', 'agent')}-{node[:12]}"


def snapshot_rows(address: str, run_url: str) -> list[dict[str, Any]]:
    """What the agent at ``address`` holds of ``run_url`` (run on the agent's node)."""
    from agent.trainer.client import AgentClient
    from agent.wire import PB_TO_STATE

    with AgentClient(address, timeout_s=10) as c:
        snaps = c.list_snapshots(run_url)
    return [{"writer": s.key.writer, "step": s.key.step, "save_id": s.save_id, "state": PB_TO_STATE[s.state],
             "replica": s.replica, "nbytes": s.nbytes} for s in snaps]


class NodeAgent:
    """Plain class; the launcher wraps it with ``ray.remote`` (threaded: ``wait_stopped``
    blocks while other calls are served)."""

    def __init__(self, job_id: str, memory_bytes: int, coordinator: Any = None, heartbeat_s: float = 1.0,
                 log_level: str = "WARNING", *, replicas: int = 0, token: str | None = None,
                 peer_dead_after_s: float = 3.0) -> None:
        import ray

        from agent.config import LOOPBACK_HOSTS, AgentConfig
        from agent.daemon import AgentDaemon

        self.node = ray.get_runtime_context().get_node_id()
        self.dir = os.path.join(tempfile.gettempdir(), f"ckptrec-{job_id}-{self.node[:8]}")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        logging.getLogger("agent").setLevel(log_level)
        peer: dict[str, Any] = {}
        if replicas:
            # Replicas go to the agents of other nodes over TCP on this node's address, with the
            # job's token; the ring is set by the launcher once it knows every agent.
            ip = ray.util.get_node_ip_address()
            host = f"[{ip}]" if ":" in ip else ip
            peer = {"peer_listen": f"{host}:0", "token": token, "peer_dead_after_s": peer_dead_after_s,
                    "allow_remote_bind": host not in LOOPBACK_HOSTS}
        self.config = AgentConfig(socket_path=os.path.join(self.dir, "agent.sock"), memory_budget_bytes=memory_bytes,
                                  agent_id=f"recovery-{self.node[:8]}", shm_prefix=f"ckrec{job_id}",
                                  log_format="text", log_level=log_level, **peer)
        self.daemon = AgentDaemon(self.config)
        self.daemon.start()
        self.coordinator = coordinator
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeats, args=(heartbeat_s,), name="agent-heartbeat",
                                      daemon=True)
        self._beat.start()

    @property
    def address(self) -> str:
        return f"unix://{self.config.socket_path}"

    def info(self) -> dict[str, Any]:
        return {"node": self.node, "address": self.address, "pid": os.getpid(),
                "peer_address": self.daemon.config.self_address}

    def set_ring(self, peers: list[str], replicas: int) -> None:
        self.daemon.set_ring(peers, replicas)

    def snapshots(self, run_url: str) -> list[dict[str, Any]]:
        return snapshot_rows(self.address, run_url)

    def status(self) -> dict[str, Any]:
        st = self.daemon.status()
        return {"used_bytes": st.used_bytes, "budget_bytes": st.budget_bytes, "snapshots": st.snapshots,
                "sessions": st.sessions, "persist_queue": st.persist_queue, "state": st.state}

    def _heartbeats(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            if self.coordinator is None:
                continue
            try:
                self.coordinator.agent_heartbeat.remote(self.node, self.status())
            except Exception:  # noqa: BLE001 - the coordinator may be restarting
                pass

    def wait_stopped(self) -> None:
        """Returns when the daemon stops; the launcher watches this call to see the agent die."""
        self.daemon.wait()

    def shutdown(self, drain_timeout_s: float = 30.0) -> bool:
        from agent.daemon.segments import cleanup_stale

        self._stop.set()
        drained = self.daemon.drain(drain_timeout_s)
        self.daemon.stop()
        # Segments of this job's agents that died on this host (a killed agent, a lost node of a
        # cluster simulated on one machine): nobody else would remove them.
        cleanup_stale(self.config.shm_dir, self.config.shm_prefix)
        try:
            os.rmdir(self.dir)
        except OSError:
            pass
        return drained
