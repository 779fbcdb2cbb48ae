"""The built-in recovery policies by name: what ``policy=`` of ``recovery.run`` and
``RayPipeline.run`` accepts besides a :class:`recovery.policy.RecoveryPolicy` object.

``"reload"`` (:class:`recovery.policy.ReloadPolicy`) recovers a data-parallel job;
``"neighbor_average"`` and ``"auto"`` (:mod:`recovery.checkfree`) rebuild lost pipeline stages
and so need a pipeline job (:class:`recovery.pipeline.RayPipeline`).
"""

from __future__ import annotations

from .checkfree import AutoPolicy, NeighborAveragePolicy
from .policy import RecoveryPolicy, ReloadPolicy

BUILTIN_POLICIES: dict[str, type[RecoveryPolicy]] = {
    "reload": ReloadPolicy,
    "neighbor_average": NeighborAveragePolicy,
    "auto": AutoPolicy,
}


def resolve_policy(policy: str | RecoveryPolicy) -> RecoveryPolicy:
    """A policy name (one of :data:`BUILTIN_POLICIES`) or a policy object -> the policy object."""
    if isinstance(policy, RecoveryPolicy):
        return policy
    if not isinstance(policy, str):
        raise TypeError(f"policy must be a name ({sorted(BUILTIN_POLICIES)}) or a RecoveryPolicy, got {policy!r}")
    cls = BUILTIN_POLICIES.get(policy)
    if cls is None:
        raise ValueError(f"unknown recovery policy {policy!r}; known: {sorted(BUILTIN_POLICIES)}, or pass an "
                         "object implementing recovery.RecoveryPolicy")
    return cls()
