"""The ``ckpt.Checkpointer`` hook API in a real 3-process gloo DDP job.

DDP on 3 ranks: in every committed step each chunk is written by exactly one rank, every rank
writes some, the stored values equal the model and optimizer at the save bit for bit, and no
collective is called from Checkpointer construction until ``wait()``/``close()`` returned (the
Python-level torch.distributed collectives, functional collectives and ProcessGroup methods are
counted; DDP's gradient all-reduce runs in C++ and is not seen).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

import ckpt
from ckpt import format as fmt

from ._checks import assert_bitexact, assert_each_chunk_written_once, chunk_writers, not_bits
from ._multiproc import run_distributed
from .test_checkpointer_processes import CollectiveCounter, DataPosition

DDP_WORLD = 3
DDP_STEPS = 6  # checkpoints at 2, 4, 6


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(7, 13)
        self.norm = nn.LayerNorm(13)
        self.b = nn.Linear(13, 10)
        self.c = nn.Linear(10, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(F.relu(self.b(self.norm(self.a(x)))))


def named_state(net: nn.Module, optim: torch.optim.Optimizer) -> dict:
    """Model and optimizer state keyed by parameter name, copied (no collective)."""
    names = {p: n for n, p in net.named_parameters()}
    return {
        "model": {k: v.detach().clone() for k, v in net.state_dict().items()},
        "optim": {names[p]: {k: v.detach().clone() for k, v in s.items()} for p, s in optim.state.items()},
        "lr": [g["lr"] for g in optim.param_groups],
    }


def ddp_worker(rank: int, world: int, url: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    net = Net()
    model = DDP(net)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    data = DataPosition(rank, world)
    state = {"model": model, "optim": optim, "data": data}
    per = 2
    counter = CollectiveCounter().install()
    refs: dict[int, dict] = {}
    try:
        counter.phase = "construct"
        ckptr = ckpt.Checkpointer(url, every_n_steps=2, keep_last=None, max_chunk_bytes=128)
        counter.phase = "train"
        ckptr.attach(optim)
        for step in range(1, DDP_STEPS + 1):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(per * world, 7, generator=g), torch.randn(per * world, 5, generator=g)
            optim.zero_grad()
            F.mse_loss(model(x[rank * per : (rank + 1) * per]), y[rank * per : (rank + 1) * per]).backward()
            optim.step()  # DDP averaged the gradients: the replicas stay identical
            data.advance(per)
            counter.phase = "save"
            handle = ckptr.save(step, state)
            counter.phase = "train"
            if handle is not None:
                refs[step] = {**named_state(net, optim), "data": data.state_dict()}
        counter.phase = "wait"
        ckptr.wait()
        ckptr.close()
        counter.phase = "done"
    finally:
        counter.uninstall()
    status = ckptr.status()
    assert status.last_committed == DDP_STEPS and status.failed == 0 and status.errors == (), status
    construct = [c for c in counter.calls if c[0] == "construct"]
    assert construct and all(c[1] == threading.main_thread().name for c in construct), construct
    bad = counter.where(phases=("train", "save", "wait"), other_threads=True)
    assert not bad, f"rank {rank}: collectives between Checkpointer construction and wait()/close(): {bad}"
    return {"refs": refs, "construct": construct}


def test_ddp_checkpointer_writes_each_chunk_once_without_collectives(tmp_path) -> None:
    url = str(tmp_path / "run")
    results = run_distributed(ddp_worker, DDP_WORLD, url, tmp_path=tmp_path)
    # The counter sees the library's collectives: construction makes exactly one (the run id).
    assert all(len(r["construct"]) == 1 for r in results), [r["construct"] for r in results]
    storage = ckpt.open_storage(url)
    steps = ckpt.committed_steps(storage)
    assert steps == [2, 4, 6]
    writers = tuple(fmt.writer_name(r) for r in range(DDP_WORLD))
    for step in steps:
        manifest, _ = assert_each_chunk_written_once(url, step)
        assert manifest.writers == writers
        assert any(spec.num_chunks > 1 for spec in manifest.arrays.values())  # small chunks: several per array
        # Replicated tensors: one replica writes each chunk, and the writes spread over all ranks.
        _, owners = chunk_writers(url, step)
        per_writer = {w: sum(1 for ws in owners.values() if w in ws) for w in writers}
        assert all(n > 0 for n in per_writer.values()), f"step {step}: chunks per writer {per_writer}"
        for w in writers:
            assert fmt.read_fragment(storage, step, w).save_id == manifest.save_id

        # The stored state is the state at the save, bit for bit; each rank's values are its own.
        ref = results[0]["refs"][step]
        for r in range(1, DDP_WORLD):  # replicas really are identical
            for k, t in results[r]["refs"][step]["model"].items():
                assert_bitexact(t, ref["model"][k], f"rank {r} step {step} {k}")
        tree = {
            "model": {k: not_bits(t) for k, t in ref["model"].items()},
            "optim": {"state": {n: {k: not_bits(t) for k, t in s.items()} for n, s in ref["optim"].items()},
                      "param_groups": None},
            "data": None,
        }
        assert ckpt.load(tree, url, step=step) == step
        for k, t in ref["model"].items():
            assert_bitexact(tree["model"][k], t, f"step {step}: model {k}")
        for n, s in ref["optim"].items():
            for k, t in s.items():
                assert_bitexact(tree["optim"]["state"][n][k], t, f"step {step}: optim {n} {k}")
        assert [g["lr"] for g in tree["optim"]["param_groups"]] == ref["lr"]
        assert tree["data"] == ref["data"] == {"rank": 0, "world": DDP_WORLD, "consumed": 2 * step}
        for r in range(1, DDP_WORLD):
            assert fmt.values_by_writer(storage, manifest)[writers[r]] == {"data": results[r]["refs"][step]["data"]}
