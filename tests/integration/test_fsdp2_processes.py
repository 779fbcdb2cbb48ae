"""FSDP2 training resumed on a different world size: 4 ranks save, 2 ranks restore and go on.

A small transformer-ish block (Linear layers with odd sizes, so FSDP2's Shard(0) is uneven and
some ranks hold empty shards; a LayerNorm; a residual MLP) trained with Adam under
``fully_shard`` on 4 gloo ranks for two steps, then saved with ``ckpt.save`` as
``{"model": get_model_state_dict, "optim": get_optimizer_state_dict, "step": 2}``. The 4-rank
job then takes step 3 and records its loss and parameters.

A fresh 2-rank job builds the model with another seed and the optimizer with another learning
rate, initialises the optimizer state (``get_optimizer_state_dict`` does it), loads the
checkpoint into those state dicts and applies them with ``set_model_state_dict`` /
``set_optimizer_state_dict``. Then:

- the model and optimizer state equal the saved ones bit for bit, and the learning rate is back;
- the loss of the full fixed batch, evaluated on every rank, is bit-identical to the 4-rank
  job's (same parameters, same inputs, same kernels, one thread each);
- step 3 (the global batch of 8 split over the data-parallel ranks) gives the same loss and the
  same parameters as in the 4-rank job, up to floating-point reduction order: with 4 ranks each
  rank averages 2 samples and the gradients are averaged over 4 ranks, with 2 ranks 4 samples
  over 2 ranks. Those are the same mathematical quantities summed in different orders (float32
  relative error ~1e-7), so the tolerance is rtol 1e-5 / atol 1e-6, about four orders of
  magnitude below one Adam update (lr 1e-2): a wrong restore of the weights or of the Adam
  moments would fail it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import ckpt

from ._checks import assert_bitexact
from ._multiproc import run_distributed

SAVED_STEP = 2
GLOBAL_BATCH = 8
LR = 1e-2


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(13, 27)  # Shard(0) rows over 4: 7,7,7,6
        self.norm = nn.LayerNorm(27)
        self.up = nn.Linear(27, 19)  # 5,5,5,4
        self.down = nn.Linear(19, 27)
        self.out = nn.Linear(27, 5)  # 2,2,1,0: rank 3 holds nothing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = h + self.down(F.gelu(self.up(self.norm(h))))
        return self.out(h)


def build(world: int, seed: int, lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Block()
    mesh = init_device_mesh("cpu", (world,))
    for layer in (model.inp, model.up, model.down, model.out):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    return model, optim


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 13, generator=g), torch.randn(GLOBAL_BATCH, 5, generator=g)


def train_step(model: nn.Module, optim: torch.optim.Optimizer, step: int, rank: int, world: int) -> float:
    """One data-parallel step on this rank's part of the global batch; returns the global loss."""
    x, y = batch(step)
    per = GLOBAL_BATCH // world
    x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
    optim.zero_grad()
    loss = F.mse_loss(model(x), y)
    loss.backward()
    optim.step()
    total = loss.detach().clone()
    dist.all_reduce(total)
    return (total / world).item()


@torch.no_grad()
def eval_loss(model: nn.Module, step: int) -> torch.Tensor:
    """The loss of the whole fixed batch of ``step``, computed on every rank."""
    x, y = batch(step)
    return F.mse_loss(model(x), y)


def full(sd: dict) -> dict:
    """Global tensors of a (nested) state dict: DTensors gathered; non-tensors kept."""
    out = {}
    for k, v in sd.items():
        if isinstance(v, dict):
            out[k] = full(v)
        elif isinstance(v, DTensor):
            out[k] = v.full_tensor()
        elif isinstance(v, torch.Tensor):
            out[k] = v.detach().clone()
        else:
            out[k] = v
    return out


def full_state(model: nn.Module, optim: torch.optim.Optimizer) -> dict:
    return {"model": full(get_model_state_dict(model)), "optim": full(get_optimizer_state_dict(model, optim)["state"])}


# ---------------------------------------------------------------------------------------------
# Workers


def train_and_save_worker(rank: int, world: int, url: str) -> dict | None:
    model, optim = build(world, seed=0, lr=LR)
    for step in range(1, SAVED_STEP + 1):
        train_step(model, optim, step, rank, world)
    state = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optim),
        "step": SAVED_STEP,
    }
    assert isinstance(state["model"]["out.weight"], DTensor)
    ckpt.save(state, url, step=SAVED_STEP)
    saved = full_state(model, optim)
    eval3 = eval_loss(model, SAVED_STEP + 1)
    loss3 = train_step(model, optim, SAVED_STEP + 1, rank, world)
    after = full(get_model_state_dict(model))
    if rank != 0:
        return None
    return {"saved": saved, "eval3": eval3, "loss3": loss3, "after": after}


def restore_worker(rank: int, world: int, url: str, reference_file: str) -> None:
    ref = torch.load(reference_file, weights_only=False)
    model, optim = build(world, seed=1234, lr=0.5)  # other weights, other lr: the load must win
    model_sd = get_model_state_dict(model)
    optim_sd = get_optimizer_state_dict(model, optim)  # initialises the Adam state to load into
    assert optim_sd["state"], "the optimizer state should be initialised"
    state = {"model": model_sd, "optim": optim_sd, "step": -1}
    assert ckpt.load(state, url) == SAVED_STEP
    assert state["step"] == SAVED_STEP
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optim, state["optim"])
    assert all(g["lr"] == LR for g in optim.param_groups)

    now = full_state(model, optim)
    for fqn, t in ref["saved"]["model"].items():
        assert_bitexact(now["model"][fqn], t, f"rank {rank}/{world}: model {fqn}")
    assert now["optim"].keys() == ref["saved"]["optim"].keys()
    for fqn, names in ref["saved"]["optim"].items():
        for name, t in names.items():
            assert_bitexact(now["optim"][fqn][name], t, f"rank {rank}/{world}: optim {fqn} {name}")

    eval3 = eval_loss(model, SAVED_STEP + 1)
    assert_bitexact(eval3, ref["eval3"], f"rank {rank}/{world}: loss of the fixed batch after restore")
    loss3 = train_step(model, optim, SAVED_STEP + 1, rank, world)
    torch.testing.assert_close(loss3, ref["loss3"], rtol=1e-5, atol=0)
    after = full(get_model_state_dict(model))
    for fqn, t in ref["after"].items():
        torch.testing.assert_close(
            after[fqn], t, rtol=1e-5, atol=1e-6, msg=lambda m, fqn=fqn: f"{fqn} after step 3: {m}"
        )
        # ...and the step did move the weights by much more than the tolerance.
        assert (t - ref["saved"]["model"][fqn]).abs().max() > 1e-4


def test_fsdp2_resume_on_fewer_ranks(tmp_path) -> None:
    url = str(tmp_path / "run")
    ref = run_distributed(train_and_save_worker, 4, url, tmp_path=tmp_path)[0]
    manifest = ckpt.read_manifest(ckpt.open_storage(url))
    assert manifest.step == SAVED_STEP
    assert manifest.arrays["model/inp.weight"].shape == (27, 13)
    assert manifest.arrays["optim/state/out.weight/exp_avg"].shape == (5, 27)
    assert manifest.arrays["optim/state/out.weight/step"].shape == ()
    assert manifest.values["optim/param_groups"][0]["lr"] == LR
    reference_file = tmp_path / "reference.pt"
    torch.save(ref, reference_file)
    run_distributed(restore_worker, 2, url, str(reference_file), tmp_path=tmp_path)
