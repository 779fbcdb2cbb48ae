"""ckpt.integrations.torchtitan across world sizes: 2 FSDP2 ranks save, 1 process loads.

Two gloo processes train a small model under ``fully_shard`` (uneven ``Shard(0)``: 27 rows
and 5 rows over 2 ranks) with torchtitan's ``OptimizersContainer`` (Adam for biases, AdamW
for the rest), ``LRSchedulersContainer`` and a ``ParallelAwareDataloader`` per data-parallel
rank, then checkpoint step 2 with both our manager and torchtitan's own DCP manager, each into
its own folder. A 1-process job (unsharded model, other weights) then loads each folder with
its manager. Both loads equal the 2-rank job's gathered state bit for bit, and each other.

The data loader is excluded from the 1-process loads, with either manager: torchtitan's
``ParallelAwareDataloader`` refuses a state saved under another data-parallel degree.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import ckpt
from ckpt.restore import Tier
from tests.unit.test_integration_torchtitan import assert_same, build, ours, snapshot, theirs

from ._multiproc import run_distributed
from .test_agent_daemon import agents  # noqa: F401 - the fixture that starts and stops node agents
from .test_agent_daemon import pytestmark as needs_shared_memory

SAVED_STEP = 2


class ShardedNet(nn.Module):
    """As ``Net`` with a LayerNorm: no buffers that forward changes per rank (BatchNorm's
    running statistics differ between data-parallel ranks, so no single copy is "the" state)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(13, 27)
        self.norm = nn.LayerNorm(27)
        self.out = nn.Linear(27, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.nn.functional.gelu(self.norm(self.inp(x))))


def _save_on_two_ranks(rank: int, world: int, root: str) -> dict:
    torch.manual_seed(0)
    model = ShardedNet()
    mesh = init_device_mesh("cpu", (world,))
    for layer in (model.inp, model.out):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    job = build(seed=0, model=model, rank=rank, world=world)
    mine = job.build_manager(ours(f"{root}/ckpt"))
    dcp = job.build_manager(theirs(f"{root}/dcp"))
    for _ in range(SAVED_STEP):
        job.train_step(mine)
    saved = snapshot(job)  # DTensors gathered: the global state
    assert mine.save(SAVED_STEP) and dcp.save(SAVED_STEP)
    job.train_step(mine)  # training goes on while the snapshot is written
    mine.close()
    dcp.close()
    return saved


def _load_on_one_process(rank: int, world: int, root: str) -> dict:
    torch.manual_seed(123)
    loaded = {}
    for name, config in (
        ("ours", ours(f"{root}/ckpt", exclude_from_loading=["dataloader"])),
        ("dcp", theirs(f"{root}/dcp", exclude_from_loading=["dataloader"])),
    ):
        job = build(seed=9, model=ShardedNet())
        manager = job.build_manager(config)
        assert manager.load()
        loaded[name] = snapshot(job)
        manager.close()
    return loaded


def test_two_fsdp2_ranks_save_one_process_loads_bitexact_with_dcp_manager(tmp_path):
    root = str(tmp_path)
    saved = run_distributed(_save_on_two_ranks, 2, root, tmp_path=tmp_path)
    assert_same(saved[0]["model"], saved[1]["model"], "the ranks' gathered models")
    manifest = ckpt.read_manifest(ckpt.open_storage(f"{root}/ckpt"), SAVED_STEP)
    assert len(manifest.writers) == 2
    assert manifest.arrays["model/inp.weight"].shape == (27, 13)  # one array per tensor, global shape
    assert manifest.arrays["optimizer/state.inp.weight.exp_avg"].shape == (27, 13)
    [loaded] = run_distributed(_load_on_one_process, 1, root, tmp_path=tmp_path)
    for name in ("ours", "dcp"):
        for entry in ("model", "optimizer", "lr_scheduler", "train_state"):
            assert_same(loaded[name][entry], saved[0][entry], f"{name} {entry}")
    assert_same(
        {k: v for k, v in loaded["ours"].items() if k != "dataloader"},
        {k: v for k, v in loaded["dcp"].items() if k != "dataloader"},
        "ours vs dcp",
    )


@needs_shared_memory
def test_node_agent_from_the_config_takes_the_snapshots_and_serves_the_restore(agents, tmp_path):  # noqa: F811
    """``checkpoint.agent``: the node agent persists and commits the snapshots, and a restart on
    the node loads from the agent's memory."""
    agent = agents.start("titan")
    url = str(tmp_path / "run")
    job = build(seed=0)
    manager = job.build_manager(ours(url, agent=agent.address, interval=2, keep_latest_k=2))
    for step in range(1, 5):
        job.train_step(manager)
        manager.save(step)
    saved = snapshot(job)
    manager.close()
    assert ckpt.committed_steps(ckpt.open_storage(url)) == [2, 4]

    fresh = build(seed=3)
    manager = fresh.build_manager(ours(url, agent=agent.address))
    assert manager.load()
    assert_same(snapshot(fresh), saved, "restored through the agent")
    report = manager.checkpointer.last_restore
    assert report.step == 4 and report.served.get(Tier.AGENT_MEMORY, 0) > 0, report.to_dict()
    manager.close()
