"""Where the workers go: one placement-group bundle per worker, how many workers the cluster
has room for, and which nodes are lost.

Ray marks a node dead only after its health checks fail (~15 s) and counts its resources
until then; a node found lost here is left out of the room at once, so that a job shrinks
instead of waiting ``placement_timeout_s`` for room that is gone.

A job that shrank (a reload onto fewer bundles, or room that was never there) grows back in
place through a second placement group reserved for the new ranks beside the survivors' group
(:meth:`Placement.reserve`): removing the first group would kill the survivors. Bundles are
numbered across the groups: the first group's ``0..size-1``, then each later group's in turn.
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from . import events as ev
from .config import RunConfig
from .errors import NoRoomError


class Placement:
    """The job's placement group, the groups reserved later for new ranks, and the room around them.

    ``log(kind, message, **fields)`` records an event; ``driver_node`` is never called lost
    (the driver runs on it)."""

    def __init__(self, config: RunConfig, log: Callable[..., Any], *, driver_node: str | None = None) -> None:
        self.config = config
        self._log = log
        self.driver_node = driver_node
        self.lost_nodes: set[str] = set()  # lost, though Ray may not have marked them dead yet
        self.pg: PlacementGroup | None = None
        self.size = 0  # bundles of ``pg``
        self.world = 0  # bundles for the ranks
        self.extra = 0  # bundles of ``pg`` beyond them, for hot spares (``RunConfig.spares``)
        self.more: list[tuple[int, PlacementGroup, int]] = []  # (first bundle's number, group, bundles) grown into
        self._pending: tuple[PlacementGroup, int, float] | None = None  # being placed: group, bundles, since
        self._refused_at: tuple[int, float] | None = None  # free bundles and time when a reservation was given up

    @property
    def bundle(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.config.resources_per_worker.items() if v}

    def free(self) -> int:
        """How many more bundles the cluster's free resources hold (ignoring how they are split
        across nodes)."""
        avail = dict(ray.available_resources())
        bundle = self.bundle
        if not bundle:
            return self.config.num_workers
        for n in ray.nodes():  # lost nodes Ray still counts (it marks them dead after its health checks)
            if n["NodeID"] in self.lost_nodes and n.get("Alive"):
                for k, v in n.get("Resources", {}).items():
                    avail[k] = avail.get(k, 0.0) - v
        return min(math.floor(max(0.0, avail.get(k, 0.0)) / v + 1e-9) for k, v in bundle.items())

    def fits(self) -> int:
        """:meth:`free`, plus the workers placed now."""
        return self.free() + (self.world + self.extra if self.pg is not None else 0)

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
                    self.pg, self.size, self.world, self.extra = pg, n + more, n, more
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

    def bundle_count(self) -> int:
        """The bundles of every group the job holds (numbered ``0..bundle_count()-1``)."""
        return self.size + sum(n for _, _, n in self.more)

    def placed_bundles(self) -> set[int]:
        """The bundles, of every group, that lie on a live node now (Ray places a lost node's
        bundles again where room returns)."""
        return set(self.bundle_nodes())

    def nodes_of(self, bundles: set[int]) -> set[str]:
        """The live nodes that ``bundles`` (numbered across the groups) are placed on."""
        return {node for b, node in self.bundle_nodes().items() if b in bundles} if bundles else set()

    def bundle_nodes(self) -> dict[int, str]:
        """Bundle (numbered across the groups) -> the live node it is placed on, for those placed."""
        if self.pg is None:
            return {}
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")} - self.lost_nodes
        out: dict[int, str] = {}
        for first, pg, _ in [(0, self.pg, self.size), *self.more]:
            table = placement_group_table(pg)
            out |= {first + int(b): node for b, node in table.get("bundles_to_node_id", {}).items() if node in alive}
        return out

    @property
    def reserving(self) -> bool:
        """Whether a group for new ranks is being placed (:meth:`reserve`)."""
        return self._pending is not None

    def refused(self) -> bool:
        """Whether a reservation was given up and the cluster's free room has not grown since
        (for up to 10 x ``placement_timeout_s``, room may move between nodes): a group of all the
        ranks would not be placed either (it needs the same room beyond the nodes the workers
        hold), so the job waits for more room instead of restarting."""
        if self._refused_at is None:
            return False
        free, when = self._refused_at
        return time.monotonic() - when < 10 * self.config.placement_timeout_s and self.free() <= free

    def reserve(self, n: int) -> bool:
        """Whether a group of ``n`` more bundles, for new ranks beside the job's, is placed now.
        The first call asks Ray for it and waits a moment; later calls only look (the driver's
        loop is not held up), and ``placement_timeout_s`` after the request it is given up
        (False, :attr:`reserving` False) so that the job can grow another way."""
        if self.pg is None or n <= 0:
            return n <= 0
        if self._pending is None:
            pg = placement_group([self.bundle] * n, strategy=self.config.placement_strategy)
            self._pending = (pg, n, time.monotonic())
            wait = min(1.0, self.config.placement_timeout_s)
        else:
            wait = 0.0
        pg, m, since = self._pending
        ready, _ = ray.wait([pg.ready()], timeout=wait)
        if ready:
            self.more.append((self.bundle_count(), pg, m))
            self._pending, self._refused_at = None, None
            self._log(ev.RESIZED, f"reserved {m} more bundle(s) for new ranks in a group of their own, "
                      f"bundles {self.bundle_count() - m}..{self.bundle_count() - 1}", reserved=m)
            return True
        if time.monotonic() - since >= self.config.placement_timeout_s:
            remove_placement_group(pg)
            self._pending = None
            self._refused_at = (self.free(), time.monotonic())
            self._log(ev.RESIZED, f"no room for {m} more bundle(s) after placement_timeout_s="
                      f"{self.config.placement_timeout_s:g} s: given up until the cluster has more room", wanted=m)
        return False

    def release(self) -> None:
        pending = [self._pending[0]] if self._pending is not None else []
        for pg in [*pending, *(g for _, g, _ in self.more), *([self.pg] if self.pg is not None else [])]:
            remove_placement_group(pg)
        self.pg, self.size, self.extra, self.more, self._pending, self._refused_at = None, 0, 0, [], None, None

    def _locate(self, index: int) -> tuple[PlacementGroup | None, int]:
        for first, pg, n in self.more:
            if first <= index < first + n:
                return pg, index - first
        return self.pg, index

    def worker_options(self, index: int) -> dict[str, Any]:
        """Ray actor options of the worker in bundle ``index`` (numbered across the groups)."""
        res = self.bundle
        pg, local = self._locate(index)
        opts: dict[str, Any] = {"num_cpus": res.get("CPU", 0), "num_gpus": res.get("GPU", 0), "max_restarts": 0,
                                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                                    pg, placement_group_bundle_index=local)}
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
