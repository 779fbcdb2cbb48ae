"""Recovery of a lost pipeline stage without rollback: CheckFree and CheckFree+.

Blagoev, Ersoy, Chen, "All is Not Lost: LLM Recovery without Checkpoints" (2025). A lost
interior stage ``i`` is rebuilt from its two live neighbours, layer by layer::

    W_i <- (a * W_{i+1} + b * W_{i-1}) / (a + b),   a = f(|g_{i+1}|) + eps,  b = f(|g_{i-1}|) + eps

where ``|g|`` is a neighbour's gradient norm of the last step and ``f`` is the identity (the
published code: norms taken after ``clip_grad_norm_``) or the square (one reading of the paper's
text); :class:`NeighborAverageConfig` picks. The rebuilt stage starts with a fresh optimizer and
a learning rate scaled by ``lr_scale``; every surviving stage keeps its live weights and
optimizer state. CheckFree+ covers the first and last stage: their (de)embedding layers are
replicated on the neighbouring stage, which (trained with swapped execution order on alternate
micro-batches) stands in for the lost stage's blocks, so the stage is restored by copy.

The method is pure tensor arithmetic and logic (``rule``, ``plan``: no processes, no Ray, no
I/O); ``policy`` holds the recovery policies that drive a pipeline job with it. The pipeline
runtime (:class:`recovery.pipeline.RayPipeline`) calls :func:`plan_recovery` to learn what each
lost stage needs, :class:`NeighborAverage` / :func:`copy_from_neighbor` to build the new
stage's state dict, :func:`prepare_rebuilt_optimizer` in the new stage process, and asks the
policy to choose between ``reload`` and rebuilding (``auto``: :func:`decide_auto`, with a
reason to log).
"""

from .plan import (
    AutoDecision,
    AutoInputs,
    LossBumpTracker,
    RecoveryAction,
    StageRecovery,
    decide_auto,
    execution_order,
    plan_recovery,
    swap_partner,
    worth_probing,
)
from .policy import STRATEGIES, AutoPolicy, NeighborAveragePolicy, PipelineJob, StageRecoveryPolicy, stage_policy
from .rule import (
    NeighborAverage,
    NeighborAverageConfig,
    copy_from_neighbor,
    grad_norm,
    prepare_rebuilt_optimizer,
    restore_schedule_base,
)

__all__ = [
    "STRATEGIES",
    "AutoDecision",
    "AutoInputs",
    "AutoPolicy",
    "LossBumpTracker",
    "NeighborAverage",
    "NeighborAverageConfig",
    "NeighborAveragePolicy",
    "PipelineJob",
    "RecoveryAction",
    "StageRecovery",
    "StageRecoveryPolicy",
    "copy_from_neighbor",
    "decide_auto",
    "execution_order",
    "grad_norm",
    "plan_recovery",
    "prepare_rebuilt_optimizer",
    "restore_schedule_base",
    "stage_policy",
    "swap_partner",
    "worth_probing",
]
