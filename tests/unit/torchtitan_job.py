"""A small trainer built from torchtitan's real components, for the torchtitan adapter's tests
(see ``test_integration_torchtitan.py``): the model, optimizers, schedulers, data loader and
train state, how each manager is built, and exact comparisons of their states."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import IterableDataset
from torchtitan.components.checkpointer import BaseCheckpointManager, CheckpointManager
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.optimizer import LRSchedulersContainer, OptimizersContainer
from torchtitan.components.optimizer.optimizer import ParamGroupConfig

from ckpt.integrations.torchtitan import CkptCheckpointManager

ENTRIES = ("model", "optimizer", "lr_scheduler", "dataloader", "train_state")


# -- a torchtitan trainer's state, small ---------------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(13, 27)  # odd sizes: FSDP2's Shard(0) is uneven over 2 ranks
        self.norm = nn.BatchNorm1d(27)  # running statistics: buffers that forward changes
        self.out = nn.Linear(27, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.norm(self.inp(x))))


class Samples(IterableDataset):
    """A deterministic stream of (input, target) pairs; each data-parallel rank takes its share.
    It keeps its position as torchtitan's datasets do (``state_dict``/``load_state_dict``), so
    that a resumed loader goes on from there instead of replaying the stream."""

    def __init__(self, rank: int = 0, world: int = 1) -> None:
        self.rank, self.world = rank, world
        self.position = 0

    def __iter__(self):
        while True:
            i = self.position * self.world + self.rank
            g = torch.Generator().manual_seed(1000 + i)
            self.position += 1
            yield torch.randn(13, generator=g), torch.randn(5, generator=g)

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.position = state_dict["position"]


class TrainState:
    """What torchtitan's Trainer saves as ``train_state``."""

    def __init__(self) -> None:
        self.step = 0
        self.ntokens_seen = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "ntokens_seen": self.ntokens_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = state_dict["step"]
        self.ntokens_seen = state_dict["ntokens_seen"]


@dataclass
class Components:
    model: nn.Module
    optimizers: OptimizersContainer
    lr_schedulers: LRSchedulersContainer
    dataloader: ParallelAwareDataloader
    train_state: TrainState = field(default_factory=TrainState)
    batches: Any = None

    def build_manager(
        self, config: BaseCheckpointManager.Config, base_folder: str = "", sd_adapter: Any = None
    ) -> BaseCheckpointManager:
        """As torchtitan's Trainer builds its checkpointer."""
        return config.build(
            dataloader=self.dataloader,
            model_parts=[self.model],
            optimizers=self.optimizers,
            lr_schedulers=self.lr_schedulers,
            states={"train_state": self.train_state},
            sd_adapter=sd_adapter,
            base_folder=base_folder,
        )

    def train_step(self, manager: BaseCheckpointManager | None = None) -> None:
        """As torchtitan's Trainer.train_step: forward, backward, wait for staging, step."""
        if self.batches is None:
            self.batches = iter(self.dataloader)
        x, y = next(self.batches)
        loss = F.mse_loss(self.model(x), y)
        loss.backward()
        if manager is not None:
            manager.maybe_wait_for_staging()
        self.optimizers.step()
        self.lr_schedulers.step()
        self.optimizers.zero_grad()
        self.train_state.step += 1
        self.train_state.ntokens_seen += x.numel()


def build(seed: int, model: nn.Module | None = None, rank: int = 0, world: int = 1) -> Components:
    torch.manual_seed(seed)
    model = model or Net()
    optimizers = OptimizersContainer.Config(
        param_groups=[
            ParamGroupConfig(pattern=r"\.bias$", optimizer_name="Adam", optimizer_kwargs={"lr": 1e-2}),
            ParamGroupConfig(
                pattern=r".*",
                optimizer_name="AdamW",
                optimizer_kwargs={"lr": 3e-2, "betas": (0.9, 0.95), "weight_decay": 0.1},
            ),
        ],
        implementation="for-loop",
    ).build(model_parts=[model])
    lr_schedulers = LRSchedulersContainer.Config(warmup_steps=2, decay_type="cosine").build(
        optimizers=optimizers, training_steps=20
    )
    dataloader = ParallelAwareDataloader(Samples(rank, world), dp_rank=rank, dp_world_size=world, batch_size=4)
    return Components(model, optimizers, lr_schedulers, dataloader)


def local(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def snapshot(c: Components) -> dict[str, Any]:
    """Every entry as torchtitan saves it, tensors copied (DTensors gathered)."""

    def copy(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return local(x).detach().clone()
        if isinstance(x, dict):
            return {k: copy(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(copy(v) for v in x)
        return x

    return {
        "model": copy(c.model.state_dict()),
        "optimizer": copy(c.optimizers.state_dict()),
        "lr_scheduler": copy(c.lr_schedulers.state_dict()),
        "dataloader": copy(c.dataloader.state_dict()),
        "train_state": copy(c.train_state.state_dict()),
    }


def assert_same(actual: Any, expected: Any, what: str = "state") -> None:
    """Equal trees; tensors equal bit for bit (same dtype, shape, bytes)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{what}: {type(actual).__name__}, expected a tensor"
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, (
            f"{what}: {actual.dtype}{list(actual.shape)}, expected {expected.dtype}{list(expected.shape)}"
        )
        a = actual.detach().contiguous().reshape(-1).view(torch.uint8)
        e = expected.detach().contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(a, e), f"{what}: bytes differ: {actual.flatten()[:4]} vs {expected.flatten()[:4]}"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and sorted(actual) == sorted(expected), (
            f"{what}: keys {sorted(actual) if isinstance(actual, dict) else actual}, expected {sorted(expected)}"
        )
        for k in expected:
            assert_same(actual[k], expected[k], f"{what}[{k!r}]")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), f"{what}: {actual!r} vs {expected!r}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{what}[{i}]")
    else:
        assert type(actual) is type(expected) and actual == expected, f"{what}: {actual!r}, expected {expected!r}"


def ours(folder: Any, **options: Any) -> CkptCheckpointManager.Config:
    options = {"enable": True, "interval": 1, "keep_latest_k": 0, "last_save_model_only": False, **options}
    return CkptCheckpointManager.Config(folder=str(folder), **options)


def theirs(folder: Any, **options: Any) -> CheckpointManager.Config:
    options = {"enable": True, "interval": 1, "keep_latest_k": 0, "last_save_model_only": False, **options}
    return CheckpointManager.Config(folder=str(folder), **options)
