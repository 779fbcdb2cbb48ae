"""The agent fleet: one node agent per node, the ``ckpt-agent`` daemon run inside a Ray actor
pinned to the node (:class:`NodeAgent`), on a Unix socket in a per-job directory, and the
driver's side of them (:class:`AgentFleet`): start one where a worker lands, watch it die,
keep the replication ring, list what they hold. Workers on a node pass its agent's address
to their Checkpointer; the launcher asks the fleet what the agents hold when choosing where
to restore from.

With ``RunConfig.agent = "unix:///path"`` an agent already runs on every node (the
DaemonSet, a systemd unit); the fleet then only lists it, with a task pinned to the node.
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from . import events as ev
from .config import RunConfig
from .errors import first_line

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


# Node agents per relay group: one call into the coordinator per group and interval.
RELAY_GROUP = 32


class NodeAgent:
    """Plain class; :class:`AgentFleet` wraps it with ``ray.remote`` (threaded: ``wait_stopped``
    blocks while other calls are served)."""

    def __init__(self, job_id: str, memory_bytes: int, coordinator: Any = None, relay_s: float = 0.25,
                 log_level: str = "WARNING", *, replicas: int = 0, token: str | None = None,
                 peer_dead_after_s: float = 3.0) -> None:
        from agent.config import LOOPBACK_HOSTS, AgentConfig
        from agent.daemon import AgentDaemon

        self.node = ray.get_runtime_context().get_node_id()
        self.dir = os.path.join(tempfile.gettempdir(), f"ckptrec-{job_id}-{self.node[:8]}")
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


class AgentFleet:
    """The driver's side of the node agents of one job.

    ``coordinator`` (set once the coordinator runs) is handed to each new agent for its
    heartbeats and told when an agent is forgotten; ``log(kind, message, **fields)`` records
    an event."""

    def __init__(self, config: RunConfig, job_id: str, coordinator_name: str, run_url: str,
                 log: Callable[..., Any]) -> None:
        self.config = config
        self.job_id = job_id
        self.coordinator_name = coordinator_name
        self.run_url = run_url
        self.coordinator: Any = None
        self._log = log
        self.agents: dict[str, Any] = {}  # node -> agent actor
        self.address: dict[str, str] = {}
        self.peer: dict[str, str] = {}  # node -> the agent's replication address
        self.watch: dict[Any, str] = {}  # wait_stopped ref -> node
        self._token = secrets.token_urlsafe(24)  # between this job's agents

    def relay_for(self, node: str) -> Any:
        """The agent actor of ``node`` (it relays its ranks' calls to the coordinator), or None."""
        return self.agents.get(node)

    def address_for(self, node: str) -> str | None:
        """The address a worker on ``node`` gives its Checkpointer (None: persist in-process)."""
        return self.address.get(node) if self.config.agent == "actor" else self.config.agent

    def ensure(self, nodes: set[str]) -> None:
        """An agent actor on each of ``nodes`` (with ``agent="actor"``; else nothing to start)."""
        if self.config.agent != "actor":
            return
        remote = ray.remote(NodeAgent)
        detect = self.config.detect
        relay_s = detect.relay_interval(len(set(self.agents) | nodes), RELAY_GROUP)
        if 4 * relay_s > min(detect.hang_timeout_s, detect.agent_timeout_s):  # relay_interval_s set by hand
            log.warning("node agents relay heartbeats every %.1f s in two hops: hang_timeout_s (%g) and "
                        "agent_timeout_s (%g) should be at least four times that", relay_s, detect.hang_timeout_s,
                        detect.agent_timeout_s)
        new = {}
        for node in nodes - set(self.agents):
            new[node] = remote.options(
                name=agent_actor_name(self.coordinator_name, node), num_cpus=0, max_concurrency=8, max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            ).remote(self.job_id, self.config.agent_memory_bytes, self.coordinator, relay_s,
                     replicas=self.config.agent_replicas, token=self._token)
        for node, actor in new.items():
            info = ray.get(actor.info.remote(), timeout=120)
            self.agents[node] = actor
            self.address[node] = info["address"]
            if info.get("peer_address"):
                self.peer[node] = info["peer_address"]
            self.watch[actor.wait_stopped.remote()] = node
            self._log(ev.AGENT, f"agent up on node {node[:12]} at {info['address']}"
                      + (f", replicas served on {info['peer_address']}" if info.get("peer_address") else ""),
                      node=node, address=info["address"], peer_address=info.get("peer_address"))
        if new:
            self._update_ring()
            self._update_relay()
            self.tell_coordinator()

    def tell_coordinator(self) -> None:
        """The coordinator learns the agents it tells of each commit (after a change, or its restart)."""
        if self.coordinator is not None and self.config.agent == "actor":
            try:
                self.coordinator.set_agents.remote(dict(self.agents))
            except Exception:  # noqa: BLE001 - the agents then find the commits by polling storage
                log.debug("cannot tell the coordinator about the agents", exc_info=True)

    def stopped(self, ref: Any) -> str | None:
        """The node whose agent's ``wait_stopped`` call ``ref`` is (that agent is forgotten);
        None if ``ref`` is not one."""
        node = self.watch.pop(ref, None)
        if node is not None:
            self.forget(node)
        return node

    def drop_node(self, node: str) -> None:
        """Forget a lost node's agent (its death is part of the node's failure, not another one)."""
        for ref, n in list(self.watch.items()):
            if n == node:
                del self.watch[ref]
        self.forget(node)

    def forget(self, node: str) -> None:
        self.agents.pop(node, None)
        self.address.pop(node, None)
        try:  # else its silence is reported again after agent_timeout_s (a lost node's agent never returns)
            self.coordinator.forget_agent.remote(node)
        except Exception:  # noqa: BLE001 - a coordinator restarting rebuilds from heartbeats anyway
            pass
        if self.peer.pop(node, None) is not None:
            self._update_ring()
        self._update_relay()
        self.tell_coordinator()

    def flush(self) -> None:
        """Every agent's pending relay calls delivered (the members' to their leaders first, then
        the leaders' to the coordinator), so that the coordinator knows what the ranks reported."""
        nodes = sorted(self.agents)
        for leaders in (False, True):
            refs = {self.agents[n].flush.remote(): n for i, n in enumerate(nodes) if (i % RELAY_GROUP == 0) == leaders}
            for ref, n in refs.items():
                try:
                    ray.get(ref, timeout=60)
                except (RayError, GetTimeoutError) as e:
                    log.debug("cannot flush the relay of the agent on node %s: %s", n[:12], first_line(e))

    def _update_relay(self) -> None:
        """Relay groups of RELAY_GROUP agents (nodes in a fixed order): the first of each sends
        its group's batches to the coordinator, the others send theirs to it. Called whenever an
        agent comes or goes (a lost leader's group is led by the next agent at once)."""
        nodes = sorted(self.agents)
        for i, node in enumerate(nodes):
            leader = nodes[i - i % RELAY_GROUP]
            try:
                self.agents[node].set_upstream.remote(None if leader == node else self.agents[leader])
            except Exception:  # noqa: BLE001 - a dying agent: the next update leaves it out
                log.debug("cannot set the relay upstream of node %s", node[:12], exc_info=True)

    def _update_ring(self) -> None:
        """Every live agent replicates to the next ``agent_replicas`` agents of the ring (nodes in
        a fixed order); called whenever an agent comes or goes."""
        want = self.config.agent_replicas
        if not want:
            return
        nodes = sorted(n for n in self.peer if n in self.agents)
        ring = [self.peer[n] for n in nodes]
        k = min(want, len(ring) - 1)
        refs = {self.agents[n].set_ring.remote(ring, k): n for n in nodes}
        for ref, n in refs.items():
            try:
                ray.get(ref, timeout=30)
            except (RayError, GetTimeoutError) as e:
                self._log(ev.AGENT, f"cannot set the replication ring of the agent on node {n[:12]}: {first_line(e)}",
                          node=n)
        if len(nodes) > 1 or k < want:
            self._log(ev.AGENT, f"replication ring: {len(ring)} agent(s), {k} replica(s) of each snapshot"
                      + (f" (wanted {want}: not enough nodes)" if k < want else ""), ring=ring, replicas=k)

    def rows(self) -> list[dict[str, Any]]:
        """What every agent holds of the run: one row per snapshot, with its ``node``."""
        rows: list[dict[str, Any]] = []
        if self.config.agent == "actor":
            refs = {node: a.snapshots.remote(self.run_url) for node, a in self.agents.items()}
        elif self.config.agent is not None:
            task = ray.remote(num_cpus=0)(snapshot_rows)
            refs = {n["NodeID"]: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
                n["NodeID"], soft=False)).remote(self.config.agent, self.run_url)
                for n in ray.nodes() if n.get("Alive")}
        else:
            return rows
        for node, ref in refs.items():
            try:
                for r in ray.get(ref, timeout=30):
                    rows.append(dict(r, node=node))
            except (RayError, GetTimeoutError) as e:
                self._log(ev.AGENT, f"cannot list the snapshots of the agent on node {node[:12]}: {first_line(e)}",
                          node=node)
        return rows

    def settled_rows(self, timeout_s: float) -> list[dict[str, Any]]:
        """:meth:`rows` once no agent holds a staged snapshot any more (they persist what the
        workers staged before they died), or after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        rows = self.rows()
        while any(r["state"] == "staged" for r in rows) and time.monotonic() < deadline:
            time.sleep(0.1)
            rows = self.rows()
        return rows

    def held(self, step: int, writers: list[str], rows: list[dict[str, Any]],
             timeout_s: float = 5.0) -> set[tuple[str, bool]]:
        """``(writer, replica)`` of the committed snapshots of ``step`` the agents hold. The
        agents learn of a commit by polling storage: they are given up to ``timeout_s`` to see
        it, so that the restore is served from their memory."""
        deadline = time.monotonic() + timeout_s
        while True:
            held = {(r["writer"], r["replica"]) for r in rows if r["step"] == step and r["state"] == "committed"}
            if {w for w, _ in held} >= set(writers) or time.monotonic() > deadline or not self.agents:
                return held
            time.sleep(0.2)
            rows = self.rows()

    def shutdown(self) -> None:
        for a in list(self.agents.values()):
            try:
                ray.get(a.shutdown.remote(), timeout=60)
            except (RayError, GetTimeoutError):
                pass
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        self.agents.clear()
        self.peer.clear()
        self.watch.clear()
