"""How each stage trains: AdamW (no decay on norms and the embedding) under a linear warmup
and cosine decay."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    total_steps: int = 1000
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    batch_size: int = 16
    micro_batches: int = 2
    data_seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size % self.micro_batches:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of micro_batches ({self.micro_batches})")
        if self.total_steps < 1 or self.warmup_steps < 0:
            raise ValueError("total_steps must be >= 1 and warmup_steps >= 0")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def build_optimizer(stage: nn.Module, cfg: TrainConfig, *, step: int = 0) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no decay on norms and the embedding) and a warmup+cosine schedule positioned at ``step``."""
    decay = [p for n, p in stage.named_parameters() if p.dim() >= 2 and not n.startswith("embed.")]
    no_decay = [p for n, p in stage.named_parameters() if not (p.dim() >= 2 and not n.startswith("embed."))]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    set_schedule_step(sched, step)
    return opt, sched


def set_schedule_step(sched: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Position ``sched`` at ``step``: the learning rate that step trains with (after a rollback too)."""
    sched.last_epoch = step
    for g, base in zip(sched.optimizer.param_groups, sched.base_lrs):
        g["lr"] = base * sched.lr_lambdas[0](step)
    sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]
