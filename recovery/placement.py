"""Where the workers go: one placement-group bundle per worker, how many workers the cluster
has room for, and which nodes are lost.

Ray marks a node dead only after its health checks fail (~15 s) and counts its resources
until then; a node found lost here is left out of the room at once, so that a job shrinks
instead of waiting ``placement_timeout_s`` for room that is gone.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Callable
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from . import events as ev
from .config import RunConfig
from .errors import NoRoomError


class Placement:
    """The job's placement group (at most one at a time) and the room around it.

    ``log(kind, message, **fields)`` records an event; ``driver_node`` is never called lost
    (the driver runs on it)."""

    def __init__(self, config: RunConfig, log: Callable[..., Any], *, driver_node: str | None = None) -> None:
        self.config = config
        self._log = log
        self.driver_node = driver_node
        self.lost_nodes: set[str] = set()  # lost, though Ray may not have marked them dead yet
        self.pg: PlacementGroup | None = None
        self.world = 0  # bundles of ``pg`` for the ranks
        self.extra = 0  # bundles of ``pg`` beyond them, for hot spares (``RunConfig.spares``)

    @property
    def bundle(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.config.resources_per_worker.items() if v}

    def fits(self) -> int:
        """How many more bundles the cluster's free resources hold (ignoring how they are
        split across nodes), plus the workers placed now."""
        avail = dict(ray.available_resources())
        bundle = self.bundle
        if not bundle:
            return self.config.num_workers
        for n in ray.nodes():  # lost nodes Ray still counts (it marks them dead after its health checks)
            if n["NodeID"] in self.lost_nodes and n.get("Alive"):
                for k, v in n.get("Resources", {}).items():
                    avail[k] = avail.get(k, 0.0) - v
        free = min(math.floor(max(0.0, avail.get(k, 0.0)) / v + 1e-9) for k, v in bundle.items())
        return free + (self.world + self.extra if self.pg is not None else 0)

    def room_for(self, n: int) -> bool:
        return self.fits() >= n

    def fit(self, want: int, minimum: int) -> int:
        """Place the largest world size in ``minimum..want`` there is room for; raises
        :class:`NoRoomError` if none."""
        cfg = self.config
        # After a node loss, do not wait placement_timeout_s for a size that cannot fit (an
        # autoscaling cluster still gets to add nodes for `want` otherwise).
        n = max(minimum, min(want, self.fits())) if self.lost_nodes else want
        if n < want:
            self._log(ev.RESIZED, f"room for {n} of {want} workers", wanted=want)
        tried: set[int] = set()
        while n >= minimum:
            tried.add(n)
            # Hot spares where there is room beyond the ranks (never at the cost of a rank).
            extra = min(cfg.spares, max(0, self.fits() - n)) if cfg.spares else 0
            for more in dict.fromkeys((extra, 0)):
                pg = placement_group([self.bundle] * (n + more), strategy=cfg.placement_strategy)
                ready, _ = ray.wait([pg.ready()], timeout=cfg.placement_timeout_s)
                if ready:
                    self.pg, self.world, self.extra = pg, n, more
                    return n
                remove_placement_group(pg)
            fits = min(n - 1, self.fits())
            self._log(ev.RESIZED, f"no room for {n} workers after {cfg.placement_timeout_s:g} s; "
                      f"trying {max(fits, minimum)}", wanted=n)
            n = max(fits, minimum) if fits < n - 1 else n - 1
            if n in tried:
                break
        raise NoRoomError(f"the cluster has no room for even {minimum} workers "
                          f"({self.bundle} each); add nodes or lower min_workers")

    def ensure(self, world_size: int) -> None:
        """A placement group of exactly ``world_size`` bundles (the one reserved, or a new one)."""
        if self.pg is None or self.world != world_size:
            self.release()
            self.fit(world_size, world_size)

    def placed_bundles(self) -> set[int]:
        """The placement group's bundles that lie on a live node now (Ray places a lost node's
        bundles again where room returns)."""
        if self.pg is None:
            return set()
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")} - self.lost_nodes
        table = placement_group_table(self.pg)
        return {int(b) for b, node in table.get("bundles_to_node_id", {}).items() if node in alive}

    def release(self) -> None:
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg, self.extra = None, 0

    def worker_options(self, index: int) -> dict[str, Any]:
        """Ray actor options of the worker in bundle ``index``."""
        res = self.bundle
        opts: dict[str, Any] = {"num_cpus": res.get("CPU", 0), "num_gpus": res.get("GPU", 0), "max_restarts": 0,
                                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                                    self.pg, placement_group_bundle_index=index)}
        custom = {k: v for k, v in res.items() if k not in ("CPU", "GPU")}
        if custom:
            opts["resources"] = custom
        return opts

    def node_lost(self, node: str, timeout_s: float = 1.0) -> bool:
        """Whether ``node`` is gone, not just one process on it: Ray's control store says so, or
        the node's raylet does not answer a TCP connection (Ray itself marks a node dead only
        after its health checks fail for ~15 s). Never the driver's own node: the driver runs."""
        if node == self.driver_node:
            return False
        for n in ray.nodes():
            if n["NodeID"] != node:
                continue
            if not n.get("Alive", True):
                self.lost_nodes.add(node)
                return True
            try:
                socket.create_connection((n["NodeManagerAddress"], int(n["NodeManagerPort"])),
                                         timeout=timeout_s).close()
                return False
            except OSError:
                self.lost_nodes.add(node)
                return True
        return False
