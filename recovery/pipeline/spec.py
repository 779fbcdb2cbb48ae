"""What a pipeline job is made of: the runtime's knobs (:class:`PipelineConfig`) and what the
caller gives it, the model cut into stages with how each trains and the data
(:class:`PipelineModel`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import RecoveryError


@dataclass(frozen=True, kw_only=True, slots=True)
class PipelineConfig:
    """A pipeline-parallel run on Ray: one actor process per stage."""

    seed: int = 0  # each stage's initial weights: PipelineModel.build_stage(index, seed=seed)
    checkpoint_url: str | None = None  # with checkpoint_every: what the reload policy rolls back to
    checkpoint_every: int = 0
    replicate_every: int = 1  # CheckFree+: edge layers copied to the neighbouring stage every N steps
    swap: bool = False  # CheckFree+: odd micro-batches run the edge stages' blocks in swapped order
    replicas: int = 1  # data-parallel replicas of every stage (the batch is split between them)
    auto_prior_steps: float = 10.0  # policy auto: steps to win back an averaging bump, until one is measured
    # policy auto: steps to win back a unit of the loss bump measured after a rebuild, until one is measured
    # (None: weigh auto_prior_steps instead); see recovery.checkfree.LossBumpTracker
    auto_prior_steps_per_bump: float | None = 44.0
    lr_scale: float = 1.1  # a rebuilt stage's learning rate, times its base
    norm: Literal["l2", "l2_squared"] = "l2"  # how neighbour averaging weighs the gradient norms
    actor_num_cpus: float = 0.25
    pg_timeout_s: float = 60.0
    step_timeout_s: float = 300.0
    spares: int = 0  # stage processes started ahead, idle: a failure takes one instead of starting a process

    def __post_init__(self) -> None:
        if self.checkpoint_every and not self.checkpoint_url:
            raise ValueError("checkpoint_every needs checkpoint_url")
        if self.replicate_every < 0 or self.checkpoint_every < 0:
            raise ValueError("replicate_every and checkpoint_every must be >= 0")
        if not (isinstance(self.spares, int) and self.spares >= 0):
            raise ValueError(f"PipelineConfig.spares must be an int >= 0, got {self.spares!r}")
        if not (isinstance(self.replicas, int) and self.replicas >= 1):
            raise ValueError(f"PipelineConfig.replicas must be an int >= 1, got {self.replicas!r}")
        if not (self.auto_prior_steps >= 0 and math.isfinite(self.auto_prior_steps)):
            raise ValueError(f"PipelineConfig.auto_prior_steps must be a finite number >= 0, got {self.auto_prior_steps!r}")
        k = self.auto_prior_steps_per_bump
        if k is not None and not (isinstance(k, (int, float)) and k >= 0 and math.isfinite(k)):
            raise ValueError(f"PipelineConfig.auto_prior_steps_per_bump must be None or a finite number >= 0, got {k!r}")
        if self.norm not in ("l2", "l2_squared"):
            raise ValueError(f"PipelineConfig.norm must be 'l2' or 'l2_squared', got {self.norm!r}")
        for name in ("lr_scale", "actor_num_cpus", "pg_timeout_s", "step_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"PipelineConfig.{name} must be a positive number, got {value!r}")


class PipelineModel(Protocol):
    """The model side of a pipeline job, given by the caller to :class:`RayPipeline` and
    shipped to every stage's process (so it must pickle, and its module be importable there).

    Stages must name their layers locally (``blocks.0`` in every stage, not a global layer
    index) so that neighbouring stages' state dicts line up for neighbour averaging. A stage's
    ``forward`` takes the step's inputs on the first stage, the previous stage's activations
    elsewhere, and gives the next stage's activations, or on the last stage the output that
    :meth:`loss` compares with the targets.
    """

    @property
    def num_stages(self) -> int: ...

    @property
    def micro_batches(self) -> int:
        """Micro-batches per step (GPipe): the batch is cut into this many equal parts."""

    @property
    def activation_shape(self) -> tuple[int, ...]:
        """The shape of one micro-batch's activations that a stage sends the next."""

    @property
    def grad_clip(self) -> float:
        """Each stage clips its gradient norm to this; the clipped norm weighs the averaging."""

    def build_stage(self, index: int, *, seed: int) -> nn.Module:
        """Stage ``index`` with initial weights from ``seed``."""

    def build_optimizer(self, stage: nn.Module, *, step: int) -> tuple[torch.optim.Optimizer,
                                                                      torch.optim.lr_scheduler.LRScheduler]:
        """The stage's optimizer and learning-rate schedule, positioned at ``step``. The
        schedule scales ``base_lrs`` (a rebuilt stage's boost is applied there)."""

    def set_schedule_step(self, scheduler: torch.optim.lr_scheduler.LRScheduler, step: int) -> None:
        """Position the schedule at ``step`` (after a reload rolled the stage back)."""

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs and targets of ``step``, a pure function of it (a rolled-back run redoes
        the same batches). Called on the first and the last stage only."""

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The last stage's loss of one micro-batch."""

    def edge_layers(self, stage: nn.Module) -> dict[str, torch.Tensor]:
        """The layers only an edge stage has (an embedding, an output layer), copied onto its
        neighbour for CheckFree+; detached copies."""


@runtime_checkable
class SwappablePipelineModel(PipelineModel, Protocol):
    """A :class:`PipelineModel` whose stages can run in CheckFree+'s swapped order
    (``PipelineConfig(swap=True)``): a stage's forward cut into its three parts, so that the
    first stage can embed, hand the activations to its partner's blocks, and run its own
    blocks after them (and the last stage likewise around its output layer). For every stage,
    ``head(s, blocks(s, embed(s, x)))`` (the parts it has) must equal ``s(x)``."""

    def embed(self, stage: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """The first stage's input layers (the embedding): inputs -> activations."""

    def blocks(self, stage: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """Any stage's blocks: activations -> activations."""

    def head(self, stage: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """The last stage's output layers: activations -> the output :meth:`loss` takes."""


@dataclass(frozen=True, slots=True)
class StageInit:
    """How a new stage process gets its state, fetched by itself from the processes that hold
    it (``ray.put`` there, ``ray.get`` here; the driver passes only the references).

    ``how``: ``"replica"`` (a surviving data-parallel replica's full state: weights, optimizer,
    schedule, step; bit for bit), ``"average"`` (CheckFree: ``sources`` are the previous and
    the next stage, weighed by ``grad_norms``), ``"copy"`` (one neighbour's blocks, and the
    lost edge stage's own layers from ``edge`` when given: CheckFree+), ``"random"``.
    """

    how: Literal["replica", "average", "copy", "random"]
    sources: tuple[Any, ...] = ()  # ray.ObjectRef of each source's state
    edge: Any = None  # ray.ObjectRef of the edge-layer replica the swap partner holds
    grad_norms: tuple[float, float] = (0.0, 0.0)
    seed: int = 0  # "random": the fresh weights' seed

    def __post_init__(self) -> None:
        need = {"replica": 1, "average": 2, "copy": 1, "random": 0}
        if self.how not in need:
            raise ValueError(f"StageInit.how must be one of {sorted(need)}, got {self.how!r}")
        if len(self.sources) != need[self.how]:
            raise ValueError(f"StageInit({self.how!r}) needs {need[self.how]} source(s), got {len(self.sources)}")


class StageLostError(RecoveryError, RuntimeError):
    """Stage processes of the pipeline died; ``ranks`` says which processes (rank
    ``replica * num_stages + stage``; the stage's index with one replica per stage) and
    ``stages`` which stages they belonged to. Call :meth:`RayPipeline.recover` with ``ranks``."""

    def __init__(self, stages: list[int], step: int, ranks: list[int] | None = None) -> None:
        ranks = list(stages) if ranks is None else list(ranks)
        super().__init__(f"stage(s) {stages} lost during step {step} (process rank(s) {ranks}); "
                         "recover them with RayPipeline.recover")
        self.stages, self.step, self.ranks = stages, step, ranks
