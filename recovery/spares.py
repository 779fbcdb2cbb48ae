"""Hot spares and warm standbys.

Hot spare workers: worker processes booted ahead (Python, torch and the job's modules imported,
``train_fn`` loaded) that wait in placement-group bundles no rank uses, and replace a lost rank
at once instead of a process that must boot first (seconds on a loaded node: most of a restart
in place). ``RunConfig.spares`` says how many a job keeps; each holds a worker's resources.

A spare taken is replaced by a new one in a free bundle (the lost rank's, where its node lives
on) once the attempt it joined has trained a step, so that its boot does not compete with the
recovery it would slow down. Spares live in the job's placement group: a new group (a resize,
a restart of everything) drops them, and they are booted again in the new one.

Warm standbys (:class:`Standbys`, ``RunConfig.standby``) are booted the same way but hold no
resources: one per node (by default), replacing a process that died on a node that lives on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Spare:
    actor: Any
    bundle: int
    ready: Any  # the ref of its ``warm`` call: its node info once booted
    booted_at: float
    node: str | None = None  # once it answered
    pid: int | None = None


class Spares:
    """The job's spare workers. ``boot(bundle)`` makes a worker actor in that bundle of the
    current placement group; ``kill(actor)`` ends one."""

    def __init__(self, count: int, boot: Callable[[int], Any], kill: Callable[[Any], None],
                 warm: Callable[[Any], Any]) -> None:
        self.count = count
        self.base = count  # the job's own; ``count`` is more while new ranks boot ahead (:meth:`boot_ahead`)
        self.ahead_since: float | None = None
        self._boot, self._kill, self._warm = boot, kill, warm
        self._pg: Any = None  # the placement group the spares were booted in
        self.idle: dict[int, Spare] = {}  # bundle -> spare
        self.taken = 0
        self.boot_s: list[float] = []  # how long the spares took to boot, as seen

    def boot_ahead(self, n: int) -> None:
        """Keep ``n`` more spares than the job's own, for new ranks (growing back): booted by the
        next :meth:`tend` in free bundles, taken by the ranks once they are up."""
        self.count, self.ahead_since = self.base + n, time.monotonic()

    def stop_ahead(self) -> None:
        """Back to the job's own count; spares beyond it that are still booting are ended (their
        bundles are the new ranks')."""
        self.count, self.ahead_since = self.base, None
        for bundle, spare in sorted(self.idle.items(), key=lambda item: item[1].node is not None):
            if len(self.idle) <= self.count or spare.node is not None:
                break
            self._kill(self.idle.pop(bundle).actor)

    def ready(self) -> int:
        """The spares booted and answering."""
        return sum(1 for sp in self.idle.values() if sp.node is not None)

    def sync(self, pg: Any) -> None:
        """Forget the spares of a placement group that is gone (removing it killed them)."""
        if pg is not self._pg:
            self.drop()
            if self._pg is not None:  # (new ranks booting ahead in the group that is gone: none now)
                self.count, self.ahead_since = self.base, None
            self._pg = pg

    def tend(self, pg: Any, free: Iterable[int]) -> list[int]:
        """Boot spares in ``free`` bundles of ``pg`` until there are ``count``; the bundles booted."""
        self.sync(pg)
        if pg is None:
            return []
        booted = []
        for bundle in free:
            if len(self.idle) >= self.count:
                break
            if bundle in self.idle:
                continue
            try:
                actor = self._boot(bundle)
                self.idle[bundle] = Spare(actor, bundle, self._warm(actor), time.monotonic())
                booted.append(bundle)
            except Exception:  # a spare is an optimisation: the job goes on without it
                log.warning("booting a spare worker in bundle %d failed", bundle, exc_info=True)
        return booted

    def newly_ready(self) -> list[Spare]:
        """The spares that finished booting since the last call (a spare that died is dropped)."""
        waiting = [sp for sp in self.idle.values() if sp.node is None]
        if not waiting:
            return []
        done, _ = ray.wait([sp.ready for sp in waiting], num_returns=len(waiting), timeout=0)
        out = []
        for sp in waiting:
            if sp.ready in done and self._answer(sp):
                out.append(sp)
                self.boot_s = [*self.boot_s[-9:], time.monotonic() - sp.booted_at]
        return out

    def _answer(self, spare: Spare) -> bool:
        """Read a booted spare's node; a spare that died instead is dropped (False)."""
        if spare.node is not None:
            return True
        try:
            info = ray.get(spare.ready, timeout=0)
            spare.node, spare.pid = info["node"], info["pid"]
            return True
        except RayError:
            self._kill(self.idle.pop(spare.bundle).actor)  # its process or node died
            return False

    def take(self, pg: Any, lost_nodes: set[str]) -> Spare | None:
        """A spare booted and answering, on a node not lost (``None`` if none is): it is the
        caller's now."""
        self.sync(pg)
        for bundle, spare in sorted(self.idle.items()):
            done, _ = ray.wait([spare.ready], timeout=0)
            if not done:
                continue  # still booting (or its bundle waits for a node): a new process is as fast
            if not self._answer(spare):
                continue
            if spare.node in lost_nodes:
                self._kill(self.idle.pop(bundle).actor)
                continue
            self.taken += 1
            return self.idle.pop(bundle)
        return None

    def bundles(self) -> set[int]:
        return set(self.idle)

    def drop(self) -> None:
        for spare in self.idle.values():
            self._kill(spare.actor)
        self.idle = {}


@dataclass(slots=True)
class Standby:
    actor: Any
    node: str
    ready: Any  # the ref of its ``warm`` call
    booted_at: float
    pid: int | None = None


class Standbys:
    """Warm standby workers: per node of the job, ``per_node`` worker processes booted ahead like
    hot spares (Python, torch, torch._dynamo and the job's modules imported, ``train_fn``
    loaded) that hold no resources: no bundle, no CPU or GPU of Ray's. A rank whose process
    died on a node that lives on is replaced, in place, by that node's standby: the lost
    process's bundle stays the rank's, and the standby takes the GPU(s) the lost process had
    (``WorkerSpec.devices``). What it costs is a process's host memory per node (a few hundred MB),
    where a hot spare holds a worker's resources. ``boot(node)`` makes one on ``node``;
    ``on_dead(node, why)`` hears of a standby found dead (then dropped: a new process replaces the
    rank, and the next ``tend`` boots another)."""

    def __init__(self, per_node: int, boot: Callable[[str], Any], kill: Callable[[Any], None],
                 warm: Callable[[Any], Any], on_dead: Callable[[str, str], None] | None = None) -> None:
        self.per_node = per_node
        self._boot, self._kill, self._warm = boot, kill, warm
        self._on_dead = on_dead or (lambda node, why: None)
        self.idle: dict[str, list[Standby]] = {}  # node -> its standbys (booting or ready)
        self.taken = 0

    def tend(self, nodes: Iterable[str], lost: set[str]) -> list[str]:
        """Boot standbys on ``nodes`` until each has ``per_node``; forget those on ``lost`` nodes.
        The nodes booted on."""
        for node in [n for n in self.idle if n in lost]:
            for sb in self.idle.pop(node):
                self._kill(sb.actor)
        booted = []
        for node in sorted(set(nodes) - lost):
            have = self.idle.setdefault(node, [])
            while len(have) < self.per_node:
                try:
                    actor = self._boot(node)
                    have.append(Standby(actor, node, self._warm(actor), time.monotonic()))
                    booted.append(node)
                except Exception:  # a standby is an optimisation: the job goes on without it
                    log.warning("booting a standby worker on node %s failed", node[:12], exc_info=True)
                    break
        return booted

    def newly_ready(self) -> list[Standby]:
        """The standbys that finished booting since the last call (one that died is dropped)."""
        waiting = [sb for have in self.idle.values() for sb in have if sb.pid is None]
        if not waiting:
            return []
        done, _ = ray.wait([sb.ready for sb in waiting], num_returns=len(waiting), timeout=0)
        return [sb for sb in waiting if sb.ready in done and self._answer(sb)]

    def _answer(self, sb: Standby) -> bool:
        if sb.pid is not None:
            return True
        try:
            sb.pid = ray.get(sb.ready, timeout=0)["pid"]
            return True
        except RayError:  # its process died: gone
            self._dead(sb, f"the warm standby booted on node {sb.node[:12]} died before it was used")
            return False

    def take(self, node: str | None) -> Standby | None:
        """A standby on ``node``, the caller's now: one that finished booting, else one still
        booting (it is further on than a process started now; its ``run`` waits for its
        warm-up), ``None`` if it has none."""
        have = self.idle.get(node) if node is not None else None
        if not have:
            return None
        done, _ = ray.wait([sb.ready for sb in have], num_returns=len(have), timeout=0)
        for sb in sorted(have, key=lambda sb: sb.ready not in done):
            if sb.ready in done and not (self._answer(sb) and self._alive(sb)):
                continue  # its process died (since it booted, perhaps): dropped
            have.remove(sb)
            self.taken += 1
            return sb
        return None

    def _alive(self, sb: Standby) -> bool:
        """Whether a booted standby still answers (its process may have died idle: the OOM killer)."""
        try:
            ray.get(sb.actor.node_info.remote(), timeout=5)
            return True
        except (RayError, GetTimeoutError):
            self._dead(sb, f"the warm standby on node {sb.node[:12]} (pid {sb.pid}) no longer answers: "
                           "a new process replaces the rank")
            return False

    def _dead(self, sb: Standby, why: str) -> None:
        log.warning("%s", why)
        self.idle[sb.node].remove(sb)
        self._kill(sb.actor)
        self._on_dead(sb.node, why)

    def drop(self) -> None:
        for have in self.idle.values():
            for sb in have:
                self._kill(sb.actor)
        self.idle = {}
