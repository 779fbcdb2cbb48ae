"""Recovery policies: what to do about a failure. The plug point is :class:`RecoveryPolicy`.

A policy says which kind of job it recovers (:class:`JobKind`) and gets that job's verbs:
a data-parallel job (``recovery.run``, :class:`recovery.job.WorkerJob`) implements
:class:`DataParallelJob`; a pipeline job (:class:`recovery.pipeline.RayPipeline`) implements
:class:`recovery.checkfree.policy.PipelineJob`, the protocol of the stage policies.
``recovery.policies.resolve_policy`` turns a name into a policy.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar, runtime_checkable

from . import events as ev
from .config import RunConfig
from .detect import STORAGE, Failure
from .restore import RestorePoint

# Outcomes.
RESTARTED = "restarted"  # workers were replaced; the job resumes from ``restore``
CONTINUED = "continued"  # nothing was restarted (the failure needs no restart)
ABORT = "abort"  # give up: the job's driver stops the job and raises

# The data-parallel policies by name, as outcomes and records report which one acted.
RELOAD, HEAL = "reload", "heal"


@dataclass(frozen=True, slots=True)
class RecoveryOutcome:
    action: str
    world_size: int | None = None
    restore: RestorePoint | None = None  # a reload: the checkpoint every rank resumes from
    detail: str = ""
    policy: str | None = None  # the policy that acted, where a policy chooses (auto: "heal" or "reload")
    live_step: int | None = None  # a heal: the step every rank continues after, from live state


class JobKind(enum.Enum):
    """The kind of job a policy recovers: which protocol its ``job`` argument implements."""

    DATA_PARALLEL = "data_parallel"  # DataParallelJob: replicas restarted together (recovery.run)
    PIPELINE = "pipeline"  # recovery.checkfree.policy.PipelineJob: stages replaced one by one


@runtime_checkable
class DataParallelJob(Protocol):
    """What a policy may do to a data-parallel job (implemented by :class:`recovery.job.WorkerJob`)."""

    config: RunConfig

    @property
    def world_size(self) -> int: ...

    @property
    def attempt(self) -> int: ...

    def log(self, kind: str, message: str, **fields: Any) -> None:
        """Record an event (printed as it happens, returned in the result)."""

    def stop_workers(self, reason: str) -> None:
        """Stop every worker's attempt now (no collective timeout is waited for): the processes
        the failure took are killed; the others are killed too, or kept for the next attempt of
        the same size when the job restarts in place."""

    def find_restore_point(self) -> RestorePoint:
        """Let the agents persist what they hold, commit every save that can be completed,
        and return the newest committed step with the tier expected to serve it."""

    def fit_world(self, want: int, minimum: int) -> int:
        """The largest world size in ``minimum..want`` the cluster has room for now (placed and
        reserved for the next :meth:`start_workers`); raises ``NoRoomError`` if none."""

    def room_for(self, n: int) -> bool:
        """Whether ``n`` workers would fit now (no reservation)."""

    def start_workers(self, world_size: int, restore: RestorePoint | None) -> None:
        """Start a new attempt with ``world_size`` workers; their ``ctx.restore_step`` is
        ``restore.step``."""


def grows_in_place(job: DataParallelJob, want: int) -> bool:
    """Whether ``job`` can grow back to ``want`` ranks keeping its workers' processes (a
    :class:`recovery.job.WorkerJob` that has, or has just reserved, the bundles for them)."""
    room = getattr(job, "room_to_grow", None)
    return room is not None and hasattr(job, "grow_and_reload") and bool(room(want))


def grow_reason(job: DataParallelJob, want: int, step: int) -> str:
    return f"room for {want} workers again (grow back from {job.world_size} after step {step})"


JobControl = DataParallelJob  # the name this protocol had first; still exported by ``recovery``

JobT = TypeVar("JobT")


class RecoveryPolicy(abc.ABC, Generic[JobT]):
    """One way of recovering a job of kind :attr:`job_kind`. ``on_failure`` runs in the job's
    driver, between detection and the next heartbeat check; it must leave the job running (or
    return ``ABORT``), and it answers every failure, of any kind, without raising (only a
    ``NoRoomError`` of the job's ``fit_world`` passes through: the driver aborts with it). The
    driver, not the policy, counts failures against ``max_failures``.
    ``recovery.testing.RecoveryPolicyTests`` checks all this."""

    name: str = "custom"
    job_kind: ClassVar[JobKind] = JobKind.DATA_PARALLEL

    @property
    def requires_pipeline(self) -> bool:
        return self.job_kind is JobKind.PIPELINE

    @abc.abstractmethod
    def on_failure(self, failure: Failure, job: JobT) -> RecoveryOutcome:
        """Recover from ``failure``."""

    def on_checkpoint(self, step: int, job: JobT) -> RecoveryOutcome | None:
        """Called after each committed checkpoint; may resize the job (grow back). Default: nothing."""
        return None

    def on_progress(self, step: int, job: JobT) -> RecoveryOutcome | None:
        """Called between checkpoints, at most once per driver poll (``poll_interval_s``), while
        the job trains (``step``: the newest step a rank reported); may resize the job where that
        needs no checkpoint (heal: grow back once the new ranks are up). Default: nothing."""
        return None


class ReloadPolicy(RecoveryPolicy[DataParallelJob]):
    """Stop every worker, resume all of them from the freshest checkpoint committed or
    completable (agent memory, peer replica, storage); with fewer workers when the cluster
    has no room for all (resharding through the format); back to ``num_workers`` after a
    checkpoint once room returns, if ``allow_grow``. A storage failure restarts nothing:
    training goes on and the failing checkpoints are reported."""

    name = RELOAD

    def on_failure(self, failure: Failure, job: DataParallelJob) -> RecoveryOutcome:
        if not isinstance(job, DataParallelJob):
            return RecoveryOutcome(ABORT, detail="policy 'reload' restarts the workers of a data-parallel job "
                                   "(recovery.run); a pipeline reloads with "
                                   "RayPipeline(...).run(steps, policy='reload')")
        if failure.kind == STORAGE:
            job.log(ev.STORAGE, f"checkpoints keep failing ({failure.detail}); training goes on without them: "
                    "check the storage", detail=failure.detail)
            return RecoveryOutcome(CONTINUED, detail="storage failure: nothing to restart")
        return self.reload(job, job.config.num_workers, reason=f"{failure.kind}: {failure.detail}")

    def on_checkpoint(self, step: int, job: DataParallelJob) -> RecoveryOutcome | None:
        """Grow back (``allow_grow``) once room returns: in place where the job can (its workers
        keep their processes, the new ranks boot in bundles of their own, every rank restores
        this checkpoint), else by restarting every worker from it."""
        want = job.config.num_workers
        if not job.config.allow_grow or job.world_size >= want:
            return None
        reason = grow_reason(job, want, step)
        if grows_in_place(job, want):
            point = job.grow_and_reload(want, reason)  # type: ignore[attr-defined]
            return RecoveryOutcome(RESTARTED, job.world_size, point, policy=RELOAD)
        return self.grow_by_restart(job, want, step)

    @staticmethod
    def grow_by_restart(job: DataParallelJob, want: int, step: int) -> RecoveryOutcome | None:
        """Grow back by restarting every worker from the checkpoint of ``step``, where there is room
        and the job is not growing in place already (its new ranks' bundles being placed, or
        their processes booting ahead: looked at again after the next checkpoint) and does not
        grow in place only (:func:`recovery.inplace.grows_only_in_place`)."""
        if (getattr(job, "growth_pending", False) or getattr(job, "grows_only_in_place", False)
                or not job.room_for(want)):
            return None
        return ReloadPolicy.reload(job, want, reason=grow_reason(job, want, step))

    @staticmethod
    def reload(job: DataParallelJob, want: int, *, reason: str) -> RecoveryOutcome:
        """Stop every worker, restore the freshest point on as many as fit (``want`` at most)."""
        job.stop_workers(reason)
        point = job.find_restore_point()
        world = job.fit_world(want, job.config.min_workers)
        job.start_workers(world, point)
        return RecoveryOutcome(RESTARTED, world, point)
