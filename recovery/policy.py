"""Recovery policies: what to do about a failure. The plug point is :class:`RecoveryPolicy`;
the launcher hands it a :class:`JobControl` (the verbs it may use on the running job).

``policy=`` takes a name (``"reload"``; ``"neighbor_average"`` and ``"auto"`` resolve to
:class:`recovery.checkfree.NeighborAveragePolicy` / ``AutoPolicy``, which rebuild lost pipeline
stages and so need a pipeline job, :class:`recovery.pipeline.RayPipeline`) or any object
implementing :class:`RecoveryPolicy`.
"""

from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .config import RunConfig
from .detect import STORAGE, Failure
from .restore import RestorePoint

# Outcomes.
RESTARTED = "restarted"  # workers were replaced; the job resumes from ``restore``
CONTINUED = "continued"  # nothing was restarted (the failure needs no restart)
ABORT = "abort"  # give up: the launcher stops the job and raises


@dataclass(frozen=True, slots=True)
class RecoveryOutcome:
    action: str
    world_size: int | None = None
    restore: RestorePoint | None = None
    detail: str = ""


@runtime_checkable
class JobControl(Protocol):
    """What a policy may do to the job (implemented by the launcher)."""

    config: RunConfig

    @property
    def world_size(self) -> int: ...

    @property
    def attempt(self) -> int: ...

    def log(self, kind: str, message: str, **fields: Any) -> None:
        """Record an event (printed as it happens, returned in the result)."""

    def stop_workers(self, reason: str) -> None:
        """Kill every worker now (no collective timeout is waited for)."""

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


class RecoveryPolicy(abc.ABC):
    """One way of recovering. ``on_failure`` runs in the launcher, between detection and the
    next heartbeat check; it must leave the job running (or return ``ABORT``)."""

    name: str = "custom"

    @abc.abstractmethod
    def on_failure(self, failure: Failure, job: JobControl) -> RecoveryOutcome:
        """Recover from ``failure``."""

    def on_checkpoint(self, step: int, job: JobControl) -> RecoveryOutcome | None:
        """Called after each committed checkpoint; may resize the job (grow back). Default: nothing."""
        return None


class ReloadPolicy(RecoveryPolicy):
    """Stop every worker, resume all of them from the freshest checkpoint committed or
    completable (agent memory, peer replica, storage); with fewer workers when the cluster
    has no room for all (resharding through the format); back to ``num_workers`` after a
    checkpoint once room returns, if ``allow_grow``. A storage failure restarts nothing:
    training goes on and the failing checkpoints are reported."""

    name = "reload"

    def on_failure(self, failure: Failure, job: JobControl) -> RecoveryOutcome:
        if failure.kind == STORAGE:
            job.log("storage", f"checkpoints keep failing ({failure.detail}); training goes on without them: "
                    "check the storage", detail=failure.detail)
            return RecoveryOutcome(CONTINUED, detail="storage failure: nothing to restart")
        return self._reload(job, job.config.num_workers, reason=f"{failure.kind}: {failure.detail}")

    def on_checkpoint(self, step: int, job: JobControl) -> RecoveryOutcome | None:
        cfg = job.config
        if not cfg.allow_grow or job.world_size >= cfg.num_workers or not job.room_for(cfg.num_workers):
            return None
        return self._reload(job, cfg.num_workers, reason=f"room for {cfg.num_workers} workers again (grow back "
                            f"from {job.world_size} after step {step})")

    @staticmethod
    def _reload(job: JobControl, want: int, *, reason: str) -> RecoveryOutcome:
        job.stop_workers(reason)
        point = job.find_restore_point()
        world = job.fit_world(want, job.config.min_workers)
        job.start_workers(world, point)
        return RecoveryOutcome(RESTARTED, world, point)


# name -> "module:attribute", imported only when used.
BUILTIN_POLICIES = {
    "reload": "recovery.policy:ReloadPolicy",
    "neighbor_average": "recovery.checkfree:NeighborAveragePolicy",
    "auto": "recovery.checkfree:AutoPolicy",
}


def resolve_policy(policy: str | RecoveryPolicy) -> RecoveryPolicy:
    if isinstance(policy, RecoveryPolicy):
        return policy
    if not isinstance(policy, str):
        raise TypeError(f"policy must be a name ({sorted(BUILTIN_POLICIES)}) or a RecoveryPolicy, got {policy!r}")
    target = BUILTIN_POLICIES.get(policy)
    if target is None:
        raise ValueError(f"unknown recovery policy {policy!r}; known: {sorted(BUILTIN_POLICIES)}, or pass an "
                         "object implementing recovery.RecoveryPolicy")
    module, attr = target.split(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"recovery policy {policy!r} is not available here ({target}: {e})") from None
    obj = cls()
    if not isinstance(obj, RecoveryPolicy):
        raise TypeError(f"{target} does not implement recovery.RecoveryPolicy")
    return obj
