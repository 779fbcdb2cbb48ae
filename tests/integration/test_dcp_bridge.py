"""Stock ``dcp.save``/``dcp.load``/``dcp.async_save`` through ``ckpt.dcp.Writer``/``Reader``,
on 1 and 4 gloo ranks, both ways: FSDP2, TP x FSDP2 (``_StridedShard``), thread and process
async saves on the budgeted host stager; a step exported as a DCP folder read by stock
``dcp.load``; a stock DCP folder imported with ``ckpt import dcp``.

One process writes a plain model's state (1 rank), four load it into FSDP2 (DCP's planner
reshards); the four then save with the Writer, load back with the Reader, load an exported
folder with stock DCP, and save and load a 2-D (dp x tp) state. The test process checks what
landed: ``ckpt.read`` equals the gathered tensors, a zarr reader opens the step, the CLI
verifies it, and an import of DCP's own folder is bit-exact.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import ckpt
from ckpt.cli import main as cli

from ._checks import assert_bitexact
from ._multiproc import run_distributed

warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
REPO = Path(__file__).resolve().parents[2]


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(13, 27)  # Shard(0) rows over 4: 7,7,7,6
        self.up = nn.Linear(27, 19)
        self.out = nn.Linear(19, 5)  # 2,2,1,0: rank 3 holds nothing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.up(self.inp(x))))


def _trained(model: nn.Module, lr: float = 1e-2) -> torch.optim.Optimizer:
    optim = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(7)
    F.mse_loss(model(torch.randn(8, 13, generator=g)), torch.randn(8, 5, generator=g)).backward()
    optim.step()
    return optim


def _state(model: nn.Module, optim: torch.optim.Optimizer) -> dict:
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optim), "step": 7,
            "sched": {"last_epoch": 7, "base_lrs": [0.01]}, "kind": torch.bfloat16}


def _zeros(sd):
    if isinstance(sd, dict):
        return {k: _zeros(v) for k, v in sd.items()}
    if isinstance(sd, DTensor):
        return DTensor.from_local(torch.zeros_like(sd.to_local()), sd.device_mesh, sd.placements, shape=sd.shape,
                                  stride=sd.stride())
    if isinstance(sd, torch.Tensor):
        return torch.zeros_like(sd)
    return copy.deepcopy(sd)  # DCP's template: values keep their structure (DCP flattens into lists)


def _full(sd):
    if isinstance(sd, dict):
        return {k: _full(v) for k, v in sd.items()}
    if isinstance(sd, list):
        return [_full(v) for v in sd]
    if isinstance(sd, DTensor):
        return sd.full_tensor()
    if isinstance(sd, torch.Tensor):
        return sd.detach().clone()
    return sd


def _assert_same(a, b, what: str) -> None:
    if isinstance(b, dict):
        assert isinstance(a, dict) and a.keys() == b.keys(), f"{what}: keys {sorted(a)} != {sorted(b)}"
        for k in b:
            _assert_same(a[k], b[k], f"{what}/{k}")
    elif isinstance(b, torch.Tensor):
        a = a.to_local() if isinstance(a, DTensor) else a
        b = b.to_local() if isinstance(b, DTensor) else b
        assert_bitexact(a, b, what)
    else:
        assert a == b, f"{what}: {a!r} != {b!r}"


# ---------------------------------------------------------------------------------------------
# One rank: Writer (sync, async thread and process modes, host stager), Reader


def one_rank_worker(rank: int, world: int, run: str) -> dict:
    torch.manual_seed(0)
    model = Block()
    state = _state(model, _trained(model))
    dcp.save(state, storage_writer=ckpt.dcp.Writer(run, step=1, layout="packs"))
    stager = ckpt.dcp.HostStager(4 << 20, background=True)
    resp = dcp.async_save(state, storage_writer=ckpt.dcp.Writer(run, step=3), async_stager=stager,
                          async_checkpointer_type=AsyncCheckpointerType.THREAD)
    resp.staging_completion.result()
    resp.upload_completion.result()
    for step in (1, 2, 3):  # step 2: written in DCP's process mode, by the script
        into = _zeros(state)
        dcp.load(into, storage_reader=ckpt.dcp.Reader(run, step=step, allow_pickle=True))
        _assert_same(into, state, f"step {step}")
    with pytest.raises(CheckpointException, match="allow_pickle"):  # the opaque value needs the opt-in
        dcp.load(_zeros(state), storage_reader=ckpt.dcp.Reader(run, step=1))
    stager.close()
    return _full(state)


# ---------------------------------------------------------------------------------------------
# Four ranks: FSDP2 and TP x FSDP2


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Linear(12, 20)
        self.w2 = nn.Linear(20, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.relu(self.w1(x)))


def four_ranks_worker(rank: int, world: int, run: str, exported: str, stock: str, one_rank: dict) -> dict:
    torch.manual_seed(1)
    mesh = init_device_mesh("cpu", (world,))
    model = Block()
    for m in (model.inp, model.up, model.out, model):
        fully_shard(m, mesh=mesh)
    state = _state(model, _trained(model, lr=0.5))
    # 1 -> 4: the one-rank step read into FSDP2 shards by DCP's planner.
    into = _zeros(state)
    dcp.load(into, storage_reader=ckpt.dcp.Reader(run, step=1, allow_pickle=True))
    _assert_same(_full(into), one_rank, "one-rank step loaded on 4 ranks")
    # 4 -> storage -> 4, and DCP's own folder for the import check.
    dcp.save(state, storage_writer=ckpt.dcp.Writer(run, step=10))
    dcp.save(state, checkpoint_id=stock)
    into = _zeros(state)
    dcp.load(into, storage_reader=ckpt.dcp.Reader(run, allow_pickle=True))  # the newest: step 10
    _assert_same(into, state, "FSDP2 state through Writer and Reader")
    # An exported folder read by stock dcp.load.
    if rank == 0:
        ckpt.dcp.export_dcp(ckpt.open_storage(run), 10, exported)
    dist.barrier()
    into = _zeros(state)
    dcp.load(into, checkpoint_id=exported)
    _assert_same(into, state, "FSDP2 state from the exported folder")
    full10 = _full(state)
    # 2-D: tensor parallel inside, FSDP2 across: _StridedShard placements.
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(2)
    mlp = parallelize_module(MLP(), mesh2["tp"], {"w1": ColwiseParallel(), "w2": RowwiseParallel()})
    fully_shard(mlp, mesh=mesh2["dp"])
    sd2 = {"model": get_model_state_dict(mlp)}
    placements = [type(p).__name__ for p in sd2["model"]["w1.weight"].placements]
    assert placements == ["_StridedShard", "Shard"], placements
    dcp.save(sd2, storage_writer=ckpt.dcp.Writer(run, step=20, layout="chunks"))
    into = _zeros(sd2)
    dcp.load(into, storage_reader=ckpt.dcp.Reader(run, step=20))
    _assert_same(into, sd2, "TP x FSDP2 state")
    full20 = _full(sd2)
    return {"step10": full10, "step20": full20} if rank == 0 else {}


def test_dcp_save_load_one_and_four_ranks(tmp_path):
    run, exported, stock = str(tmp_path / "run"), str(tmp_path / "exported"), str(tmp_path / "stock")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-m", "tests.integration._dcp_process_save", run, str(tmp_path / "store")],
                   env=env, cwd=REPO, check=True, timeout=240)
    one = run_distributed(one_rank_worker, 1, run, tmp_path=tmp_path, timeout=240)[0]
    got = run_distributed(four_ranks_worker, 4, run, exported, stock, one, tmp_path=tmp_path, timeout=240)[0]

    storage = ckpt.open_storage(run)
    assert ckpt.committed_steps(storage) == [1, 2, 3, 4, 10, 20]
    layouts = {s: ckpt.read_manifest(storage, s).layout for s in (1, 2, 10, 20)}
    assert layouts == {1: "packs", 2: "shards", 10: "shards", 20: "chunks"}
    m10 = ckpt.read_manifest(storage, 10)
    assert m10.writers == tuple(ckpt.format.writer_name(r) for r in range(4))
    assert m10.values["optim/param_groups"][0]["lr"] == 0.5  # a ckpt value, not DCP's pickled leaves
    assert m10.values["sched"] == {"last_epoch": 7, "base_lrs": [0.01]}
    assert m10.values["kind"]["__ckpt__"] == "torch"  # a dtype: weights-only reads it, JSON cannot hold it

    # ckpt reads what DCP wrote, without a template; so does a zarr reader; the CLI verifies it.
    read = ckpt.read(run, step=10, allow_pickle=True)
    _assert_same(read["model"], got["step10"]["model"], "ckpt.read of step 10")
    _assert_same(read["optim"]["state"], got["step10"]["optim"]["state"], "ckpt.read of the optimizer")
    assert read["kind"] is torch.bfloat16
    _assert_same(ckpt.read(run, step=20)["model"], got["step20"]["model"], "ckpt.read of the 2-D step")
    _assert_same(ckpt.read(run, step=2, allow_pickle=True)["model"], one["model"], "process-mode async step")
    ts = pytest.importorskip("tensorstore")
    arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{run}/{ckpt.format.step_dir(10)}/"
                                                                              "model/inp.weight"}}).result()
    assert_bitexact(torch.from_numpy(arr.read().result()), got["step10"]["model"]["inp.weight"], "tensorstore")
    assert cli(["verify", run, "--all"]) == 0

    # DCP's own folder, imported: bit-exact, values as the Writer stores them.
    assert cli(["import", "dcp", stock, str(tmp_path / "imported"), "--step", "5"]) == 0
    imported = ckpt.read(str(tmp_path / "imported"), allow_pickle=True)
    _assert_same(imported["model"], got["step10"]["model"], "imported DCP folder")
    _assert_same(imported["optim"]["state"], got["step10"]["optim"]["state"], "imported optimizer state")
    assert imported["sched"] == {"last_epoch": 7, "base_lrs": [0.01]} and imported["kind"] is torch.bfloat16
