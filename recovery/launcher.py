"""``recovery.run``: start the job on Ray, watch it, and recover with the policy when
something fails: the run loop.

The launcher (the driver process) sees a worker process die at once (Ray fails the worker's
``run`` call), an agent die the same way (its ``wait_stopped`` call fails), and pulls hangs,
silent agents and failing storage from the coordinator. Every event is logged as it happens.
What the job is made of, and what a policy may do to it, is :class:`recovery.job.WorkerJob`.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

from ckpt import format as fmt

from . import events as ev
from .config import CheckpointConfig, DetectConfig, RunConfig
from .detect import AGENT_DIED, NODE_DIED, STORAGE, WORKER_DIED, WORKER_ERROR, Failure, first_step_at
from .errors import NoRoomError, RecoveryError, TooManyFailuresError, first_line
from .events import EventLog
from .job import WorkerJob
from .metrics import attach as attach_metrics
from .policies import resolve_policy
from .policy import CONTINUED, RESTARTED, JobKind, RecoveryOutcome, RecoveryPolicy
from .restore import LIVE, RestorePoint
from .result import RecoveryRecord, RunResult, describe_fallback, restore_fallbacks
from .worker import TrainContext


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
    the_policy = resolve_policy(policy, JobKind.DATA_PARALLEL)
    if the_policy.job_kind is not JobKind.DATA_PARALLEL:
        raise ValueError(f"policy {the_policy.name!r} rebuilds lost pipeline stages from their neighbours; the workers "
                         "of recovery.run are data-parallel replicas with no stages: use policy 'reload', 'heal' or "
                         "'auto' here, or run "
                         "the pipeline with recovery.pipeline.RayPipeline(...).run(steps, policy=...)")
    started = False
    if not ray.is_initialized():
        init = {"include_dashboard": False, "configure_logging": False, **(ray_init_options or {})}
        if address is not None:
            init["address"] = address
        elif num_cpus is not None:
            # num_cpus sizes a new local cluster: never attach to one that happens to run here
            init.setdefault("address", "local")
            init["num_cpus"] = num_cpus
        ray.init(**init)
        started = True
    events = EventLog(echo=echo, json_lines=json_events)
    attach_metrics(events, config.metrics)
    sup = Supervisor(WorkerJob(train_fn, config, events), the_policy)
    try:
        return sup.run()
    finally:
        sup.shutdown()
        if started:
            ray.shutdown()


class Supervisor:
    """Runs one job to its end: watches it, hands each failure to the policy, records what happened."""

    def __init__(self, job: WorkerJob, policy: RecoveryPolicy) -> None:
        self.job = job
        self.config = job.config
        self.policy = policy
        self.records: list[RecoveryRecord] = []
        self.checkpoints: dict[int, dict[str, Any]] = {}
        self._failures = self._cursor = 0
        self._incarnation: str | None = None
        self._progress: dict[str, Any] = {}
        self._clock = 0.0  # the coordinator's clock minus this one's, at the last poll
        self._coordinator_down_since: float | None = None
        self._pending_restore: RecoveryRecord | None = None
        self._restore_reported: int | None = None  # the attempt whose restore was reported
        self._growth: tuple[int, float, int] | None = None  # a grow back: its attempt, when decided, the step before
        self.fallbacks: list[dict[str, Any]] = []  # every attempt's restore fallbacks
        self._t0 = time.time()

    def log(self, kind: str, message: str, **fields: Any) -> None:
        self.job.log(kind, message, **fields)

    def run(self) -> RunResult:
        cfg, job = self.config, self.job
        self.log(ev.STARTED, f"job {job.job_id}: {cfg.num_workers} workers, policy {self.policy.name}, "
                 f"storage {cfg.storage}", job=job.job_id, num_workers=cfg.num_workers, policy=self.policy.name)
        job.start_coordinator()
        committed = fmt.committed_steps(job.storage)
        world = job.fit_world(cfg.num_workers, cfg.min_workers)
        job.start_workers(world, RestorePoint(committed[-1] if committed else None))
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
        result.events = job.events.events
        return result

    def _watch(self) -> Failure | None:
        """Wait until every rank returned (None) or something failed."""
        while True:
            refs = list(self.job.run_refs) + list(self.job.fleet.watch)
            ready, _ = ray.wait(refs, num_returns=1, timeout=self.config.poll_interval_s) if refs else ([], [])
            for ref in ready:
                failure = self._finished(ref)
                if failure is not None:
                    return failure
            failure = self._poll_coordinator()
            if failure is not None:
                return failure
            prog = self._progress
            if self._pending_restore is None and prog.get("attempt") == self.job.attempt \
                    and prog.get("last_step") is not None:  # trained a step: spares boot without slowing a start
                self.job.tend_spares()
                if self._growth is None:  # (a grow that needs no checkpoint: heal's, once the new ranks are up)
                    self._grew(self.policy.on_progress, prog["last_step"])
            if not self.job.run_refs:
                return None

    def _finished(self, ref: Any) -> Failure | None:
        now = time.time()
        node = self.job.fleet.stopped(ref)
        if node is not None:
            try:
                ray.get(ref)
                detail = f"the agent of node {node[:12]} stopped"
            except RayError as e:
                detail = f"the agent of node {node[:12]} died: {first_line(e)}"
                if self.job.placement.node_lost(node):
                    ranks = self.job.ranks_on(node)
                    return self._failure(NODE_DIED, f"node {node[:12]} lost (its raylet is gone): its agent and "
                                         f"ranks {list(ranks)} with it", now, ranks=ranks, node=node)
            return self._failure(AGENT_DIED, detail, now, node=node)
        rank = self.job.run_refs.pop(ref)
        try:
            self.job.returns[rank] = ray.get(ref)
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
            node = self.job.rank_node.get(rank)
            lost = ("node" in text and ("dead" in text or "died" in text) and "worker process" not in text) \
                or (node is not None and self.job.placement.node_lost(node))
            if lost:
                if node is not None:
                    self.job.fleet.drop_node(node)
                ranks = tuple(sorted({rank, *self.job.ranks_on(node)}))
                return self._failure(NODE_DIED, f"rank {rank}: its node {(node or '?')[:12]} was lost, ranks "
                                     f"{list(ranks)} and its agent with it ({first_line(e)})", now, ranks=ranks,
                                     node=node)
            return self._failure(WORKER_DIED, f"rank {rank}: its process died ({first_line(e)})", now,
                                 ranks=(rank,))

    def _dead_peer(self, timeout_s: float) -> Failure | None:
        refs = list(self.job.run_refs)
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
        ranks_info = self._progress.get("ranks", {}) if self._progress.get("attempt") == self.job.attempt else {}
        seen = [ranks_info[r]["seen_at"] for r in ranks if r in ranks_info and ranks_info[r].get("seen_at")]
        if kind in (AGENT_DIED, NODE_DIED) and node is not None:  # an agent's last sign of life is its heartbeat
            agent_seen = self._progress.get("agents_seen_at", {}).get(node)
            seen += [agent_seen] if agent_seen else []
        last_step = self._progress.get("last_step") if self._progress.get("attempt") == self.job.attempt else None
        return Failure(kind, self.job.attempt, detail, now, ranks=ranks, node=node,
                       last_progress_at=max(seen) if seen else None, last_step=last_step)

    def _recover(self, failure: Failure) -> None:
        rec = RecoveryRecord(failure, failure.detected_at - self._t0, world_before=self.job.world_size)
        self.records.append(rec)
        after = f", {failure.detected_after_s:.2f} s after its last heartbeat" if failure.detected_after_s else ""
        self.log(ev.FAILURE, f"{failure.kind}: {failure.detail}{after}", failure=failure.to_dict())
        if failure.kind != STORAGE:
            self._failures += 1
            self.job.in_a_row += 1
        cfg = self.config
        if cfg.max_failures != -1 and self._failures > cfg.max_failures:
            rec.action = "aborted"
            self.job.stop_workers(f"more than max_failures={cfg.max_failures} failures")
            self.log(ev.ABORTED, f"giving up after {self._failures} failures (max_failures={cfg.max_failures})")
            raise TooManyFailuresError(f"the job failed {self._failures} times (max_failures={cfg.max_failures}); "
                                       f"last: {failure.kind}: {failure.detail}", self._result())
        self.job.failure = failure
        try:
            outcome = self.policy.on_failure(failure, self.job)
        except NoRoomError as e:
            rec.action = "aborted"
            self.log(ev.ABORTED, str(e))
            raise TooManyFailuresError(str(e), self._result()) from e
        rec.action = outcome.action
        rec.policy = outcome.policy or self.policy.name
        if outcome.action == CONTINUED:
            return
        if outcome.action != RESTARTED:
            self.job.stop_workers(f"policy {self.policy.name} gave up")
            raise RecoveryError(f"policy {self.policy.name} gave up on {failure.kind}: {outcome.detail}")
        rec.world_after = self.job.world_size  # what the job runs with (its start may have placed fewer)
        if outcome.live_step is not None:  # healed: no rollback, every rank continues after live_step
            rec.restore_step, rec.expected_tier = outcome.live_step, LIVE
            rec.steps_lost = 0 if failure.last_step is None else max(0, failure.last_step - outcome.live_step)
        elif outcome.restore is not None:
            rec.restore_step = outcome.restore.step
            rec.expected_tier = outcome.restore.expected_tier
            if failure.last_step is not None:  # (a checkpoint may be newer than the last step reported)
                rec.steps_lost = max(0, failure.last_step - (rec.restore_step if rec.restore_step is not None else -1))
        if rec.world_after != rec.world_before:
            self.log(ev.RESIZED, f"continuing with {rec.world_after} of {cfg.num_workers} workers "
                     "(checkpoint resharded on restore)", world_size=rec.world_after)
        self._pending_restore = rec

    # -- coordinator -----------------------------------------------------------------------------

    def _poll_coordinator(self, final: bool = False) -> Failure | None:
        try:
            snap = ray.get(self.job.coordinator.poll.remote(self._cursor, self.job.attempt), timeout=10)
        except (RayError, GetTimeoutError) as e:
            if self._coordinator_down_since is None:
                self._coordinator_down_since = time.time()
                self.log(ev.COORDINATOR, f"coordinator unreachable ({type(e).__name__}); training goes on, "
                         "commits wait for it", error=first_line(e))
            return None
        if snap["incarnation"] != self._incarnation:
            self.job.fleet.tell_coordinator()  # (a coordinator that restarted knows no agent)
            if self._incarnation is not None:
                down = time.time() - (self._coordinator_down_since or time.time())
                self.log(ev.COORDINATOR, f"coordinator restarted (incarnation {snap['incarnation']}, unreachable "
                         f"for {down:.1f} s); its state rebuilt from storage and heartbeats",
                         incarnation=snap["incarnation"])
                try:
                    ray.get(self.job.coordinator.begin_attempt.remote(self.job.attempt, self.job.world_size), timeout=10)
                except (RayError, GetTimeoutError):
                    pass
            self._incarnation = snap["incarnation"]
            self._cursor = 0
            snap = ray.get(self.job.coordinator.poll.remote(0, self.job.attempt), timeout=10)
        self._coordinator_down_since = None
        self._cursor, self._clock = snap["cursor"], snap["now"] - time.time()
        self._progress = snap["progress"]
        failure = None
        for note in snap["notes"]:
            kind, msg, fields = note["kind"], note["message"], note["fields"]
            if kind == ev.FAILURE:
                f = Failure(**{k: v for k, v in fields["failure"].items() if k != "detected_after_s"} |
                            {"ranks": tuple(fields["failure"]["ranks"])})
                if f.attempt == self.job.attempt and failure is None and not final:
                    failure = f
                elif f.attempt != self.job.attempt:
                    self.log(ev.FAILURE, f"(ignored: attempt {f.attempt} is over) {msg}")
                else:
                    self.log(ev.FAILURE, f"(handled with the failure above) {msg}")
                continue
            if kind == ev.CHECKPOINT:
                self.checkpoints.setdefault(fields["step"], {"step": fields["step"]})
                self.job.in_a_row = 0  # progress since the last restart: the backoff starts over
            self.log(kind, msg, **fields)
            if kind == ev.CHECKPOINT and not final and failure is None:
                self.job.failure = None
                if self._grew(self.policy.on_checkpoint, fields["step"]):
                    return None
        self._track_growth(snap)
        self._track_restore(snap)
        return failure

    def _grew(self, hook: Callable[[int, WorkerJob], RecoveryOutcome | None], step: int) -> bool:
        """Whether the policy's ``hook`` grew the job (timed by the coordinator's clock, as the first steps are)."""
        decided, outcome = time.time() + self._clock, hook(step, self.job)
        if outcome is None or outcome.action != RESTARTED:
            return False
        at = outcome.live_step if outcome.live_step is not None else getattr(outcome.restore, "step", None)
        self._growth = (self.job.attempt, decided, -1 if at is None else at)
        return True

    def _track_growth(self, snap: dict[str, Any]) -> None:
        if self._growth is None or self.job.attempt != self._growth[0]:
            self._growth = None  # (a failure restarted the job before the grown world's first step)
            return
        attempt, decided, before = self._growth
        prog = snap["progress"]
        if prog.get("attempt") != attempt or prog.get("last_step") is None or prog["last_step"] <= before:
            return
        seconds = first_step_at(snap["progress"], snap["now"]) - decided
        self.log(ev.RESUMED, f"grown back to {self.job.world_size} workers: their first step reached the coordinator "
                 f"{seconds:.1f} s after the decision to grow (step {prog['last_step']} now)", step=prog["last_step"],
                 seconds=seconds, grow=True)
        self._growth = None

    def _track_restore(self, snap: dict[str, Any]) -> None:
        restores = snap["restores"]
        if self._restore_reported != self.job.attempt and len(restores) >= self.job.world_size:
            self._restore_reported = self.job.attempt
            fallbacks = restore_fallbacks(restores, self.job.attempt)
            self.fallbacks += fallbacks
            for fb in fallbacks:
                self.log(ev.RESTORE_FALLBACK, describe_fallback(fb), **fb)
            rec = self._pending_restore
            if rec is not None:
                self._restored(rec, restores, fallbacks)
        rec = self._pending_restore
        if rec is None:
            return
        prog = snap["progress"]
        if prog.get("attempt") == self.job.attempt and prog.get("last_step") is not None:
            base = rec.restore_step if rec.restore_step is not None else -1
            if prog["last_step"] > base:
                rec.resumed_after_s = first_step_at(snap["progress"], snap["now"]) - rec.failure.detected_at
                self.log(ev.RESUMED, f"training resumed: the first step after the restore reached the coordinator "
                         f"{rec.resumed_after_s:.1f} s after the failure was detected (step {prog['last_step']} now)",
                         step=prog["last_step"], seconds=rec.resumed_after_s)
                self._pending_restore = None

    def _restored(self, rec: RecoveryRecord, restores: dict[int, dict[str, Any]],
                  fallbacks: list[dict[str, Any]]) -> None:
        by_tier: dict[str, int] = {}
        for info in restores.values():
            for tier, n in info["bytes"].items():
                by_tier[tier] = by_tier.get(tier, 0) + int(n)
        rec.restore_bytes = by_tier
        rec.restore_s = max(info["seconds"] for info in restores.values())
        rec.restored_from = max(by_tier, key=by_tier.get) if any(by_tier.values()) else rec.expected_tier
        rec.fallbacks = fallbacks
        steps = {info["step"] for info in restores.values()}
        mb = ", ".join(f"{k}: {v / 1e6:.1f} MB" for k, v in by_tier.items() if v) or "nothing read"
        self.log(ev.RESTORED, f"{len(restores)} workers restored step {max(steps, key=str)} in "
                 f"{rec.restore_s:.2f} s (slowest rank) from {mb}", step=list(steps), seconds=rec.restore_s,
                 seconds_by_rank={r: round(info["seconds"], 3) for r, info in sorted(restores.items())},
                 bytes=by_tier, fallbacks=len(fallbacks), tier=rec.restored_from, steps_lost=rec.steps_lost)

    def _result(self) -> RunResult:
        job = self.job
        job.fleet.flush()  # the ranks' last reports may still be on their way through the agents
        try:
            for c in ray.get(job.coordinator.checkpoints.remote(), timeout=10):
                self.checkpoints[c["step"]] = c
        except (RayError, GetTimeoutError):
            pass
        returns = [job.returns.get(r) for r in range(job.world_size)]
        return RunResult(returns, job.world_size, job.attempt + 1, self.config.storage, list(self.records),
                         [self.checkpoints[s] for s in sorted(self.checkpoints)], job.events.events,
                         time.time() - self._t0, list(self.fallbacks))

    def shutdown(self) -> None:
        self.job.shutdown()
