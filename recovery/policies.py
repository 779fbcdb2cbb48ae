"""The built-in recovery policies by name: what ``policy=`` of ``recovery.run`` and
``RayPipeline.run`` accepts besides a :class:`recovery.policy.RecoveryPolicy` object.

``"reload"`` (:class:`recovery.policy.ReloadPolicy`) and ``"heal"`` (:class:`recovery.heal.HealPolicy`)
recover a data-parallel job; ``"neighbor_average"`` (:mod:`recovery.checkfree`) rebuilds lost
pipeline stages and so needs a pipeline job (:class:`recovery.pipeline.RayPipeline`). ``"auto"``
chooses per failure, and names one policy per kind of job: for a data-parallel job
:class:`recovery.heal.AutoHealPolicy` (heal or reload), for a pipeline
:class:`recovery.checkfree.AutoPolicy` (reload or neighbour average).
"""

from __future__ import annotations

from .checkfree import AutoPolicy, NeighborAveragePolicy
from .heal import AutoHealPolicy, HealPolicy
from .policy import JobKind, RecoveryPolicy, ReloadPolicy

BUILTIN_POLICIES: dict[str, type[RecoveryPolicy]] = {
    "reload": ReloadPolicy,
    "heal": HealPolicy,
    "neighbor_average": NeighborAveragePolicy,
    "auto": AutoPolicy,
}
AUTO_BY_KIND: dict[JobKind, type[RecoveryPolicy]] = {JobKind.PIPELINE: AutoPolicy,
                                                     JobKind.DATA_PARALLEL: AutoHealPolicy}


def resolve_policy(policy: str | RecoveryPolicy, job_kind: JobKind | None = None) -> RecoveryPolicy:
    """A policy name (one of :data:`BUILTIN_POLICIES`) or a policy object -> the policy object.
    ``job_kind``: the kind of job it is for, which picks what ``"auto"`` means (None: a pipeline's)."""
    if isinstance(policy, RecoveryPolicy):
        return policy
    if not isinstance(policy, str):
        raise TypeError(f"policy must be a name ({sorted(BUILTIN_POLICIES)}) or a RecoveryPolicy, got {policy!r}")
    cls = AUTO_BY_KIND[job_kind] if policy == "auto" and job_kind is not None else BUILTIN_POLICIES.get(policy)
    if cls is None:
        raise ValueError(f"unknown recovery policy {policy!r}; known: {sorted(BUILTIN_POLICIES)}, or pass an "
                         "object implementing recovery.RecoveryPolicy")
    return cls()
