"""``recovery.run``: start the coordinator, the node agents and the workers on Ray, watch
them, and recover with the policy when something fails.

The launcher (the driver process) owns the workers, so a coordinator that crashes takes no
worker with it. It sees a worker process die at once (Ray fails the worker's ``run`` call),
an agent die the same way (its ``wait_stopped`` call fails), and pulls hangs, silent agents
and failing storage from the coordinator. Every event is logged as it happens.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ckpt import format as fmt
from ckpt.restore import Tier
from ckpt.storage import open_storage

from . import events as ev
from .config import CheckpointConfig, DetectConfig, RunConfig
from .coordinator import Coordinator
from .detect import AGENT_DIED, NODE_DIED, STORAGE, WORKER_DIED, WORKER_ERROR, Failure
from .errors import NoRoomError, RecoveryError, TooManyFailuresError, first_line
from .events import Event, EventLog
from .fleet import AgentFleet
from .placement import Placement
from .policy import CONTINUED, RecoveryPolicy, resolve_policy
from .restore import RestorePoint, writer_tiers
from .worker import TrainContext, Worker, WorkerSpec

log = logging.getLogger(__name__)

@dataclass
class RecoveryRecord:
    """One failure and what was done about it."""

    failure: Failure
    at_s: float  # seconds since the job started, when it was detected
    action: str = ""
    world_before: int = 0
    world_after: int | None = None
    restore_step: int | None = None
    expected_tier: str | None = None
    restored_from: str | None = None  # the tier that served most bytes
    restore_bytes: dict[str, int] = field(default_factory=dict)
    restore_s: float | None = None  # the slowest rank's restore
    resumed_after_s: float | None = None  # detection -> first step of the new attempt
    steps_lost: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["failure"] = self.failure.to_dict()
        return d


@dataclass
class RunResult:
    returns: list[Any]  # train_fn's return value per rank of the last attempt
    world_size: int
    attempts: int
    storage: str
    failures: list[RecoveryRecord]
    checkpoints: list[dict[str, Any]]  # committed checkpoints: step, stall_s (slowest rank), bytes, ...
    events: list[Event]
    elapsed_s: float

    def summary(self) -> str:
        """A few lines for people: checkpoints, stalls, failures and their recovery."""
        lines = []
        stalls = [c["stall_s"] for c in self.checkpoints if c.get("stall_s") is not None]
        steps = [c["step"] for c in self.checkpoints]
        lines.append(f"checkpoints committed: {len(steps)} (steps {_ranges(steps)})")
        if stalls:
            lines.append(f"training stall per checkpoint (slowest rank): mean {1e3 * sum(stalls) / len(stalls):.1f} ms, "
                         f"max {1e3 * max(stalls):.1f} ms")
        for i, r in enumerate(self.failures, 1):
            f = r.failure
            det = f"{f.detected_after_s:.2f} s" if f.detected_after_s is not None else "?"
            lines.append(f"failure {i}: {f.kind} ({f.detail}) at {r.at_s:.1f} s, detected {det} after the last "
                         "sign of progress")
            if r.action == "restarted":
                src = r.restored_from or r.expected_tier or "?"
                mb = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in r.restore_bytes.items() if v)
                rs = f"{r.restore_s:.2f} s" if r.restore_s is not None else "?"
                resumed = f"{r.resumed_after_s:.1f} s" if r.resumed_after_s is not None else "?"
                lines.append(f"  restored step {r.restore_step} from {src}{f' ({mb})' if mb else ''} in {rs}; "
                             f"workers {r.world_before} -> {r.world_after}; training resumed {resumed} after "
                             f"detection; steps lost: {r.steps_lost if r.steps_lost is not None else '?'}")
            else:
                lines.append(f"  {r.action}")
        lines.append(f"finished: {self.world_size} workers, {self.attempts} attempt(s), {self.elapsed_s:.1f} s")
        return "\n".join(lines)


def _ranges(steps: list[int]) -> str:
    if not steps:
        return "none"
    return ", ".join(str(s) for s in steps) if len(steps) <= 12 else f"{steps[0]} … {steps[-1]}"


def run(train_fn: Callable[[TrainContext], Any], *, num_workers: int, storage: str,
        policy: str | RecoveryPolicy = "reload", max_failures: int = 3, address: str | None = None,
        num_cpus: int | None = None, ray_init_options: dict[str, Any] | None = None,
        echo: TextIO | None = sys.stdout, json_events: bool = False,
        hang_timeout_s: float | None = None, every_n_steps: int | None = None, keep_last: int | None | str = "default",
        **options: Any) -> RunResult:
    """Run ``train_fn(ctx)`` on ``num_workers`` Ray workers with a torch.distributed process
    group, checkpoints committed by a coordinator, and recovery by ``policy``.

    Ray: joins the cluster at ``address`` (or ``RAY_ADDRESS``, or the one this process is
    already connected to); otherwise starts a local one (``num_cpus``) and stops it at the end.
    Other keyword arguments are :class:`RunConfig` fields (``min_workers``, ``allow_grow``,
    ``resources_per_worker``, ``agent``, ...), :class:`DetectConfig` fields
    (``startup_timeout_s``, ``heartbeat_interval_s``, ...) and :class:`CheckpointConfig`
    fields (``keep_every``, ``commit_timeout_s``, ``checkpointer_options``).
    Returns a :class:`RunResult`; raises :class:`TooManyFailuresError` (with ``.result``).
    """
    detect_fields = {f.name for f in dataclasses.fields(DetectConfig)}
    ckpt_fields = {f.name for f in dataclasses.fields(CheckpointConfig)}
    detect = {k: options.pop(k) for k in list(options) if k in detect_fields}
    if hang_timeout_s is not None:
        detect["hang_timeout_s"] = hang_timeout_s
    ck = {k: options.pop(k) for k in list(options) if k in ckpt_fields}
    if "checkpointer_options" in options:
        ck["options"] = options.pop("checkpointer_options")
    if every_n_steps is not None:
        ck["every_n_steps"] = every_n_steps
    if keep_last != "default":
        ck["keep_last"] = keep_last
    config = RunConfig(num_workers=num_workers, storage=str(storage), max_failures=max_failures,
                       detect=DetectConfig(**detect), checkpoint=CheckpointConfig(**ck), **options)
    the_policy = resolve_policy(policy)
    if getattr(the_policy, "requires_pipeline", False):
        raise ValueError(f"policy {the_policy.name!r} rebuilds lost pipeline stages from their neighbours; the workers "
                         "of recovery.run are data-parallel replicas with no stages: use policy='reload' here, or run "
                         "the pipeline with recovery.pipeline.RayPipeline(...).run(steps, policy=...)")
    started = False
    if not ray.is_initialized():
        init = {"include_dashboard": False, "configure_logging": False, **(ray_init_options or {})}
        if address is not None:
            init["address"] = address
        elif num_cpus is not None:
            init["num_cpus"] = num_cpus
        ray.init(**init)
        started = True
    sup = Supervisor(train_fn, config, the_policy, EventLog(echo=echo, json_lines=json_events))
    try:
        return sup.run()
    finally:
        sup.shutdown()
        if started:
            ray.shutdown()


class Supervisor:
    """Runs one job; implements :class:`recovery.policy.JobControl` for the policy."""

    def __init__(self, train_fn: Callable[[TrainContext], Any], config: RunConfig, policy: RecoveryPolicy,
                 log_: EventLog) -> None:
        self.config = config
        self.policy = policy
        self.events = log_
        self.job_id = uuid.uuid4().hex[:8]
        self.storage = open_storage(config.storage)
        self.train_fn_ref = ray.put(train_fn)
        self.coordinator_name = f"ckpt-coordinator-{self.job_id}"
        self.coordinator: Any = None
        self.fleet = AgentFleet(config, self.job_id, self.coordinator_name, self.storage.url, self.log)
        self.rank_node: dict[int, str] = {}
        self.workers: list[Any] = []
        self.run_refs: dict[Any, int] = {}  # run ref -> rank
        self.returns: dict[int, Any] = {}
        self.placement = Placement(config, self.log, driver_node=ray.get_runtime_context().get_node_id())
        self._attempt = -1
        self._world = 0
        self.records: list[RecoveryRecord] = []
        self.checkpoints: dict[int, dict[str, Any]] = {}
        self._failures = 0
        self._in_a_row = 0
        self._cursor = 0
        self._incarnation: str | None = None
        self._progress: dict[str, Any] = {}
        self._coordinator_down_since: float | None = None
        self._pending_restore: RecoveryRecord | None = None
        self._restore_reported = False
        self._t0 = time.time()

    # -- JobControl -----------------------------------------------------------------------------

    @property
    def world_size(self) -> int:
        return self._world

    @property
    def attempt(self) -> int:
        return self._attempt

    def log(self, kind: str, message: str, **fields: Any) -> None:
        self.events.emit(kind, message, **fields)

    def stop_workers(self, reason: str) -> None:
        n = len(self.workers)
        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.workers = []
        self.run_refs = {}
        self.placement.release()
        self.log(ev.STOPPING, f"stopped {n} workers of attempt {self._attempt} ({reason})", workers=n,
                 attempt=self._attempt)

    def find_restore_point(self) -> RestorePoint:
        cfg = self.config
        rows = self.fleet.settled_rows(cfg.settle_timeout_s)
        completed: tuple[int, ...] = ()
        before = set(fmt.committed_steps(self.storage))
        try:
            ray.get(self.coordinator.settle.remote(), timeout=60)
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
        return self.placement.fit(want, minimum)

    def start_workers(self, world_size: int, restore: RestorePoint | None) -> None:
        cfg = self.config
        if self._in_a_row:
            delay = cfg.backoff_for(self._in_a_row)
            if delay:
                self.log(ev.BACKOFF, f"waiting {delay:.1f} s before restarting ({self._in_a_row} failure(s) in a row)",
                         seconds=delay)
                time.sleep(delay)
        self.placement.ensure(world_size)
        self._attempt += 1
        self._world = world_size
        attempt = self._attempt
        try:
            ray.get(self.coordinator.begin_attempt.remote(attempt, world_size), timeout=30)
        except (RayError, GetTimeoutError):
            pass
        remote = ray.remote(Worker)
        self.workers = [remote.options(**self.placement.worker_options(i)).remote(i, world_size, attempt)
                        for i in range(world_size)]
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
            spec = dataclasses.replace(base, node=node, agent=self.fleet.address_for(node))
            self.run_refs[w.run.remote(self.train_fn_ref, spec)] = rank
        self.returns = {}
        self._restore_reported = False
        self.log(ev.WORKERS_STARTED, f"attempt {attempt}: {world_size} workers on {len(set(nodes))} node(s)"
                 + ("" if restore is None or restore.step is None else f", resuming from step {restore.step}"),
                 attempt=attempt, world_size=world_size, nodes=len(set(nodes)),
                 restore_step=None if restore is None else restore.step)

    # -- the job --------------------------------------------------------------------------------

    def run(self) -> RunResult:
        cfg = self.config
        self.log(ev.STARTED, f"job {self.job_id}: {cfg.num_workers} workers, policy {self.policy.name}, "
                 f"storage {cfg.storage}", job=self.job_id, num_workers=cfg.num_workers, policy=self.policy.name)
        ck = cfg.checkpoint
        # On the driver's node: losing a worker node does not take the coordinator along (the
        # driver's node is lost only with the driver). Ray ignores a soft affinity for
        # restartable actors, so it is a hard one, where the driver runs on a node at all.
        here = self.placement.driver_node
        on_node = any(n["NodeID"] == here and n.get("Alive") for n in ray.nodes())
        self.coordinator = ray.remote(Coordinator).options(
            name=self.coordinator_name, num_cpus=0, max_restarts=cfg.coordinator_max_restarts, max_task_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False) if on_node else None,
        ).remote(cfg.storage, cfg.detect, keep_last=ck.keep_last, keep_every=ck.keep_every)
        self.fleet.coordinator = self.coordinator
        ray.get(self.coordinator.ping.remote())
        self.log(ev.COORDINATOR, f"coordinator up on node {ray.get(self.coordinator.node.remote())[:12]}")
        committed = fmt.committed_steps(self.storage)
        world = self.fit_world(cfg.num_workers, cfg.min_workers)
        self.start_workers(world, RestorePoint(committed[-1] if committed else None))
        while True:
            failure = self._watch()
            if failure is None:
                break
            self._recover(failure)
        self._poll_coordinator(final=True)
        result = self._result()
        self.log(ev.FINISHED, f"finished: {result.world_size} workers, {result.attempts} attempt(s), "
                 f"{len(result.failures)} failure(s), {len(result.checkpoints)} checkpoints",
                 attempts=result.attempts, failures=len(result.failures))
        result.events = self.events.events
        return result

    def _watch(self) -> Failure | None:
        """Wait until every rank returned (None) or something failed."""
        while True:
            refs = list(self.run_refs) + list(self.fleet.watch)
            ready, _ = ray.wait(refs, num_returns=1, timeout=self.config.poll_interval_s) if refs else ([], [])
            for ref in ready:
                failure = self._finished(ref)
                if failure is not None:
                    return failure
            failure = self._poll_coordinator()
            if failure is not None:
                return failure
            if not self.run_refs:
                return None

    def _finished(self, ref: Any) -> Failure | None:
        now = time.time()
        node = self.fleet.stopped(ref)
        if node is not None:
            try:
                ray.get(ref)
                detail = f"the agent of node {node[:12]} stopped"
            except RayError as e:
                detail = f"the agent of node {node[:12]} died: {first_line(e)}"
                if self.placement.node_lost(node):
                    ranks = self._ranks_on(node)
                    return self._failure(NODE_DIED, f"node {node[:12]} lost (its raylet is gone): its agent and "
                                         f"ranks {list(ranks)} with it", now, ranks=ranks, node=node)
            return self._failure(AGENT_DIED, detail, now, node=node)
        rank = self.run_refs.pop(ref)
        try:
            self.returns[rank] = ray.get(ref)
            return None
        except RayTaskError as e:
            # A peer's death breaks the collectives of the others: report the death, the cause.
            dead = self._dead_peer(timeout_s=2.0)
            if dead is not None:
                return dead
            return self._failure(WORKER_ERROR, f"rank {rank}: train_fn raised {first_line(e.cause or e)}", now,
                                 ranks=(rank,))
        except RayActorError as e:
            text = str(e).lower()
            node = self.rank_node.get(rank)
            lost = ("node" in text and ("dead" in text or "died" in text) and "worker process" not in text) \
                or (node is not None and self.placement.node_lost(node))
            if lost:
                if node is not None:
                    self.fleet.drop_node(node)
                ranks = tuple(sorted({rank, *self._ranks_on(node)}))
                return self._failure(NODE_DIED, f"rank {rank}: its node {(node or '?')[:12]} was lost, ranks "
                                     f"{list(ranks)} and its agent with it ({first_line(e)})", now, ranks=ranks,
                                     node=node)
            return self._failure(WORKER_DIED, f"rank {rank}: its process died ({first_line(e)})", now,
                                 ranks=(rank,))

    def _ranks_on(self, node: str | None) -> tuple[int, ...]:
        return tuple(sorted(r for r, n in self.rank_node.items() if n == node))

    def _dead_peer(self, timeout_s: float) -> Failure | None:
        refs = list(self.run_refs)
        if not refs:
            return None
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        for ref in ready:
            try:
                ray.get(ref, timeout=0)
            except RayActorError:
                return self._finished(ref)
            except Exception:  # noqa: BLE001 - errors of the others are consequences too
                pass
        return None

    def _failure(self, kind: str, detail: str, now: float, *, ranks: tuple[int, ...] = (),
                 node: str | None = None) -> Failure:
        ranks_info = self._progress.get("ranks", {}) if self._progress.get("attempt") == self._attempt else {}
        seen = [ranks_info[r]["seen_at"] for r in ranks if r in ranks_info and ranks_info[r].get("seen_at")]
        if kind in (AGENT_DIED, NODE_DIED) and node is not None:  # an agent's last sign of life is its heartbeat
            agent_seen = self._progress.get("agents_seen_at", {}).get(node)
            seen += [agent_seen] if agent_seen else []
        last_step = self._progress.get("last_step") if self._progress.get("attempt") == self._attempt else None
        return Failure(kind, self._attempt, detail, now, ranks=ranks, node=node,
                       last_progress_at=max(seen) if seen else None, last_step=last_step)

    def _recover(self, failure: Failure) -> None:
        rec = RecoveryRecord(failure, failure.detected_at - self._t0, world_before=self._world)
        self.records.append(rec)
        after = f", {failure.detected_after_s:.2f} s after its last heartbeat" if failure.detected_after_s else ""
        self.log(ev.FAILURE, f"{failure.kind}: {failure.detail}{after}", failure=failure.to_dict())
        if failure.kind != STORAGE:
            self._failures += 1
            self._in_a_row += 1
        cfg = self.config
        if cfg.max_failures != -1 and self._failures > cfg.max_failures:
            rec.action = "aborted"
            self.stop_workers(f"more than max_failures={cfg.max_failures} failures")
            self.log(ev.ABORTED, f"giving up after {self._failures} failures (max_failures={cfg.max_failures})")
            raise TooManyFailuresError(f"the job failed {self._failures} times (max_failures={cfg.max_failures}); "
                                       f"last: {failure.kind}: {failure.detail}", self._result())
        try:
            outcome = self.policy.on_failure(failure, self)
        except NoRoomError as e:
            rec.action = "aborted"
            self.log(ev.ABORTED, str(e))
            raise TooManyFailuresError(str(e), self._result()) from e
        rec.action = outcome.action
        if outcome.action == CONTINUED:
            return
        if outcome.action != "restarted":
            self.stop_workers(f"policy {self.policy.name} gave up")
            raise RecoveryError(f"policy {self.policy.name} gave up on {failure.kind}: {outcome.detail}")
        rec.world_after = outcome.world_size
        if outcome.restore is not None:
            rec.restore_step = outcome.restore.step
            rec.expected_tier = outcome.restore.expected_tier
            if failure.last_step is not None:
                rec.steps_lost = failure.last_step - (rec.restore_step if rec.restore_step is not None else -1)
        if outcome.world_size is not None and outcome.world_size != rec.world_before:
            self.log(ev.RESIZED, f"continuing with {outcome.world_size} of {cfg.num_workers} workers "
                     "(checkpoint resharded on restore)", world_size=outcome.world_size)
        self._pending_restore = rec

    # -- coordinator -----------------------------------------------------------------------------

    def _poll_coordinator(self, final: bool = False) -> Failure | None:
        try:
            snap = ray.get(self.coordinator.poll.remote(self._cursor, self._attempt), timeout=10)
        except (RayError, GetTimeoutError) as e:
            if self._coordinator_down_since is None:
                self._coordinator_down_since = time.time()
                self.log(ev.COORDINATOR, f"coordinator unreachable ({type(e).__name__}); training goes on, "
                         "commits wait for it", error=first_line(e))
            return None
        if snap["incarnation"] != self._incarnation:
            if self._incarnation is not None:
                down = time.time() - (self._coordinator_down_since or time.time())
                self.log(ev.COORDINATOR, f"coordinator restarted (incarnation {snap['incarnation']}, unreachable "
                         f"for {down:.1f} s); its state rebuilt from storage and heartbeats",
                         incarnation=snap["incarnation"])
                try:
                    ray.get(self.coordinator.begin_attempt.remote(self._attempt, self._world), timeout=10)
                except (RayError, GetTimeoutError):
                    pass
            self._incarnation = snap["incarnation"]
            self._cursor = 0
            snap = ray.get(self.coordinator.poll.remote(0, self._attempt), timeout=10)
        self._coordinator_down_since = None
        self._cursor = snap["cursor"]
        self._progress = snap["progress"]
        failure = None
        for note in snap["notes"]:
            kind, msg, fields = note["kind"], note["message"], note["fields"]
            if kind == "failure":
                f = Failure(**{k: v for k, v in fields["failure"].items() if k != "detected_after_s"} |
                            {"ranks": tuple(fields["failure"]["ranks"])})
                if f.attempt == self._attempt and failure is None and not final:
                    failure = f
                elif f.attempt != self._attempt:
                    self.log(ev.FAILURE, f"(ignored: attempt {f.attempt} is over) {msg}")
                else:
                    self.log(ev.FAILURE, f"(handled with the failure above) {msg}")
                continue
            if kind == "checkpoint":
                self.checkpoints.setdefault(fields["step"], {"step": fields["step"]})
                self._in_a_row = 0  # progress since the last restart: the backoff starts over
            self.log(kind, msg, **fields)
            if kind == "checkpoint" and not final and failure is None:
                outcome = self.policy.on_checkpoint(fields["step"], self)
                if outcome is not None and outcome.action == "restarted":
                    return None
        self._track_restore(snap)
        return failure

    def _track_restore(self, snap: dict[str, Any]) -> None:
        rec = self._pending_restore
        if rec is None:
            return
        restores = snap["restores"]
        if not self._restore_reported and len(restores) >= self._world:
            by_tier: dict[str, int] = {}
            for info in restores.values():
                for tier, n in info["bytes"].items():
                    by_tier[tier] = by_tier.get(tier, 0) + int(n)
            rec.restore_bytes = by_tier
            rec.restore_s = max(info["seconds"] for info in restores.values())
            rec.restored_from = max(by_tier, key=by_tier.get) if any(by_tier.values()) else rec.expected_tier
            steps = {info["step"] for info in restores.values()}
            self._restore_reported = True
            mb = ", ".join(f"{k}: {v / 1e6:.1f} MB" for k, v in by_tier.items() if v) or "nothing read"
            self.log(ev.RESTORED, f"{len(restores)} workers restored step {sorted(steps, key=str)[-1]} in "
                     f"{rec.restore_s:.2f} s (slowest rank) from {mb}", step=list(steps), seconds=rec.restore_s,
                     bytes=by_tier)
        prog = snap["progress"]
        if prog.get("attempt") == self._attempt and prog.get("last_step") is not None:
            base = rec.restore_step if rec.restore_step is not None else -1
            if prog["last_step"] > base:
                rec.resumed_after_s = snap["now"] - rec.failure.detected_at
                self.log(ev.RESUMED, f"training resumed: step {prog['last_step']} reached "
                         f"{rec.resumed_after_s:.1f} s after the failure was detected", step=prog["last_step"],
                         seconds=rec.resumed_after_s)
                self._pending_restore = None

    # -- end -------------------------------------------------------------------------------------

    def _result(self) -> RunResult:
        try:
            for c in ray.get(self.coordinator.checkpoints.remote(), timeout=10):
                self.checkpoints[c["step"]] = c
        except (RayError, GetTimeoutError):
            pass
        returns = [self.returns.get(r) for r in range(self._world)]
        return RunResult(returns, self._world, self._attempt + 1, self.config.storage, list(self.records),
                         [self.checkpoints[s] for s in sorted(self.checkpoints)], self.events.events,
                         time.time() - self._t0)

    def shutdown(self) -> None:
        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        self.workers = []
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
