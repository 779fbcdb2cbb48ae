"""ckpt.integrations.lightning on 2 gloo ranks: DDP with CkptCheckpointIO, FSDP2 with
CkptModelParallelStrategy. One 2-rank job runs both (starting processes that import Lightning is
most of the cost); each test checks its part.

DDP: Lightning saves on global rank 0 alone; the CkptCheckpointIO there must not run a collective
(the other rank is not saving). Two epochs with ``save_top_k=1, save_last=True``: the remaining
folders hold rank 0's final model and optimizer state bit for bit.

FSDP2: every rank runs two ``Trainer.fit`` of a small FSDP2 model (``fully_shard`` on the data-parallel
mesh, AdamW, a StepLR) under :class:`CkptModelParallelStrategy`: 4 epochs without a stop, every
rank writing its shards of each checkpoint through ``ckpt.dcp.Writer``; then 4 epochs resumed
with ``fit(ckpt_path=<the checkpoint of epoch 1>)`` (``dcp.load`` through ``ckpt.dcp.Reader``).
The resumed run ends with the same global step, and the same full (gathered) model, optimizer
and scheduler state bit for bit, as the run that never stopped. ``ModelCheckpoint(save_top_k=1,
save_last=True)`` removes each previous checkpoint through the strategy: one folder and
``last.ckpt`` remain, each holding one committed step.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lightning")

from tests.helpers import assert_same
from tests.integration._multiproc import run_distributed


def _fit_fsdp2(rank: int, world: int, root: str) -> dict[str, Any]:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch import nn
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.utils.data import DataLoader, TensorDataset

    from ckpt.integrations.lightning import CkptModelParallelStrategy

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.save_hyperparameters({"width": 24, "lr": 0.01})
            self.body = nn.Sequential(nn.Linear(8, 24), nn.LayerNorm(24), nn.ReLU(), nn.Linear(24, 1))

        def configure_model(self) -> None:
            mesh = self.device_mesh["data_parallel"]
            fully_shard(self.body[0], mesh=mesh)
            fully_shard(self.body, mesh=mesh)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.body(x), y)

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)}

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)

    def fit(name: str, epochs: int, ckpt_path: str | None = None) -> tuple[Any, pl.Trainer]:
        os.environ.update(
            WORLD_SIZE=str(world),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            NODE_RANK="0",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT="29999",
        )
        torch.manual_seed(1)
        model = Net()
        top1 = ModelCheckpoint(dirpath=f"{root}/{name}", save_top_k=1, save_last=True, filename="{epoch}-{step}")
        # every epoch's checkpoint kept (another monitor: Lightning wants distinct callback state keys)
        every = ModelCheckpoint(
            dirpath=f"{root}/{name}-every", monitor="step", mode="max", save_top_k=-1, filename="{epoch}-{step}"
        )
        strategy = CkptModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=world,
            strategy=strategy,
            max_epochs=epochs,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[top1, every],
            default_root_dir=root,
        )
        trainer.fit(model, data, ckpt_path=ckpt_path)
        return model, trainer

    def full(model: Any, trainer: pl.Trainer) -> dict[str, Any]:
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0
        return {
            "model": get_model_state_dict(model, options=opts),
            "optim": get_optimizer_state_dict(model, trainer.optimizers[0], options=opts),
            "sched": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
            "step": trainer.global_step,
        }

    whole = full(*fit("whole", 4))
    # The checkpoint of epoch 1 is what a run stopped there leaves (training is deterministic).
    resumed = full(*fit("resumed", 4, ckpt_path=f"{root}/whole-every/epoch=1-step=8.ckpt"))
    return {"whole": whole, "resumed": resumed, "folders": sorted(os.listdir(f"{root}/whole"))}


def _both(rank: int, world: int, root: str) -> dict[str, Any]:
    return {"ddp": _fit_ddp(rank, world, f"{root}/ddp-run"), "fsdp2": _fit_fsdp2(rank, world, f"{root}/runs")}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """One 2-rank job for both tests: starting processes that import Lightning is most of the cost."""
    tmp = tmp_path_factory.mktemp("lightning2")
    return tmp, run_distributed(_both, 2, str(tmp), tmp_path=tmp, timeout=400)


def test_fsdp2_model_parallel_strategy_resumes_bit_exactly_through_ckpt_dcp(two_ranks):
    import ckpt

    tmp_path, out = two_ranks
    r0 = out[0]["fsdp2"]
    assert r0["resumed"]["step"] == r0["whole"]["step"] == 16  # 4 batches of 8 per rank and epoch
    assert_same(r0["whole"], r0["resumed"])
    assert r0["folders"] == ["epoch=3-step=16.ckpt", "last.ckpt"]  # top-1 removed the older ones through the strategy
    for name, step in (
        ("whole/epoch=3-step=16.ckpt", 16),
        ("whole/last.ckpt", 16),
        ("whole-every/epoch=1-step=8.ckpt", 8),
    ):
        path = tmp_path / "runs" / name
        assert ckpt.committed_steps(ckpt.open_storage(str(path))) == [step]
        assert os.listdir(path) == [f"{step:012d}"]
    values = ckpt.read(str(tmp_path / "runs" / "whole" / "last.ckpt"), include=["hyper_parameters", "global_step"])
    assert values == {"hyper_parameters": {"width": 24, "lr": 0.01}, "global_step": 16}


def _fit_ddp(rank: int, world: int, root: str) -> dict[str, Any]:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from ckpt.integrations.lightning import CkptCheckpointIO

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.body(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.01)

    os.environ.update(
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="29999",
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    torch.manual_seed(1)
    model = Net()
    io = CkptCheckpointIO()
    mc = ModelCheckpoint(dirpath=f"{root}/ddp", save_top_k=1, save_last=True, filename="{epoch}-{step}")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy="ddp",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[io],
        callbacks=[io.callback, mc],
        default_root_dir=root,
    )
    trainer.fit(model, DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8))
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optim": trainer.optimizers[0].state_dict(),
        "step": trainer.global_step,
    }


def test_ddp_saves_on_rank_zero_alone_without_a_collective(two_ranks):
    from ckpt.integrations.lightning import CkptCheckpointIO

    tmp, out = two_ranks
    r0, r1 = out[0]["ddp"], out[1]["ddp"]
    tmp_path = tmp / "ddp-run"
    assert r0["step"] == r1["step"] == 8
    assert sorted(os.listdir(tmp_path / "ddp")) == ["epoch=1-step=8.ckpt", "last.ckpt"]
    for name in ("epoch=1-step=8.ckpt", "last.ckpt"):
        loaded = CkptCheckpointIO().load_checkpoint(tmp_path / "ddp" / name)
        assert_same(r0["model"], dict(loaded["state_dict"]))
        assert_same(r0["optim"], loaded["optimizer_states"][0])
        assert loaded["global_step"] == 8
