"""The stage recovery policies that ``policy="neighbor_average"`` and ``policy="auto"`` name,
and what they ask of a pipeline job (:class:`PipelineJob`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar, Protocol, runtime_checkable

from ..detect import Failure
from ..policy import ABORT, CONTINUED, RESTARTED, JobKind, RecoveryOutcome, RecoveryPolicy
from .plan import AutoInputs, RecoveryAction, StageRecovery, decide_auto

STRATEGIES = ("neighbor_average", "copy", "random", "reload", "auto")


@runtime_checkable
class PipelineJob(Protocol):
    """What a stage policy may do to a pipeline job (implemented by
    :class:`recovery.pipeline.RayPipeline`)."""

    def recover_stages(self, lost: list[int], policy: StageRecoveryPolicy) -> dict[str, Any]:
        """Replace the ``lost`` stages: plan each one, ask ``policy.choose`` between a reload
        and a rebuild, do it, log the reason. Returns the recovery's record; its ``"chosen"``
        is the strategy done (``"reload"`` rolled every stage back) and ``"reason"`` why."""


class StageRecoveryPolicy(RecoveryPolicy[PipelineJob]):
    """Recover a pipeline-parallel job by replacing only the lost stages.

    ``strategy`` is how an interior stage comes back: ``neighbor_average`` (CheckFree), ``copy``
    (one neighbour), ``random`` (fresh init), ``reload`` (every stage back to the freshest
    snapshot) or ``auto`` (reload or neighbour average by :func:`decide_auto`). First and last
    stages are restored by copy (CheckFree+) by every strategy but ``reload``; a stage with a
    surviving data-parallel replica is copied from it.

    The job is a :class:`PipelineJob`; it asks :meth:`choose` what to do, does it, and logs the
    reason. A data-parallel job (``recovery.run``) has no stages to rebuild: ``recovery.run``
    refuses these policies when it starts, and one given such a job anyway aborts.
    """

    job_kind: ClassVar[JobKind] = JobKind.PIPELINE

    def __init__(self, strategy: str = "neighbor_average") -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.strategy = strategy
        self.name = strategy

    def choose(self, plans: Iterable[StageRecovery], inputs: AutoInputs | None = None) -> tuple[str, str]:
        """``(strategy, reason)`` for one failure event; ``reload`` whenever a plan needs one."""
        plans = tuple(plans)
        if self.strategy == "reload":
            return "reload", "policy reload: every stage goes back to the freshest snapshot"
        forced = [p.reason for p in plans if p.action is RecoveryAction.RELOAD]
        if forced:
            return "reload", f"reload: {'; '.join(forced)}"
        return self.strategy, f"{self.strategy}: " + "; ".join(f"stage {p.stage}: {p.reason}" for p in plans)

    def on_failure(self, failure: Failure, job: PipelineJob) -> RecoveryOutcome:
        if not isinstance(job, PipelineJob):
            return RecoveryOutcome(ABORT, detail=f"policy {self.name!r} rebuilds pipeline stages; this job has none "
                                   "(use recovery.pipeline.RayPipeline, or policy='reload')")
        if not failure.ranks:
            return RecoveryOutcome(ABORT, detail=f"{failure.kind}: no stage named as lost ({failure.detail})")
        event = job.recover_stages(sorted(failure.ranks), self)
        action = RESTARTED if event["chosen"] == "reload" else CONTINUED
        return RecoveryOutcome(action, detail=event.get("reason", ""))


class NeighborAveragePolicy(StageRecoveryPolicy):
    """``policy="neighbor_average"``: CheckFree for interior stages, CheckFree+ copy for the edges."""

    def __init__(self) -> None:
        super().__init__("neighbor_average")


class AutoPolicy(StageRecoveryPolicy):
    """``policy="auto"``: reload or neighbour average, whichever :func:`decide_auto` says is cheaper."""

    def __init__(self) -> None:
        super().__init__("auto")

    def choose(self, plans: Iterable[StageRecovery], inputs: AutoInputs | None = None) -> tuple[str, str]:
        if inputs is None:
            raise ValueError("policy auto needs AutoInputs (step time, steps since the snapshot, recovery steps)")
        decision = decide_auto(plans, inputs)
        return decision.policy, decision.reason


def stage_policy(policy: str | StageRecoveryPolicy) -> StageRecoveryPolicy:
    """A strategy name or a policy object -> the policy object."""
    if isinstance(policy, StageRecoveryPolicy):
        return policy
    if policy == "neighbor_average":
        return NeighborAveragePolicy()
    if policy == "auto":
        return AutoPolicy()
    return StageRecoveryPolicy(policy)
