"""The running data-parallel job on Ray: its coordinator, workers, placement and node agents,
and the verbs a recovery policy uses on it (:class:`recovery.policy.DataParallelJob`).

The driver owns the workers, so a coordinator that crashes takes no worker with it; the
coordinator runs on the driver's node, so losing another node never takes it along.
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ckpt import format as fmt
from ckpt.restore import Tier
from ckpt.storage import open_storage

from . import events as ev
from .config import RunConfig
from .coordinator import Coordinator
from .detect import Failure
from .events import EventLog
from .fleet import AgentFleet
from .placement import Placement
from .policy import DataParallelJob
from .restore import RestorePoint, writer_tiers
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
        self.failure: Failure | None = None  # the failure being recovered (set by the run loop)
        self.kept: dict[int, Any] = {}  # rank -> worker kept in place (or booted ahead) for the next attempt
        self.fresh: set[int] = set()  # the ranks of ``kept`` that are replacements booted ahead
        self.stuck: dict[int, str] = {}  # survivors of the last stop that did not stop: rank -> their stack
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
                _kill(w)
        self.workers, self.run_refs, self.kept = [], {}, kept
        if not kept:
            self.placement.release()
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
        if step is not None:
            writers = fmt.read_manifest(self.storage, step).writers
            tiers = writer_tiers(writers, self.fleet.held(step, writers, rows))
        point = RestorePoint(step, tiers, completed)
        try:
            ray.get(self.coordinator.rollback.remote(step), timeout=30)
        except (RayError, GetTimeoutError):
            pass
        held_mem = sum(1 for t in tiers.values() if t is Tier.AGENT_MEMORY)
        where = (f"agent memory holds {held_mem} of {len(tiers)} writers' snapshots, "
                 f"{sum(1 for t in tiers.values() if t is Tier.PEER)} in peer replicas, the rest from storage")
        self.log(ev.RESTORE_PLAN, "no committed checkpoint: starting from scratch" if step is None else
                 f"restore step {step} ({where})" + (f"; completed {list(completed)} now" if completed else ""),
                 step=step, tiers={w: t.value for w, t in tiers.items()}, completed=list(completed))
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
            _kill(w)
        self.kept, self.fresh = {}, set()

    def start_workers(self, world_size: int, restore: RestorePoint | None) -> None:
        cfg = self.config
        if self.in_a_row:
            delay = cfg.backoff_for(self.in_a_row)
            if delay:
                self.log(ev.BACKOFF, f"waiting {delay:.1f} s before restarting ({self.in_a_row} failure(s) in a row)",
                         seconds=delay)
                time.sleep(delay)
        if self.kept and (self.placement.pg is None or self.placement.world != world_size):
            self._drop_kept()
        self.placement.ensure(world_size)
        self._attempt += 1
        self._world = world_size
        attempt = self._attempt
        try:
            ray.get(self.coordinator.begin_attempt.remote(attempt, world_size), timeout=30)
        except (RayError, GetTimeoutError):
            pass
        kept, self.kept = self.kept, {}
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
            self.log(ev.RESIZED, f"a worker of attempt {attempt} did not start ({type(e).__name__}): replacing "
                     "every worker, on as many as fit", world_size=world_size)
            for w in self.workers:
                _kill(w)
            self.placement.release()
            world_size = self._world = self.placement.fit(world_size, cfg.min_workers)
            try:
                ray.get(self.coordinator.begin_attempt.remote(attempt, world_size), timeout=30)
            except (RayError, GetTimeoutError):
                pass
            stayed, self.workers = [], self._spawn(world_size, attempt, {})
            infos = ray.get([w.node_info.remote() for w in self.workers])
        nodes = [i["node"] for i in infos]
        self.rank_node = dict(enumerate(nodes))
        self.fleet.ensure(set(nodes))
        port = ray.get(self.workers[0].free_port.remote())
        base = WorkerSpec(backend=cfg.torch_backend, master_addr=infos[0]["ip"], master_port=port,
                          collective_timeout_s=cfg.collective_timeout_s, coordinator=self.coordinator,
                          coordinator_name=self.coordinator_name, heartbeat_interval_s=cfg.detect.heartbeat_interval_s,
                          storage=cfg.storage, restore_step=None if restore is None else restore.step,
                          checkpoint=cfg.checkpoint,
                          num_threads=max(1, math.floor(self.placement.bundle.get("CPU", 1) or 1)))
        self.run_refs = {}
        for rank, (w, node) in enumerate(zip(self.workers, nodes)):
            spec = dataclasses.replace(base, node=node, agent=self.fleet.address_for(node), relay=self.fleet.relay_for(node))
            self.run_refs[w.run.remote(self.train_fn_ref, spec, attempt)] = rank
        self.returns = {}
        self.pids = [i["pid"] for i in infos]
        self.log(ev.WORKERS_STARTED, f"attempt {attempt}: {world_size} workers on {len(set(nodes))} node(s)"
                 + (f" ({len(stayed)} kept in place)" if stayed else "")
                 + ("" if restore is None or restore.step is None else f", resuming from step {restore.step}"),
                 attempt=attempt, world_size=world_size, nodes=len(set(nodes)),
                 restore_step=None if restore is None else restore.step, kept=stayed, pids=self.pids)

    def _spawn(self, world_size: int, attempt: int, kept: dict[int, Any]) -> list[Any]:
        """The workers of an attempt: those kept in place, new ones in the other bundles."""
        return [kept.get(i) or self.new_worker(i, world_size, attempt) for i in range(world_size)]

    def new_worker(self, rank: int, world_size: int, attempt: int) -> Any:
        """A worker actor in bundle ``rank`` (threaded: ``interrupt`` must run while ``run`` does)."""
        return ray.remote(Worker).options(**self.placement.worker_options(rank), max_concurrency=4).remote(
            rank, world_size, attempt)

    # -- end -------------------------------------------------------------------------------------

    def _kill_workers(self) -> None:
        for w in self.workers:
            _kill(w)
        self.workers = []
        self._drop_kept()

    def shutdown(self) -> None:
        self._kill_workers()
        self.fleet.shutdown()
        try:
            self.placement.release()
        except Exception:  # noqa: BLE001
            pass
        if self.coordinator is not None:
            try:
                ray.kill(self.coordinator, no_restart=True)
            except Exception:  # noqa: BLE001
                pass


def _kill(worker: Any) -> None:
    try:
        ray.kill(worker, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone
        pass


# Failures whose ranks' processes are gone or must go (a hang: the culprits); for the other kinds
# (a train_fn that raised, an agent that died, storage) every worker process is still sound.
_REPLACE = {"worker_died", "node_died", "hang", "straggler"}


def survivors(job: WorkerJob) -> dict[int, Any]:
    """Stop ``job``'s attempt in place: kill what the failure took, interrupt the others; the
    workers (rank -> actor) whose ``run`` ended and whose process lives on."""
    f, workers = job.failure, job.workers
    if f is None or not workers or f.kind == "node_died" or job.placement.lost_nodes & set(job.rank_node.values()):
        return {}  # a grown or lost node: new bundles, new workers
    if f.kind == "hang":
        # The culprits, when the others can be told from them; else every stalled rank is asked to
        # stop: those waiting in a collective are freed by the interrupt, the stuck are replaced.
        replace = set(f.culprits) if len(f.culprits) < len(workers) else set()
    else:
        replace = set(f.ranks) if f.kind in _REPLACE else set()
    job.stuck = {}
    if len(replace) >= len(workers):
        return {}
    if any(job.placement.node_lost(n) for n in {job.rank_node.get(r) for r in replace} if n is not None):
        return {}  # a process died with its node (seen before Ray or the launcher called it a node loss)
    for r in replace:  # first: their peers blocked in a collective with them fail at once
        _kill(workers[r])
    # Their replacements boot (a process, imports) while the others stop and the agents settle.
    fresh = {r: job.new_worker(r, len(workers), job.attempt + 1) for r in replace}
    alive = {r: w for r, w in enumerate(workers) if r not in replace}
    calls = {w.interrupt.remote(job.attempt): r for r, w in alive.items()}
    runs = {ref: r for ref, r in job.run_refs.items() if r in alive}
    timeout = job.config.interrupt_timeout_s
    ready, _ = ray.wait(list(runs), num_returns=len(runs), timeout=timeout) if runs else ([], [])
    done, _ = ray.wait(list(calls), num_returns=len(calls), timeout=1.0)
    kept: dict[int, Any] = {}
    for ref in done:
        try:
            ray.get(ref)
            kept[calls[ref]] = alive[calls[ref]]
        except RayError:
            pass  # its process died too
    for ref in set(runs) - set(ready):
        r = runs[ref]  # still running after the interrupt (stuck outside Python): replaced
        try:
            job.stuck[r] = ray.get(alive[r].stack.remote(), timeout=2)
        except (RayError, GetTimeoutError):
            job.stuck[r] = "(no answer)"

        if kept.pop(r, None) is not None:
            _kill(alive[r])
            fresh[r] = job.new_worker(r, len(workers), job.attempt + 1)
    for ref in ready:
        try:
            ray.get(ref)  # INTERRUPTED, or what a rank that had finished returned: it trains again
        except RayActorError:
            kept.pop(runs[ref], None)
        except RayError:
            pass  # train_fn failed (a collective with a lost peer): the process is sound
    job.fresh = set(fresh)
    return kept | fresh
