"""The agent fleet: one node agent per node (:class:`~recovery.node_agent.NodeAgent`, the
``ckpt-agent`` daemon in a Ray actor pinned to the node), and the driver's side of them
(:class:`AgentFleet`): start one where a worker lands, watch it die, keep the replication
ring, list what they hold. Workers on a node pass its agent's address
to their Checkpointer; the launcher asks the fleet what the agents hold when choosing where
to restore from.

With ``RunConfig.agent = "unix:///path"`` an agent already runs on every node (the
DaemonSet, a systemd unit); the fleet then only lists it, with a task pinned to the node.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from . import events as ev
from .config import RunConfig
from .errors import first_line
from .node_agent import NodeAgent, agent_actor_name, remove_socket_dirs, snapshot_rows
from .restore import holders_of, of_the_save

log = logging.getLogger(__name__)


# Node agents per relay group: one call into the coordinator per group and interval.
RELAY_GROUP = 32
# How long a node agent may take to start (its actor placed, its servers listening).
AGENT_START_TIMEOUT_S = 120.0


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
        self._node_workers: dict[str, Any] = {}  # agents outside the job: node -> the worker told of commits
        self._starting: dict[str, tuple[Any, Any, float]] = {}  # node -> (agent actor, its info() ref, since)

    def relay_for(self, node: str) -> Any:
        """The agent actor of ``node`` (it relays its ranks' calls to the coordinator), or None."""
        return self.agents.get(node)

    def address_for(self, node: str) -> str | None:
        """The address a worker on ``node`` gives its Checkpointer (None: persist in-process)."""
        return self.address.get(node) if self.config.agent == "actor" else self.config.agent

    def ensure(self, nodes: set[str]) -> None:
        """An agent actor on each of ``nodes`` (with ``agent="actor"``; else nothing to start),
        up when this returns (one already starting is waited for); raises what its start raised."""
        self.start(nodes)
        for node in sorted(nodes & set(self._starting)):
            actor, info, _ = self._starting[node]
            try:
                ray.get(info, timeout=AGENT_START_TIMEOUT_S)
            except (RayError, GetTimeoutError):
                del self._starting[node]
                _kill(actor)
                raise
        self.settle()

    def start(self, nodes: set[str]) -> None:
        """Start an agent actor on each of ``nodes`` that has none and starts none, without waiting
        for it (:meth:`settle` registers it once up): the driver's loop is not held up by a start
        (~1.4 s), e.g. beside a hot spare that boots."""
        if self.config.agent != "actor" or not (nodes := nodes - set(self.agents) - set(self._starting)):
            return
        remote = ray.remote(NodeAgent)
        detect = self.config.detect
        relay_s = detect.relay_interval(len(set(self.agents) | set(self._starting) | nodes), RELAY_GROUP)
        if 4 * relay_s > min(detect.hang_timeout_s, detect.agent_timeout_s):  # relay_interval_s set by hand
            log.warning("node agents relay heartbeats every %.1f s in two hops: hang_timeout_s (%g) and "
                        "agent_timeout_s (%g) should be at least four times that", relay_s, detect.hang_timeout_s,
                        detect.agent_timeout_s)
        for node in sorted(nodes):
            actor = remote.options(
                name=agent_actor_name(self.coordinator_name, node), num_cpus=0, max_concurrency=8, max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            ).remote(self.job_id, self.config.agent_memory_bytes, self.coordinator, relay_s,
                     replicas=self.config.agent_replicas, token=self._token)
            self._starting[node] = (actor, actor.info.remote(), time.monotonic())

    @property
    def starting(self) -> set[str]:
        """The nodes whose agent is starting (:meth:`start`), not up yet."""
        return set(self._starting)

    def settle(self) -> None:
        """Register the agents started (:meth:`start`) that are up now; one whose start failed, or
        took over ``AGENT_START_TIMEOUT_S``, is killed and dropped with an ``agent`` event (the next
        :meth:`ensure` for its node starts another and reports the error). Waits for none."""
        if not self._starting:
            return
        infos = {info: node for node, (_, info, _) in self._starting.items()}
        done, _ = ray.wait(list(infos), num_returns=len(infos), timeout=0)
        late = {n for n, (_, _, since) in self._starting.items() if time.monotonic() - since > AGENT_START_TIMEOUT_S}
        new = False
        for node in sorted({infos[r] for r in done} | late):
            actor, ref, _ = self._starting.pop(node)
            try:
                info = ray.get(ref, timeout=0)
            except (RayError, GetTimeoutError) as e:
                self._log(ev.AGENT, f"the agent on node {node[:12]} did not start ({first_line(e)}): the next start "
                          "of workers there starts another", node=node)
                _kill(actor)
                continue
            self._up(node, actor, info)
            new = True
        if new:
            self._update_ring()
            self._update_relay()
            self.tell_coordinator()

    def _up(self, node: str, actor: Any, info: dict[str, Any]) -> None:
        self.agents[node] = actor
        self.address[node] = info["address"]
        if info.get("peer_address"):
            self.peer[node] = info["peer_address"]
        self.watch[actor.wait_stopped.remote()] = node
        self._log(ev.AGENT, f"agent up on node {node[:12]} at {info['address']}"
                  + (f", replicas served on {info['peer_address']}" if info.get("peer_address") else ""),
                  node=node, address=info["address"], peer_address=info.get("peer_address"))

    def tell_coordinator(self) -> None:
        """The coordinator learns whom it tells of each commit (after a change, or its restart):
        the agent actors, or, with agents run outside the job (``RunConfig.agent`` an address),
        one worker per node, which tells its node's agent (``Worker.committed``)."""
        if self.coordinator is None or self.config.agent is None:
            return
        told = dict(self.agents) if self.config.agent == "actor" else dict(self._node_workers)
        try:
            self.coordinator.set_agents.remote(told)
        except Exception:  # the agents then poll storage for each commit
            log.debug("cannot tell the coordinator whom to tell of commits", exc_info=True)

    def tell_workers(self, workers: list[Any], nodes: list[str]) -> None:
        """The workers of an attempt started (``nodes``: each one's node): with agents run
        outside the job, the first worker of each node is the one told of commits."""
        if self.config.agent in (None, "actor"):
            return
        self._node_workers = {}
        for worker, node in zip(workers, nodes):
            self._node_workers.setdefault(node, worker)
        self.tell_coordinator()

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
        if (starting := self._starting.pop(node, None)) is not None:
            _kill(starting[0])
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
            except Exception:
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

    def held(self, step: int, save_id: str, writers: list[str], rows: list[dict[str, Any]],
             timeout_s: float = 5.0) -> tuple[set[tuple[str, bool]], dict[str, tuple[str, ...]] | None]:
        """``(writer, replica)`` of the snapshots of ``step`` from ``save_id`` (the save that
        committed it) the agents hold, and the directory of who holds them (:func:`holders_of`;
        None for agents outside the job, whose ring the fleet does not know). A snapshot counts
        whether or not its agent has heard of the commit yet (:func:`of_the_save`); a writer held
        by none is looked for again for up to ``timeout_s`` (a replica still on its way)."""
        deadline = time.monotonic() + timeout_s
        while True:
            held = {(r["writer"], r["replica"]) for r in rows if of_the_save(r, step, save_id)}
            if {w for w, _ in held} >= set(writers) or time.monotonic() > deadline or not self.agents:
                return held, holders_of(step, rows, self.peer, save_id) if self.config.agent == "actor" else None
            time.sleep(0.2)
            rows = self.rows()

    def shutdown(self) -> None:
        starting = []  # (shut down as the others once up: it may hold its segments and sockets by then)
        for actor, info, _ in self._starting.values():
            try:
                ray.get(info, timeout=30)
                starting.append(actor)
            except (RayError, GetTimeoutError):
                _kill(actor)
        self._starting.clear()
        for a in list(self.agents.values()) + starting:
            try:
                ray.get(a.shutdown.remote(), timeout=60)
            except (RayError, GetTimeoutError):
                pass
            _kill(a)
        self.agents.clear()
        self.peer.clear()
        self.watch.clear()
        remove_socket_dirs(self.job_id)


def _kill(actor: Any) -> None:
    with contextlib.suppress(Exception):  # gone already
        ray.kill(actor, no_restart=True)
