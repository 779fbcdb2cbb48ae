"""The demo model as a pipeline job's model side: what :class:`recovery.pipeline.RayPipeline`
asks of its caller (:class:`recovery.pipeline.PipelineModel`)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .data import TextData
from .model import ModelConfig, Stage
from .train import TrainConfig, build_optimizer, set_schedule_step


@dataclass(frozen=True, kw_only=True)
class TextPipeline:
    """The LLaMA-style :class:`Stage` s trained on ``corpus_bytes`` of the standard library's
    sources. Shipped to every stage's process; the text is read there, on first use, by the
    first and last stage only."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    corpus_bytes: int = 1 << 20

    @property
    def num_stages(self) -> int:
        return self.model.num_stages

    @property
    def micro_batches(self) -> int:
        return self.train.micro_batches

    @property
    def activation_shape(self) -> tuple[int, ...]:
        return (self.train.batch_size // self.train.micro_batches, self.model.seq_len, self.model.dim)

    @property
    def grad_clip(self) -> float:
        return self.train.grad_clip

    def build_stage(self, index: int, *, seed: int) -> Stage:
        return Stage(self.model, index, seed=seed)

    def build_optimizer(self, stage: nn.Module, *, step: int) -> tuple[torch.optim.Optimizer,
                                                                      torch.optim.lr_scheduler.LambdaLR]:
        return build_optimizer(stage, self.train, step=step)

    def set_schedule_step(self, scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
        set_schedule_step(scheduler, step)

    @functools.cached_property
    def data(self) -> TextData:
        return TextData.from_stdlib(self.corpus_bytes)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.batch(step, self.train.batch_size, self.model.seq_len, seed=self.train.data_seed)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))

    def edge_layers(self, stage: nn.Module) -> dict[str, torch.Tensor]:
        return stage.edge_layers()

    # The stage's forward in parts, for CheckFree+'s swapped order (a SwappablePipelineModel).
    def embed(self, stage: Stage, inputs: torch.Tensor) -> torch.Tensor:
        return stage.embed_tokens(inputs)

    def blocks(self, stage: Stage, h: torch.Tensor) -> torch.Tensor:
        return stage.run_blocks(h)

    def head(self, stage: Stage, h: torch.Tensor) -> torch.Tensor:
        return stage.logits(h)
