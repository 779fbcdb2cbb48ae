"""The ``ckpt.Checkpointer`` hook API in real multi-process gloo jobs.

1. FSDP2 4 -> 2 ranks. A small transformer-ish model (odd layer sizes, so ``fully_shard``'s
   Shard(0) is uneven and some ranks hold empty shards; LayerNorms; residual MLPs) with AdamW,
   a StepLR schedule, ``ckpt.RNGState()`` and a per-rank data position, trained on 4 ranks with
   a ``Checkpointer(every_n_steps=2)`` attached. Right after the last checkpoint's ``save`` the
   4-rank job gathers its full state as the reference. A fresh 2-rank job builds the model with
   another seed and learning rate, ``restore`` returns the step after it, and the full
   parameters, the AdamW state, the schedule, each rank's RNG state and data position equal the
   reference bit for bit. The next step's loss and parameters equal the 4-rank job's up to
   floating-point reduction order (see ``test_fsdp2_processes``: 4 ranks average 2 samples each
   and gradients over 4 ranks, 2 ranks 4 samples over 2; the same sums in other orders, float32
   relative error ~1e-7, so rtol 1e-5 / atol 1e-6, orders of magnitude below one AdamW update).
   The 2-rank job then keeps checkpointing into the same run.

DDP on 3 ranks (each chunk written once, no collective): ``test_checkpointer_ddp_processes``.
A rank dying while it persists: ``test_checkpointer_dying_rank``.
"""

from __future__ import annotations

import random
import threading
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import ckpt
from ckpt import format as fmt

from ._checks import assert_bitexact, assert_each_chunk_written_once
from ._multiproc import run_distributed

# ---------------------------------------------------------------------------------------------
# Shared pieces


class DataPosition:
    """A per-rank data loader position (which rank read how many samples): a stateful object."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world, self.consumed = rank, world, 0
        self.loaded: dict | None = None

    def advance(self, n: int) -> None:
        self.consumed += n

    def state_dict(self) -> dict:
        return {"rank": self.rank, "world": self.world, "consumed": self.consumed}

    def load_state_dict(self, s: dict) -> None:
        self.loaded = dict(s)
        self.consumed = s["consumed"]


def draw_per_rank_randomness(rank: int) -> None:
    """Each rank draws a different amount from every generator (shuffling, augmentation): the
    RNG states of the ranks diverge, so restoring one rank's state into another shows."""
    torch.rand(rank + 1)
    for _ in range(rank + 1):
        random.random()
    np.random.rand(rank + 1)


def rng_snapshot() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss)}


def assert_rng_equal(now: dict, want: dict, what: str) -> None:
    assert_bitexact(now["torch"], want["torch"], f"{what}: torch RNG state")
    assert now["python"] == want["python"], f"{what}: Python RNG state differs"
    (k1, keys1, *rest1), (k2, keys2, *rest2) = now["numpy"], want["numpy"]
    assert k1 == k2 and rest1 == rest2, f"{what}: NumPy RNG state differs"
    assert_bitexact(keys1, keys2, f"{what}: NumPy RNG keys")


_COLLECTIVES = (
    "broadcast", "all_reduce", "reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "gather",
    "scatter", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "all_to_all",
    "all_to_all_single", "barrier", "monitored_barrier", "broadcast_object_list", "all_gather_object",
    "gather_object", "scatter_object_list", "send", "recv", "isend", "irecv", "batch_isend_irecv",
    "send_object_list", "recv_object_list", "all_reduce_coalesced", "all_gather_coalesced",
)
_FUNCTIONAL = ("all_reduce", "all_gather_tensor", "all_gather_into_tensor_coalesced", "reduce_scatter_tensor",
               "all_reduce_coalesced", "broadcast", "all_to_all_single", "all_gather_single")
_PG_METHODS = (
    "broadcast", "allreduce", "allreduce_coalesced", "reduce", "allgather", "_allgather_base",
    "allgather_coalesced", "allgather_into_tensor_coalesced", "all_gather_single", "gather", "scatter",
    "reduce_scatter", "_reduce_scatter_base", "reduce_scatter_tensor_coalesced", "reduce_scatter_single",
    "alltoall", "alltoall_base", "all_to_all_single", "send", "recv", "recv_anysource", "barrier",
    "monitored_barrier",
)


class CollectiveCounter:
    """Counts calls of torch.distributed collectives made from Python, with the phase of the
    training loop (set by the test) and the calling thread. Nested calls (a collective that calls
    another) count once."""

    def __init__(self) -> None:
        self.phase = "setup"
        self.calls: list[tuple[str, str, str]] = []  # (phase, thread name, function)
        self._depth = threading.local()
        self._undo: list[tuple[Any, str, Any]] = []

    def _wrap(self, name: str, fn: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(self._depth, "n", 0)
            if depth == 0:
                self.calls.append((self.phase, threading.current_thread().name, name))
            self._depth.n = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth.n = depth

        return counted

    def install(self) -> CollectiveCounter:
        import torch.distributed._functional_collectives as funcol
        import torch.distributed.distributed_c10d as c10d

        targets = [(dist, _COLLECTIVES), (c10d, _COLLECTIVES), (funcol, _FUNCTIONAL), (dist.ProcessGroup, _PG_METHODS)]
        for owner, names in targets:
            for name in names:
                fn = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
                if fn is None:
                    continue
                self._undo.append((owner, name, fn))
                setattr(owner, name, self._wrap(f"{getattr(owner, '__name__', owner)}.{name}", fn))
        return self

    def uninstall(self) -> None:
        for owner, name, fn in reversed(self._undo):
            setattr(owner, name, fn)
        self._undo.clear()

    def where(self, *, phases: tuple[str, ...] = (), other_threads: bool = False) -> list[tuple[str, str, str]]:
        main = threading.main_thread().name
        return [c for c in self.calls if c[0] in phases or (other_threads and c[1] != main)]


def clone_tree(x: Any) -> Any:
    """A deep copy with DTensors gathered to full tensors (a collective) and tensors cloned."""
    if isinstance(x, dict):
        return {k: clone_tree(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(clone_tree(v) for v in x)
    if isinstance(x, DTensor):
        return x.full_tensor()
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    return x


# ---------------------------------------------------------------------------------------------
# 1. FSDP2 on 4 ranks -> 2 ranks

GLOBAL_BATCH = 8
LR = 1e-2
FSDP_STEPS = 5  # checkpoints at 2 and 4; step 5 runs while step 4 is staged lazily
RESUMED_STEPS = 6  # the 2-rank job runs 5 and 6, and checkpoints 6


class Block(nn.Module):
    """Pre-norm residual MLP: up has 9 rows, Shard(0) over 4 ranks: 3,3,3,0 (rank 3 holds nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(21)
        self.up = nn.Linear(21, 9)
        self.down = nn.Linear(9, 21)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(F.gelu(self.up(self.norm(h))))


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(11, 21)  # Shard(0) over 4: 6,6,6,3; over 2: 11,10
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.final_norm = nn.LayerNorm(21)
        self.head = nn.Linear(21, 3)  # 1,1,1,0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(self.final_norm(h))


def build_fsdp(world: int, seed: int, lr: float) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = TinyTransformer()
    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.05)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=3, gamma=0.5)
    return model, optim, sched


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, 11, generator=g), torch.randn(GLOBAL_BATCH, 3, generator=g)


def fsdp_step(model: nn.Module, optim: torch.optim.Optimizer, sched: Any, data: DataPosition, step: int,
              rank: int, world: int) -> float:
    """One data-parallel step on this rank's part of the global batch; returns the global loss."""
    x, y = batch(step)
    per = GLOBAL_BATCH // world
    x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
    draw_per_rank_randomness(rank)
    optim.zero_grad()
    loss = F.mse_loss(model(x), y)
    loss.backward()
    optim.step()
    sched.step()
    data.advance(per)
    total = loss.detach().clone()
    dist.all_reduce(total)
    return (total / world).item()


@torch.no_grad()
def eval_loss(model: nn.Module, step: int) -> torch.Tensor:
    x, y = batch(step)
    return F.mse_loss(model(x), y)


def fsdp_full_state(model: nn.Module, optim: torch.optim.Optimizer) -> dict:
    return {"model": clone_tree(get_model_state_dict(model)),
            "optim": clone_tree(get_optimizer_state_dict(model, optim)["state"])}


def fsdp_train_worker(rank: int, world: int, url: str) -> dict:
    counter = CollectiveCounter().install()
    model, optim, sched = build_fsdp(world, seed=0, lr=LR)
    data = DataPosition(rank, world)
    state = {"model": model, "optim": ckpt.OptimizerState(model, optim), "sched": sched,
             "rng": ckpt.RNGState(), "data": data}
    out: dict[str, Any] = {}
    handles = {}
    ckptr = ckpt.Checkpointer(url, every_n_steps=2, keep_last=3)
    try:
        assert ckptr.restore(state) is None  # an empty run: nothing to resume
        ckptr.attach(optim)
        counter.phase = "train"
        for step in range(1, FSDP_STEPS + 1):
            loss = fsdp_step(model, optim, sched, data, step, rank, world)
            counter.phase = "save"
            handle = ckptr.save(step, state)
            counter.phase = "train"
            if handle is not None:
                handles[step] = handle
            if step == FSDP_STEPS - 1:  # the last checkpoint: the reference, right after its save
                out["rng"] = rng_snapshot()
                out["data"] = data.state_dict()
                out["saved"] = fsdp_full_state(model, optim)  # gathers (a collective), after save
                out["sched"] = sched.state_dict()
                out["lrs"] = [g["lr"] for g in optim.param_groups]
                out["eval_next"] = eval_loss(model, FSDP_STEPS)
        out["loss_next"] = loss  # of step FSDP_STEPS, which ran while step 4 was being staged
        out["after"] = clone_tree(get_model_state_dict(model))
        out["lrs_after"] = [g["lr"] for g in optim.param_groups]
        counter.phase = "wait"
        ckptr.wait()
        status = ckptr.status()
    finally:
        ckptr.close()
        counter.uninstall()
    assert sorted(handles) == [2, 4], sorted(handles)
    assert status.last_committed == FSDP_STEPS - 1 and status.failed == 0 and status.errors == (), status
    assert [c["state"] for c in status.checkpoints] == ["committed", "committed"], status.checkpoints
    assert all(h.result(timeout=0).step == s for s, h in handles.items())
    bad = counter.where(phases=("save", "wait"), other_threads=True)
    assert not bad, f"rank {rank}: collectives in save()/wait() or from ckpt's threads: {bad}"
    return out


def fsdp_restore_worker(rank: int, world: int, url: str, reference_file: str) -> dict:
    refs = torch.load(reference_file, weights_only=False)  # per rank of the 4-rank job
    ref = refs[0]
    model, optim, sched = build_fsdp(world, seed=1234, lr=0.5)  # other weights, other lr
    torch.manual_seed(999 + rank)  # and other RNG states: the restore must bring them back
    random.seed(999 + rank)
    np.random.seed(999 + rank)
    data = DataPosition(rank, world)
    state = {"model": model, "optim": ckpt.OptimizerState(model, optim), "sched": sched,
             "rng": ckpt.RNGState(), "data": data}
    with ckpt.Checkpointer(url, every_n_steps=2, keep_last=3) as ckptr:
        start = ckptr.restore(state)
        assert start == FSDP_STEPS, f"restore returned {start}, expected {FSDP_STEPS}"
        ckptr.attach(optim)
        who = f"rank {rank}/{world}"

        # This rank gets the RNG state and data position of the same rank of the 4-rank job.
        assert_rng_equal(rng_snapshot(), refs[rank]["rng"], who)
        assert data.loaded == refs[rank]["data"], (data.loaded, refs[rank]["data"])
        assert data.consumed == refs[rank]["data"]["consumed"]

        now = fsdp_full_state(model, optim)
        assert now["model"].keys() == ref["saved"]["model"].keys()
        for fqn, t in ref["saved"]["model"].items():
            assert isinstance(get_model_state_dict(model)[fqn], DTensor)
            assert_bitexact(now["model"][fqn], t, f"{who}: model {fqn}")
        assert now["optim"].keys() == ref["saved"]["optim"].keys()
        for fqn, names in ref["saved"]["optim"].items():
            assert names.keys() == now["optim"][fqn].keys()
            for name, t in names.items():
                assert_bitexact(now["optim"][fqn][name], t, f"{who}: optim {fqn} {name}")
        assert sched.state_dict() == ref["sched"], (sched.state_dict(), ref["sched"])
        assert [g["lr"] for g in optim.param_groups] == ref["lrs"]

        # Same parameters, same full batch, same kernels: the same loss, bit for bit.
        assert_bitexact(eval_loss(model, FSDP_STEPS), ref["eval_next"], f"{who}: loss of the fixed batch")
        # The next step: the same up to reduction order (see the module docstring).
        loss = fsdp_step(model, optim, sched, data, FSDP_STEPS, rank, world)
        torch.testing.assert_close(loss, ref["loss_next"], rtol=1e-5, atol=0)
        after = clone_tree(get_model_state_dict(model))
        for fqn, t in ref["after"].items():
            torch.testing.assert_close(after[fqn], t, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, fqn=fqn: f"{who}: {fqn} after step {FSDP_STEPS}: {m}")
            assert (t - ref["saved"]["model"][fqn]).abs().max() > 1e-4  # the step moved it by more
        assert [g["lr"] for g in optim.param_groups] == ref["lrs_after"]

        # The resumed job keeps checkpointing into the same run, with its own world size.
        for step in range(FSDP_STEPS, RESUMED_STEPS + 1):
            if step > FSDP_STEPS:
                fsdp_step(model, optim, sched, data, step, rank, world)
            ckptr.save(step, state)
        ckptr.wait()
        status = ckptr.status()
    assert status.last_committed == RESUMED_STEPS and status.failed == 0, status
    return {"data": data.state_dict()}


def test_fsdp2_checkpointer_resume_on_fewer_ranks(tmp_path) -> None:
    url = str(tmp_path / "run")
    refs = run_distributed(fsdp_train_worker, 4, url, tmp_path=tmp_path)
    storage = ckpt.open_storage(url)
    assert ckpt.committed_steps(storage) == [2, 4]
    m = ckpt.read_manifest(storage)
    assert m.step == 4 and m.writers == tuple(fmt.writer_name(r) for r in range(4))
    assert m.arrays["model/inp.weight"].shape == (21, 11)
    assert m.arrays["optim/state/blocks.1.up.weight/exp_avg_sq"].shape == (9, 21)
    # Per-rank values: the data position differs on every rank, so ranks 1..3 have their own.
    assert m.values["data"] == refs[0]["data"]
    for r in range(1, 4):
        assert fmt.values_by_writer(storage, m)[fmt.writer_name(r)]["data"] == refs[r]["data"]
    assert_each_chunk_written_once(url, 4)

    reference_file = tmp_path / "reference.pt"
    torch.save(refs, reference_file)
    run_distributed(fsdp_restore_worker, 2, url, str(reference_file), tmp_path=tmp_path)
    assert ckpt.committed_steps(storage) == [2, 4, RESUMED_STEPS]
    m6 = ckpt.read_manifest(storage, RESUMED_STEPS)
    assert m6.writers == (fmt.writer_name(0), fmt.writer_name(1))
    assert_each_chunk_written_once(url, RESUMED_STEPS)
