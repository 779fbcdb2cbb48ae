"""A node agent (:class:`NodeAgent`): the ``ckpt-agent`` daemon run inside a Ray actor pinned to
its node, on a Unix socket in a per-job directory. It relays its node's ranks' heartbeats and
checkpoint events to the coordinator and learns of commits from it. The driver's side of the
agents is :mod:`recovery.fleet`.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import tempfile
import threading
import time
from typing import Any

import ray

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


def socket_dir(job_id: str, node: str) -> str:
    return os.path.join(tempfile.gettempdir(), f"ckptrec-{job_id}-{node[:8]}")


def remove_socket_dirs(job_id: str) -> None:
    """The socket directories this job's agents left on this host (a killed agent leaves its
    socket behind); called once every agent of the job is stopped."""
    for d in glob.glob(socket_dir(job_id, "*")):
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(d, "agent.sock"))
        with contextlib.suppress(OSError):
            os.rmdir(d)




class NodeAgent:
    """Plain class; :class:`AgentFleet` wraps it with ``ray.remote`` (threaded: ``wait_stopped``
    blocks while other calls are served)."""

    def __init__(self, job_id: str, memory_bytes: int, coordinator: Any = None, relay_s: float = 0.25,
                 log_level: str = "WARNING", *, replicas: int = 0, token: str | None = None,
                 peer_dead_after_s: float = 3.0) -> None:
        from agent.config import LOOPBACK_HOSTS, AgentConfig
        from agent.daemon import AgentDaemon

        self.node = ray.get_runtime_context().get_node_id()
        self.dir = socket_dir(job_id, self.node)
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        logging.getLogger("agent").setLevel(log_level)
        peer: dict[str, Any] = {}
        if replicas:
            # Replicas go to the agents of other nodes over TCP on this node's address, with the
            # job's token; the ring is set by the fleet once it knows every agent.
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
        self._relay: list[tuple[str, tuple]] = []  # checkpoint events of this node's ranks
        self._beats: dict[tuple, tuple] = {}  # (attempt, rank) -> its latest heartbeat's arguments
        self._relay_lock = threading.Lock()
        self._relay_s = relay_s
        self._upstream: Any = None  # the leader agent of this relay group; None: the coordinator
        self._forwarded: list[tuple[str, dict[str, Any] | None, list[tuple[str, tuple]]]] = []
        self._urgent = False  # a forwarded batch holds checkpoint events
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeats, name="agent-relay", daemon=True)
        self._beat.start()

    @property
    def address(self) -> str:
        return f"unix://{self.config.socket_path}"

    def info(self) -> dict[str, Any]:
        return {"node": self.node, "address": self.address, "pid": os.getpid(),
                "peer_address": self.daemon.config.self_address}

    def set_ring(self, peers: list[str], replicas: int) -> None:
        self.daemon.set_ring(peers, replicas)

    def committed(self, run_url: str, step: int, save_id: str) -> None:
        """The coordinator committed ``step``: this node's writers waiting for it read it now."""
        self.daemon.agent.notice_commit(run_url, step, save_id)

    def snapshots(self, run_url: str) -> list[dict[str, Any]]:
        return snapshot_rows(self.address, run_url)

    def status(self) -> dict[str, Any]:
        st = self.daemon.status()
        return {"used_bytes": st.used_bytes, "budget_bytes": st.budget_bytes, "snapshots": st.snapshots,
                "sessions": st.sessions, "persist_queue": st.persist_queue, "state": st.state}

    def relay(self, method: str, args: tuple) -> None:
        """A call of one of this node's ranks to the coordinator, sent on with the others in the
        next batch (a rank's heartbeats: only its latest)."""
        with self._relay_lock:
            if method == "heartbeat":
                self._beats[(args[0], args[1])] = args
            else:
                self._relay.append((method, args))

    def set_upstream(self, leader: Any) -> None:
        """Where this agent sends its node's batch: the leader agent of its relay group, or None
        (this agent leads its group: it sends its group's batches to the coordinator)."""
        with self._relay_lock:
            self._upstream = leader

    def forward(self, batches: list[tuple[str, dict[str, Any] | None, list[tuple[str, tuple]]]]) -> None:
        """The batches of this group's other agents, sent on with this agent's next one."""
        with self._relay_lock:
            self._forwarded.extend(batches)
            self._urgent = self._urgent or any(m != "heartbeat" for _n, _s, calls in batches for m, _a in calls)

    # Checkpoint events wait at most this long for others of the node to join them.
    EVENT_DELAY_S = 0.05

    def _heartbeats(self) -> None:
        """One call per relay interval with the latest heartbeat of each rank and this agent's
        status, to the group's leader agent or, from the leader, to the coordinator with the
        group's batches; checkpoint events within EVENT_DELAY_S, with what else is due."""
        last = 0.0
        while not self._stop.wait(self.EVENT_DELAY_S):
            if self.coordinator is None:
                continue
            now = time.monotonic()
            due = now - last >= self._relay_s
            with self._relay_lock:
                if not due and not self._relay and not self._urgent:
                    continue
            if due:
                last = now
            try:
                self._send(status=due)
            except Exception:  # noqa: BLE001 - the coordinator may be restarting: these are lost
                pass

    def _send(self, *, status: bool) -> Any:
        """Send what is pending, with this agent's status if asked; the call's reference."""
        with self._relay_lock:
            calls = [("heartbeat", a) for a in self._beats.values()] + self._relay
            self._beats, self._relay = {}, []
            forwarded, self._forwarded, self._urgent = self._forwarded, [], False
            upstream = self._upstream
        batches = [(self.node, self.status() if status else None, calls), *forwarded]
        if upstream is not None:
            return upstream.forward.remote(batches)
        return self.coordinator.relayed_many.remote(batches)

    def flush(self) -> None:
        """Send what is pending now and return once it arrived (at the group's leader, or applied
        by the coordinator): what the job's ranks reported before is then known."""
        if self.coordinator is not None:
            ray.get(self._send(status=False), timeout=30)

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
