"""ckpt.integrations.lightning: the CheckpointIO of single-device training, in process.

What is checked: a real Lightning checkpoint (loops, callbacks, schedulers, hyper-parameters,
optimizer state keyed by index) round-trips bit-exactly without pickling; a value JSON cannot
hold is refused with its path (and kept with allow_pickle); save_checkpoint copies no parameter
or optimizer tensor on the training thread, and the optimizer's next step waits so that the
snapshot holds the values at save time; ModelCheckpoint's top-k and last work on folders;
Trainer.fit(ckpt_path=...) resumes bit-exactly; importing without Lightning names the extra.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("lightning")

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

import ckpt
from ckpt.errors import UnsupportedValueError
from ckpt.integrations.lightning import CkptCheckpointIO

REPO = Path(__file__).resolve().parents[2]


class Net(pl.LightningModule):
    def __init__(
        self, width: int = 16, lr: float = 0.01, betas: tuple = (0.9, 0.99), note: object = None, val_losses: tuple = ()
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Linear(8, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.body(x), y)

    def validation_step(self, batch, batch_idx):
        scripted = self.hparams.val_losses
        loss = (
            torch.tensor(float(scripted[self.current_epoch]))
            if scripted
            else nn.functional.mse_loss(self.body(batch[0]), batch[1])
        )
        self.log("val_loss", loss)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, betas=self.hparams.betas)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)}


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16)


def _trainer(tmp: Path, io: CkptCheckpointIO, callbacks: list, **kw) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp,
        plugins=[io],
        callbacks=[io.callback, *callbacks],
        **kw,
    )


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8) if t.numel() else t


def _same(a, b, where="") -> None:
    """Equal values of the same types; tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(_bits(a), _bits(b)), where
        return
    if isinstance(a, dict):  # an OrderedDict (a state_dict) comes back as a dict
        assert isinstance(b, dict), where
        assert set(a) == set(b), f"{where}: {set(a) ^ set(b)}"
        for k in a:
            _same(a[k], b[k], f"{where}/{k}")
        return
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}/{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_a_lightning_checkpoint_round_trips_without_pickle(tmp_path):
    io = CkptCheckpointIO()
    mc = ModelCheckpoint(dirpath=tmp_path / "ckpts", monitor="val_loss", save_top_k=2, save_last=True)
    model = Net(note={"inf": float("inf"), "t": (1, None, "x"), 3: b"\x00\xff"})
    trainer = _trainer(tmp_path, io, [mc], max_epochs=2)
    trainer.fit(model, _data(), _data())
    checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
    assert checkpoint["optimizer_states"][0]["state"][0]["exp_avg"].numel() > 0  # keyed by parameter index
    assert any("/" in k for cb in checkpoint["callbacks"].values() for k in cb.get("best_k_models", {}))
    path = tmp_path / "epoch=1-step=8.ckpt"
    io.save_checkpoint(checkpoint, path)
    io.teardown()
    # A folder holding one committed step, the global step, readable without unpickling anything.
    assert ckpt.committed_steps(ckpt.open_storage(str(path))) == [checkpoint["global_step"]]
    assert "state_dict" in ckpt.read(str(path), allow_pickle=False)
    loaded = io.load_checkpoint(path)
    _same(checkpoint, loaded)
    assert io.load_checkpoint(path) is not loaded  # a fresh dict every time


def test_a_value_json_cannot_hold_is_refused_with_its_path_or_kept_with_allow_pickle(tmp_path):
    checkpoint = {
        "global_step": 3,
        "state_dict": {"w": torch.arange(4.0)},
        "hyper_parameters": {"data_dir": Path("/data/x"), "lr": 0.1},
    }
    with pytest.raises(UnsupportedValueError, match="hyper_parameters/data_dir"):
        CkptCheckpointIO().save_checkpoint(checkpoint, tmp_path / "a.ckpt")
    assert not (tmp_path / "a.ckpt").exists()  # refused before anything was written
    io = CkptCheckpointIO(allow_pickle=True)
    io.save_checkpoint(checkpoint, tmp_path / "b.ckpt")
    io.teardown()
    with pytest.raises(UnsupportedValueError, match="allow_pickle"):
        CkptCheckpointIO().load_checkpoint(tmp_path / "b.ckpt")
    _same(checkpoint, io.load_checkpoint(tmp_path / "b.ckpt"))


class _CopiesOf(TorchDispatchMode):
    """Records, on the thread it is entered on, every copy whose source is one of ``storages``."""

    def __init__(self, storages: set[int]) -> None:
        super().__init__()
        self.storages = storages
        self.copied: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        src = args[1] if name.startswith("copy_") else args[0] if name.startswith(("clone", "_to_copy")) else None
        if isinstance(src, torch.Tensor) and src.untyped_storage().data_ptr() in self.storages:
            self.copied.append(name)
        return func(*args, **(kwargs or {}))


def test_save_clones_nothing_on_the_training_thread_and_the_next_step_waits(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 256)).sum().backward()
    opt.step()
    io = CkptCheckpointIO()
    io.attach([opt])
    sd = opt.state_dict()
    checkpoint = {"global_step": 1, "state_dict": model.state_dict(), "optimizer_states": [sd]}
    expected = {
        "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
        "exp_avg": [s["exp_avg"].clone() for s in opt.state.values()],
    }
    live = {p.untyped_storage().data_ptr() for p in model.parameters()}
    live |= {t.untyped_storage().data_ptr() for s in opt.state.values() for t in s.values()}
    with _CopiesOf(live) as mode:
        io.save_checkpoint(checkpoint, tmp_path / "x.ckpt")
    assert mode.copied == []  # parameters and optimizer state are copied by the staging thread
    # The next update waits for that copy (after its closure: Lightning's forward and backward)
    ran = []

    def closure():
        ran.append(threading.current_thread().name)
        model.zero_grad()
        loss = model(torch.randn(4, 256)).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert ran == [threading.current_thread().name]
    io.teardown()
    loaded = io.load_checkpoint(tmp_path / "x.ckpt")
    _same(expected["state_dict"], loaded["state_dict"])
    _same(expected["exp_avg"], [s["exp_avg"] for s in loaded["optimizer_states"][0]["state"].values()])
    assert not torch.equal(model[0].weight, expected["state_dict"]["0.weight"])  # training went on


def _steps(path: Path) -> list[int]:
    return ckpt.committed_steps(ckpt.open_storage(str(path)))


def test_model_checkpoint_top_k_and_last_are_folders_and_removal_deletes_them(tmp_path):
    io = CkptCheckpointIO()
    dirpath = tmp_path / "ckpts"
    mc = ModelCheckpoint(dirpath=dirpath, monitor="val_loss", save_top_k=2, save_last=True, filename="{epoch}-{step}")
    trainer = _trainer(tmp_path, io, [mc], max_epochs=5)
    trainer.fit(Net(val_losses=(5.0, 3.0, 4.0, 1.0, 2.0)), _data(), _data())  # teardown waited for the writes
    kept = sorted(os.listdir(dirpath))
    assert kept == ["epoch=3-step=16.ckpt", "epoch=4-step=20.ckpt", "last.ckpt"], kept
    assert Path(mc.best_model_path).name == "epoch=3-step=16.ckpt"
    for name, step in (("epoch=3-step=16.ckpt", 16), ("epoch=4-step=20.ckpt", 20), ("last.ckpt", 20)):
        assert _steps(dirpath / name) == [step]
        assert sorted(os.listdir(dirpath / name)) == [f"{step:012d}"]  # the older steps of last.ckpt are gone
    best = io.load_checkpoint(mc.best_model_path)
    assert best["global_step"] == 16 and best["epoch"] == 3
    state = next(v for k, v in best["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert set(state["best_k_models"]) == {str(dirpath / "epoch=1-step=8.ckpt"), str(dirpath / "epoch=3-step=16.ckpt")}


def test_save_last_link_is_a_symlink_to_the_folder_and_removing_it_keeps_the_target(tmp_path):
    io = CkptCheckpointIO()
    dirpath = tmp_path / "ckpts"
    mc = ModelCheckpoint(dirpath=dirpath, save_top_k=1, save_last="link", filename="{epoch}-{step}")
    trainer = _trainer(tmp_path, io, [mc], max_epochs=2, limit_val_batches=0)
    trainer.fit(Net(), _data())
    assert sorted(os.listdir(dirpath)) == ["epoch=1-step=8.ckpt", "last.ckpt"]
    assert os.readlink(dirpath / "last.ckpt") == "epoch=1-step=8.ckpt"
    assert io.load_checkpoint(dirpath / "last.ckpt")["global_step"] == 8
    io.remove_checkpoint(dirpath / "last.ckpt")
    assert sorted(os.listdir(dirpath)) == ["epoch=1-step=8.ckpt"]
    assert _steps(dirpath / "epoch=1-step=8.ckpt") == [8]


def test_resume_through_fit_ckpt_path_is_bit_exact(tmp_path):
    def run(max_epochs: int, root: Path, ckpt_path: str | None = None) -> tuple[Net, pl.Trainer]:
        torch.manual_seed(1)
        model = Net()
        io = CkptCheckpointIO()
        mc = ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0)  # "last" finds root/last.ckpt
        trainer = _trainer(root, io, [mc], max_epochs=max_epochs, limit_val_batches=0)
        trainer.fit(model, _data(), ckpt_path=ckpt_path)
        return model, trainer

    whole, t_whole = run(4, tmp_path / "whole")
    run(2, tmp_path / "part")  # the interrupted run: stops after 2 epochs, last.ckpt at step 8
    assert _steps(tmp_path / "part" / "last.ckpt") == [8]
    resumed, t_resumed = run(4, tmp_path / "part", ckpt_path="last")
    assert t_resumed.global_step == t_whole.global_step == 16
    _same(whole.state_dict(), resumed.state_dict())
    _same(t_whole.optimizers[0].state_dict(), t_resumed.optimizers[0].state_dict())
    _same(
        t_whole.lr_scheduler_configs[0].scheduler.state_dict(), t_resumed.lr_scheduler_configs[0].scheduler.state_dict()
    )


def test_importing_without_lightning_names_the_extra_and_ckpt_never_imports_it():
    code = (
        "import sys; import ckpt, ckpt.integrations; assert 'lightning' not in sys.modules, 'imported'\n"
        "sys.modules['lightning'] = None\n"
        "try:\n    import ckpt.integrations.lightning\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "pip install 'ckpt[lightning]'" in out.stdout


def test_a_removal_right_after_the_save_of_the_same_path_runs_after_its_write(tmp_path):
    io = CkptCheckpointIO()
    checkpoint = {"global_step": 5, "state_dict": {"w": torch.randn(64, 64)}}
    io.save_checkpoint(checkpoint, tmp_path / "gone.ckpt")
    io.remove_checkpoint(tmp_path / "gone.ckpt")  # the write may still be staging or in flight
    io.save_checkpoint(checkpoint, tmp_path / "kept.ckpt")
    io.teardown()
    assert sorted(os.listdir(tmp_path)) == ["kept.ckpt"]
    _same(checkpoint, io.load_checkpoint(tmp_path / "kept.ckpt"))


def test_the_step_pre_hook_waits_after_a_closure_and_at_once_without_one():
    from ckpt.staging import step_pre_hook

    order: list[str] = []
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    opt.register_step_pre_hook(step_pre_hook(lambda: order.append(f"wait, p={p.detach().tolist()}")))

    def closure():
        order.append("forward+backward")
        p.grad = torch.ones(3)
        return torch.zeros(())

    opt.step(closure)
    opt.step()
    assert order[:2] == ["forward+backward", "wait, p=[1.0, 1.0, 1.0]"]  # after the closure, before the update
    assert len(order) == 3 and order[2].startswith("wait, p=[0.89")  # no closure: at once, before its update
    opt.step(closure=closure)  # Lightning's form
    assert len(order) == 5 and order[3] == "forward+backward" and order[4].startswith("wait, p=[0.79")


def test_a_file_written_by_torch_save_is_read_weights_only(tmp_path):
    checkpoint = {"global_step": 2, "state_dict": {"w": torch.arange(3.0)}, "loops": {"a": 1}}
    torch.save(checkpoint, tmp_path / "old.ckpt")
    _same(checkpoint, CkptCheckpointIO().load_checkpoint(tmp_path / "old.ckpt"))
    torch.save({"global_step": 2, "hp": Path("/x")}, tmp_path / "unsafe.ckpt")
    with pytest.raises(UnsupportedValueError, match="weights_only=True"):
        CkptCheckpointIO().load_checkpoint(tmp_path / "unsafe.ckpt")
