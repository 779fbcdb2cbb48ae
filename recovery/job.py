"""The running data-parallel job on Ray: its coordinator, workers, placement and node agents,
and the verbs a recovery policy uses on it (:class:`recovery.policy.DataParallelJob`).

The driver owns the workers, so a coordinator that crashes takes no worker with it; the
coordinator runs on the driver's node, so losing another node never takes it along.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import uuid
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ckpt import format as fmt
from ckpt.restore import Tier
from ckpt.storage import open_storage

from . import events as ev
from . import inplace
from .config import RunConfig
from .coordinator import Coordinator
from .detect import Failure
from .events import EventLog
from .fleet import AgentFleet
from .inplace import bundle_for, kill, live_states, replacements_started, survivors
from .live import HealSpec, LiveState, receivers_of
from .placement import Placement
from .policy import DataParallelJob
from .restore import RestorePoint, writer_tiers
from .spares import Spares, Standbys
from .worker import TrainContext, WorkerSpec
from .worker_process import Worker


class WorkerJob(DataParallelJob):
    """One job's processes. ``attempt`` counts the starts of the workers (0 first); a restart
    replaces every worker. ``in_a_row`` is the number of failures since the last committed
    checkpoint, kept by the run loop; the backoff before a restart grows with it."""

    def __init__(self, train_fn: Callable[[TrainContext], Any], config: RunConfig, events: EventLog) -> None:
        self.config = config
        self.events = events
        self.job_id = uuid.uuid4().hex[:8]
        self.storage = open_storage(config.storage)
        self.train_fn_ref = ray.put(train_fn)
        self.coordinator_name = f"ckpt-coordinator-{self.job_id}"
        self.coordinator: Any = None
        self.fleet = AgentFleet(config, self.job_id, self.coordinator_name, self.storage.url, self.log)
        self.placement = Placement(config, self.log, driver_node=ray.get_runtime_context().get_node_id())
        self.rank_node: dict[int, str] = {}
        self.workers: list[Any] = []
        self.run_refs: dict[Any, int] = {}  # run ref -> rank
        self.returns: dict[int, Any] = {}
        self.in_a_row = 0
        self.spares = Spares(config.spares, boot=lambda bundle: self._worker_in(bundle, -1, 0, -1), kill=kill,
                             warm=lambda actor: actor.warm.remote(self.train_fn_ref))
        self.standbys = Standbys(config.standby if config.in_place else 0,  # (used in place only)
                                 kill=kill, warm=lambda actor: actor.warm.remote(self.train_fn_ref), on_dead=lambda
                                 node, why: self.log(ev.SPARE, why, node=node, standby=True, dead=True),
                                 boot=lambda node: ray.remote(Worker).options(  # no resources: see Standbys
                                     num_cpus=0, num_gpus=0, max_restarts=0, max_concurrency=4, scheduling_strategy=
                                     NodeAffinitySchedulingStrategy(node, soft=False)).remote(-1, 0, -1))
        self.rank_gpus: dict[int, list[Any]] = {}  # rank -> the GPU ids Ray gave its process
        self.devices: dict[int, tuple[Any, tuple[str, ...]]] = {}  # rank -> (its standby, the GPUs it takes)
        self.failure: Failure | None = None  # the failure being recovered (set by the run loop)
        self.kept: dict[int, Any] = {}  # rank -> worker kept in place (or booted ahead) for the next attempt
        self.fresh: set[int] = set()  # the ranks of ``kept`` that are replacements booted ahead
        self.stuck: dict[int, str] = {}  # survivors of the last stop that did not stop: rank -> their stack
        self.keep_state = False  # this stop keeps the survivors' live training state (policy heal)
        self.growing = False  # this stop loses no rank: the job grows back in place (policy heal)
        self.bundles: dict[int, int] = {}  # rank -> its placement-group bundle, where not the same number
        self.heal_fallback: RestorePoint | None = None  # a heal's start fell back to this checkpoint
        self.pids: list[int | None] = []
        self._attempt = -1
        self._world = 0

    def start_coordinator(self) -> None:
        cfg, ck = self.config, self.config.checkpoint
        # On the driver's node: losing a worker node does not take the coordinator along (the
        # driver's node is lost only with the driver). Ray ignores a soft affinity for
        # restartable actors, so it is a hard one, where the driver runs on a node at all.
        here = self.placement.driver_node
        on_node = any(n["NodeID"] == here and n.get("Alive") for n in ray.nodes())
        self.coordinator = ray.remote(Coordinator).options(
            # threaded: settle() and checkpoints() wait on the commit thread while heartbeats go on
            name=self.coordinator_name, num_cpus=0, max_restarts=cfg.coordinator_max_restarts, max_task_retries=0,
            max_concurrency=8,
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False) if on_node else None,
        ).remote(cfg.storage, cfg.detect, keep_last=ck.keep_last, keep_every=ck.keep_every)
        self.fleet.coordinator = self.coordinator
        ray.get(self.coordinator.ping.remote())
        self.log(ev.COORDINATOR, f"coordinator up on node {ray.get(self.coordinator.node.remote())[:12]}")

    def ranks_on(self, node: str | None) -> tuple[int, ...]:
        return tuple(sorted(r for r, n in self.rank_node.items() if n == node))

    # -- DataParallelJob -----------------------------------------------------------------------------

    @property
    def world_size(self) -> int:
        return self._world

    @property
    def attempt(self) -> int:
        return self._attempt

    def log(self, kind: str, message: str, **fields: Any) -> None:
        self.events.emit(kind, message, **fields)

    def stop_workers(self, reason: str) -> None:
        """Stop the attempt. In place (``RunConfig.in_place``, the default): the processes the
        failure took (or the culprits of a hang) are killed, every other worker is interrupted
        and kept, with its bundle, for the next attempt of the same size; a worker that does not
        stop within ``interrupt_timeout_s`` is killed too. Otherwise every worker is killed."""
        n = len(self.workers)
        t0 = time.monotonic()
        kept = survivors(self) if self.config.in_place else {}
        for rank, w in enumerate(self.workers):
            if rank not in kept:
                kill(w)
        self.workers, self.run_refs, self.kept = [], {}, kept
        if not kept:
            self.placement.release()
            self.bundles = {}
        stayed = sorted(set(kept) - self.fresh)
        how = (f"kept {len(stayed)} workers in place, replacing {n - len(stayed)}" if kept else f"stopped {n} workers")
        stuck = (f"; ranks {sorted(self.stuck)} did not stop within interrupt_timeout_s="
                 f"{self.config.interrupt_timeout_s:g} s" if self.stuck else "")
        self.log(ev.STOPPING, f"{how} of attempt {self._attempt} ({reason}) in {time.monotonic() - t0:.2f} s{stuck}",
                 workers=n, kept=stayed, stuck=self.stuck, attempt=self._attempt)

    def find_restore_point(self) -> RestorePoint:
        cfg = self.config
        rows = self.fleet.settled_rows(cfg.settle_timeout_s)
        before = set(fmt.committed_steps(self.storage))
        # Settling reads the fragments not announced yet (tens of ms each at thousands of arrays):
        # its time grows with the writers.
        settle_s = 60.0 + 0.05 * cfg.num_workers
        try:
            ray.get(self.coordinator.settle.remote(settle_s), timeout=settle_s + 5)
        except (RayError, GetTimeoutError) as e:
            self.log(ev.COORDINATOR, f"coordinator unavailable while settling ({type(e).__name__}): restoring "
                     "from what is committed")
        committed = fmt.committed_steps(self.storage)
        completed = tuple(sorted(set(committed) - before))
        step = committed[-1] if committed else None
        tiers: dict[str, Tier] = {}
        holders = None
        if step is not None:
            manifest = fmt.read_manifest(self.storage, step)
            held, holders = self.fleet.held(step, manifest.save_id, list(manifest.writers), rows)
            tiers = writer_tiers(manifest.writers, held)
        point = RestorePoint(step, tiers, completed, holders)
        try:
            ray.get(self.coordinator.rollback.remote(step), timeout=30)
        except (RayError, GetTimeoutError):
            pass
        held_mem = sum(1 for t in tiers.values() if t is Tier.AGENT_MEMORY)
        where = (f"agent memory holds {held_mem} of {len(tiers)} writers' snapshots, "
                 f"{sum(1 for t in tiers.values() if t is Tier.PEER)} in peer replicas, the rest from storage")
        self.log(ev.RESTORE_PLAN, "no committed checkpoint: starting from scratch" if step is None else
                 f"restore step {step} ({where})" + (f"; completed {list(completed)} now" if completed else ""),
                 step=step, tiers={w: t.value for w, t in tiers.items()}, completed=list(completed),
                 directory=None if holders is None else len(holders))  # writers whose holders the workers are told
        return point

    def room_for(self, n: int) -> bool:
        return self.placement.room_for(n)

    def fit_world(self, want: int, minimum: int) -> int:
        if self.kept and self.placement.pg is not None and self.placement.world == want:
            return want  # the same bundles: the kept workers stay where they are
        self._drop_kept()
        self.placement.release()
        return self.placement.fit(want, minimum)

    def _drop_kept(self) -> None:
        for w in self.kept.values():
            kill(w)
        self.kept, self.fresh, self.bundles = {}, set(), {}

    # -- HealableJob -----------------------------------------------------------------------------

    def stop_keeping_state(self, reason: str, *, grow: bool = False) -> dict[int, LiveState]:
        """Stop the attempt in place keeping every survivor's process and live training state
        (a lost node's ranks are replaced, the others kept; ``grow``: every rank is kept, none
        was lost); each survivor's :class:`LiveState`."""
        self.keep_state, self.growing = True, grow
        try:
            self.stop_workers(reason)
            return live_states(self) if self.kept else {}
        finally:
            self.keep_state = self.growing = False

    def room_to_grow(self, want: int, next_chance_s: float | None = None) -> bool:
        return inplace.room_to_grow(self, want, next_chance_s)

    @property
    def growth_under_way(self) -> bool:
        """New ranks' bundles being placed, or their processes booting ahead."""
        return self.placement.reserving or self.spares.ahead_since is not None

    @property
    def grows_only_in_place(self) -> bool:
        return inplace.grows_only_in_place(self)

    @property
    def growth_pending(self) -> bool:
        """Growth under way, or the new ranks' bundles refused (no more room since): wait."""
        return self.growth_under_way or self.placement.refused()

    def grow_and_reload(self, want: int, reason: str) -> RestorePoint:
        """Grow back to ``want`` ranks (:func:`room_to_grow` said there is room) without a new
        process for the ranks there are: every worker stops at once and is kept, the new ranks
        boot in the free bundles, and all of them restore the newest checkpoint (policy reload)."""
        self.growing = True
        try:
            self.stop_workers(reason)
        finally:
            self.growing = False
        inplace.boot_growth(self, want, "reload")  # (they boot while the agents settle)
        point = self.find_restore_point()
        self.start_workers(want, point)
        return point

    def heal_workers(self, source: int, step: int, current: tuple[int, ...], *, grow_to: int | None = None) -> int:
        """Start the next attempt from live state: rank ``source``'s state at ``step`` goes to
        every rank but ``current`` (survivors whose own state is at ``step``); ``grow_to``: new
        ranks up to that many first boot in the free bundles (:func:`boot_growth`). A replacement
        that does not start within ``placement_timeout_s`` is given up: the survivors continue
        without it, renumbered, if they are at least ``min_workers`` (else ``NoRoomError``).
        Returns the world size."""
        cfg = self.config
        if grow_to is not None:
            inplace.boot_growth(self, grow_to, "heal")
        if not replacements_started(self, cfg.placement_timeout_s):
            source, current = inplace.give_up_replacements(self, source, current)
        world = len(self.kept)
        self.start_workers(world, None, heal=HealSpec(source, step, receivers_of(world, current)))
        return world

    def start_workers(self, world_size: int, restore: RestorePoint | None, *, heal: HealSpec | None = None) -> None:
        cfg = self.config
        if self.in_a_row:
            delay = cfg.backoff_for(self.in_a_row)
            if delay:
                self.log(ev.BACKOFF, f"waiting {delay:.1f} s before restarting ({self.in_a_row} failure(s) in a row)",
                         seconds=delay)
                time.sleep(delay)
        healing_shrunk = heal is not None and len(self.kept) == world_size and self.placement.pg is not None
        if not healing_shrunk:  # (a heal without a replacement keeps the bundles it has, some now empty)
            if self.kept and (self.placement.pg is None or self.placement.world != world_size):
                self._drop_kept()
            if self.placement.pg is None or self.placement.world != world_size:
                self.bundles = {}
            self.placement.ensure(world_size)
        self._attempt += 1
        self._world = world_size
        attempt = self._attempt
        try:
            ray.get(self.coordinator.begin_attempt.remote(attempt, world_size), timeout=30)
        except (RayError, GetTimeoutError):
            pass
        kept, self.kept = self.kept, {}
        self.heal_fallback = None
        stayed = sorted(set(kept) - self.fresh)
        self.fresh = set()
        self.workers = self._spawn(world_size, attempt, kept)
        try:
            # In place, a replacement may never start (its bundle's node is gone, its process
            # fails): after placement_timeout_s every worker is replaced, on as many as fit.
            infos = ray.get([w.node_info.remote() for w in self.workers],
                            timeout=cfg.placement_timeout_s if kept else None)
        except (RayError, GetTimeoutError) as e:
            if not kept:
                raise
            if heal is not None:  # its live state went with it: every worker from the newest checkpoint
                committed = fmt.committed_steps(self.storage)
                restore, heal = RestorePoint(committed[-1] if committed else None), None
                self.heal_fallback = restore
            self.log(ev.RESIZED, f"a worker of attempt {attempt} did not start ({type(e).__name__}): replacing "
                     "every worker, on as many as fit" + ("" if restore is None or restore.step is None else
                                                          f", from step {restore.step}"), world_size=world_size)
            for w in self.workers:
                kill(w)
            self.placement.release()
            self.bundles = {}
            world_size = self._world = self.placement.fit(world_size, cfg.min_workers)
            try:
                ray.get(self.coordinator.begin_attempt.remote(attempt, world_size), timeout=30)
            except (RayError, GetTimeoutError):
                pass
            stayed, self.workers = [], self._spawn(world_size, attempt, {})
            infos = ray.get([w.node_info.remote() for w in self.workers])
        nodes = [i["node"] for i in infos]
        self.rank_node = dict(enumerate(nodes))
        taken, self.devices = {r: d[1] for r, d in self.devices.items() if d[0] in self.workers[r:r + 1]}, {}
        self.rank_gpus = {r: i.get("gpus") or list(taken.get(r, ())) for r, i in enumerate(infos)}
        self.fleet.ensure(set(nodes))
        port = ray.get(self.workers[0].open_store.remote(world_size, cfg.collective_timeout_s))
        base = WorkerSpec(backend=cfg.torch_backend, master_addr=infos[0]["ip"], master_port=port,
                          collective_timeout_s=cfg.collective_timeout_s, coordinator=self.coordinator,
                          coordinator_name=self.coordinator_name, heartbeat_interval_s=cfg.detect.heartbeat_interval_s,
                          storage=cfg.storage, restore_step=None if restore is None else restore.step,
                          checkpoint=cfg.checkpoint, heal=heal,
                          holders=None if restore is None or not restore.holders else ray.put(dict(restore.holders)),
                          num_threads=max(1, math.floor(self.placement.bundle.get("CPU", 1) or 1)))
        self.run_refs = {}
        for rank, (w, node) in enumerate(zip(self.workers, nodes)):
            spec = dataclasses.replace(base, node=node, agent=self.fleet.address_for(node), relay=self.fleet.relay_for(node),
                                       devices=taken.get(rank))
            self.run_refs[w.run.remote(self.train_fn_ref, spec, attempt, rank, world_size)] = rank
        self.fleet.tell_workers(self.workers, nodes)
        self.returns = {}
        self.pids = [i["pid"] for i in infos]
        self.log(ev.WORKERS_STARTED, f"attempt {attempt}: {world_size} workers on {len(set(nodes))} node(s)"
                 + (f" ({len(stayed)} kept in place)" if stayed else "")
                 + ("" if restore is None or restore.step is None else f", resuming from step {restore.step}")
                 + ("" if heal is None else f", continuing after step {heal.step} from the live state of rank "
                    f"{heal.source} (sent to ranks {list(heal.receivers)})"),
                 attempt=attempt, world_size=world_size, nodes=len(set(nodes)),
                 restore_step=None if restore is None else restore.step, kept=stayed, pids=self.pids,
                 heal=None if heal is None else {"source": heal.source, "step": heal.step,
                                                 "receivers": list(heal.receivers)})

    def _spawn(self, world_size: int, attempt: int, kept: dict[int, Any]) -> list[Any]:
        """The workers of an attempt: those kept in place, new ones in the other bundles."""
        return [kept.get(i) or self.new_worker(i, world_size, attempt) for i in range(world_size)]

    def new_worker(self, rank: int, world_size: int, attempt: int, *, in_place: bool = False) -> Any:
        """A worker for rank ``rank``: a hot spare where one is ready (it takes the spare's
        bundle), else (``in_place``: the rank's bundle is still the job's) its node's warm
        standby, else a new actor in the rank's bundle."""
        spare = self.spares.take(self.placement.pg, self.placement.lost_nodes) if self.spares.count else None
        if spare is not None:
            self.bundles[rank] = spare.bundle
            self.log(ev.SPARE, f"rank {rank} replaced by the hot spare in bundle {spare.bundle} on node "
                     f"{(spare.node or '?')[:12]} (pid {spare.pid}, booted {time.monotonic() - spare.booted_at:.1f} s "
                     "before)", rank=rank, bundle=spare.bundle, node=spare.node, pid=spare.pid, taken=self.spares.taken)
            return spare.actor
        node = self.rank_node.get(rank)
        if in_place and node not in self.placement.lost_nodes and (sb := self.standbys.take(node)) is not None:
            if gpus := self.rank_gpus.get(rank):
                self.devices[rank] = (sb.actor, tuple(map(str, gpus)))
            self.log(ev.SPARE, f"rank {rank} replaced by the warm standby on node {sb.node[:12]} (pid {sb.pid}, "
                     f"booted {time.monotonic() - sb.booted_at:.1f} s before)", rank=rank, node=sb.node, pid=sb.pid,
                     standby=True, taken=self.standbys.taken)
            return sb.actor
        return self._worker_in(bundle_for(self, rank), rank, world_size, attempt)

    def _worker_in(self, bundle: int, rank: int, world_size: int, attempt: int) -> Any:
        """A worker actor in ``bundle`` (threaded: ``interrupt`` must run while ``run`` does)."""
        return ray.remote(Worker).options(**self.placement.worker_options(bundle), max_concurrency=4).remote(
            rank, world_size, attempt)

    def tend_spares(self) -> None:
        inplace.tend_spares(self)

    # -- end -------------------------------------------------------------------------------------

    def _kill_workers(self) -> None:
        for w in self.workers:
            kill(w)
        self.workers = []
        self._drop_kept()

    def shutdown(self) -> None:
        self._kill_workers()
        self.spares.drop()
        self.standbys.drop()
        self.fleet.shutdown()
        with contextlib.suppress(Exception):  # shutting down: what is already gone stays gone
            self.placement.release()
        if self.coordinator is not None:
            with contextlib.suppress(Exception):
                ray.kill(self.coordinator, no_restart=True)
