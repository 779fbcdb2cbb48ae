"""Megatron-style hand-sharded tensors (``ckpt.Sharded``) saved and resharded across processes.

The layer (hidden 16, head dim 4, GQA: q = 8 heads, k = v = 2 heads):

- ``qkv``: the fused QKV weight (and a bfloat16 bias); each TP rank holds ``[q_r; k_r; v_r]``,
  its slices of each of q, k and v, concatenated along dim 0 (``parts=(32, 8, 8)``);
- ``fc1``: a SwiGLU weight, ``parts=(ffn, ffn)`` with ffn = 10 (uneven over 4: 3,3,3,1);
- ``proj``: a row-parallel weight (``dim=1``);
- ``emb``: a vocabulary-padded embedding: V = 37 rows padded (Megatron style) to a multiple of
  8 x TP: 48 rows at TP=2, 64 at TP=4, where rank 3 holds only padding. Padding holds garbage
  at save time and must come back as zeros;
- ``ln``: a TP-replicated LayerNorm weight (``dim=None, replica=(r, n)``);
- ``ln_avg``: copies that differ by rank (``average=True`` over a process group): the mean is
  stored, and saving leaves the live copies as they were.

The expected tensors are built here from the global tensors with torch.chunk semantics, without
the library's layout code. Saved by TP=2 (2 processes), loaded by TP=4 (4 processes) and by
TP=1 (plain full tensors, in the pytest process). Then DP=2 x TP=2 on 4 processes
(``replica=(dp_rank, 2)``): every chunk written exactly once.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import ckpt
from tests.helpers import random_bits

from ._checks import assert_bitexact, assert_each_chunk_written_once, not_bits
from ._multiproc import run_distributed

HIDDEN, HD = 16, 4
Q, KV = 8 * HD, 2 * HD
FFN = 10
VOCAB = 37
STEP = 3


def reference() -> dict[str, torch.Tensor]:
    """The logical (global, unpadded) tensors."""
    return {
        "qkv": random_bits((Q + 2 * KV, HIDDEN), torch.float32, seed=11),
        "qkv_bias": random_bits((Q + 2 * KV,), torch.bfloat16, seed=12),
        "fc1": random_bits((2 * FFN, HIDDEN), torch.float32, seed=13),
        "proj": random_bits((HIDDEN, Q), torch.float32, seed=14),
        "emb": random_bits((VOCAB, HIDDEN), torch.float32, seed=15),
        "ln": random_bits((HIDDEN,), torch.float32, seed=16),
    }


def ln_copy(rank: int) -> torch.Tensor:
    """The (differing) copy of the averaged LayerNorm weight that TP/DP rank ``rank`` holds."""
    g = torch.Generator().manual_seed(17)
    base = torch.randn(HIDDEN, generator=g)
    return base + 0.01 * (rank + 1) * torch.arange(HIDDEN, dtype=torch.float32)


def ln_mean(ranks: int) -> torch.Tensor:
    return (sum(ln_copy(r).double() for r in range(ranks)) / ranks).float()


def chunk_of(t: torch.Tensor, dim: int, r: int, n: int) -> torch.Tensor:
    """Part ``r`` of ``n`` of ``t`` along ``dim`` with torch.chunk's sizes (empty parts included)."""
    size = t.shape[dim]
    step = -(-size // n)
    start = min(r * step, size)
    return t.narrow(dim, start, min(size, start + step) - start)


def padded_vocab(tp: int) -> int:
    multiple = 8 * tp
    return -(-VOCAB // multiple) * multiple


def tp_local(name: str, full: torch.Tensor, r: int, tp: int, *, pad_value: float | None = None) -> torch.Tensor:
    """What TP rank ``r`` of ``tp`` holds of a reference tensor, Megatron style."""
    if name == "qkv" or name == "qkv_bias":
        q, k, v = full.split([Q, KV, KV])
        return torch.cat([chunk_of(q, 0, r, tp), chunk_of(k, 0, r, tp), chunk_of(v, 0, r, tp)])
    if name == "fc1":
        gate, up = full.split([FFN, FFN])
        return torch.cat([chunk_of(gate, 0, r, tp), chunk_of(up, 0, r, tp)])
    if name == "proj":
        return chunk_of(full, 1, r, tp).clone()
    if name == "emb":
        pad = padded_vocab(tp) - VOCAB
        filler = torch.zeros(pad, HIDDEN) if pad_value is None else torch.full((pad, HIDDEN), pad_value)
        padded = torch.cat([full, filler])
        return chunk_of(padded, 0, r, tp).clone()
    if name == "ln":
        return full.clone()
    raise KeyError(name)


def sharded(name: str, local: torch.Tensor, r: int, tp: int, replica: tuple[int, int] = (0, 1)) -> ckpt.Sharded:
    if name == "qkv" or name == "qkv_bias":
        return ckpt.Sharded(local, dim=0, rank=r, world=tp, parts=(Q, KV, KV), replica=replica)
    if name == "fc1":
        return ckpt.Sharded(local, dim=0, rank=r, world=tp, parts=(FFN, FFN), replica=replica)
    if name == "proj":
        return ckpt.Sharded(local, dim=1, rank=r, world=tp, replica=replica)
    if name == "emb":
        return ckpt.Sharded(local, dim=0, rank=r, world=tp, logical_size=VOCAB, replica=replica)
    raise KeyError(name)


def tp_state(tp_rank: int, tp: int, *, dp_rank: int = 0, dp: int = 1, avg_group, pad_value: float | None) -> dict:
    """The state a rank of a DP x TP job saves (or loads into: then pass garbage values)."""
    ref = reference()
    replica = (dp_rank, dp)
    rank = dp_rank * tp + tp_rank  # Megatron order: TP ranks adjacent
    layer: dict = {
        name: sharded(name, tp_local(name, ref[name], tp_rank, tp, pad_value=pad_value), tp_rank, tp, replica)
        for name in ("qkv", "qkv_bias", "fc1", "proj", "emb")
    }
    # Replicated over TP and DP: one of dp x tp identical copies.
    layer["ln"] = ckpt.Sharded(ref["ln"].clone(), replica=(rank, dp * tp))
    # Averaged over ``avg_group`` on save; on load (no group) just one of the copies.
    layer["ln_avg"] = ckpt.Sharded(
        ln_copy(rank), replica=(rank, dp * tp), average=avg_group is not None, group=avg_group
    )
    return {"layers": {"0": layer}, "iteration": STEP}


def check_tp_load(state: dict, tp_rank: int, tp: int, *, rank: int, world: int) -> None:
    ref = reference()
    layer = state["layers"]["0"]
    for name in ("qkv", "qkv_bias", "fc1", "proj", "emb"):
        # tp_local(pad_value=None): padding rows as zeros.
        assert_bitexact(layer[name].tensor, tp_local(name, ref[name], tp_rank, tp), f"TP {tp_rank}/{tp}: {name}")
    assert_bitexact(layer["ln"].tensor, ref["ln"], f"TP {tp_rank}/{tp}: ln")
    assert_bitexact(layer["ln_avg"].tensor, ln_mean(world), f"TP {tp_rank}/{tp}: ln_avg")
    assert state["iteration"] == STEP


# ---------------------------------------------------------------------------------------------
# Workers


def save_tp2_worker(rank: int, world: int, url: str) -> None:
    tp_group = dist.new_group(list(range(world)))  # a group object other than the default one
    state = tp_state(rank, world, avg_group=tp_group, pad_value=777.0)
    ckpt.save(state, url, step=STEP, max_chunk_bytes=128)
    # The live state is as it was: the averaged copy in particular is not replaced by the mean.
    assert_bitexact(state["layers"]["0"]["ln_avg"].tensor, ln_copy(rank), f"rank {rank}: live ln_avg after save")
    assert_bitexact(
        state["layers"]["0"]["emb"].tensor,
        tp_local("emb", reference()["emb"], rank, world, pad_value=777.0),
        f"rank {rank}: live emb (padding included) after save",
    )


def load_tp4_worker(rank: int, world: int, url: str, saved_world: int) -> None:
    dest = tp_state(rank, world, avg_group=None, pad_value=None)
    layer = dest["layers"]["0"]
    for name, leaf in list(layer.items()):  # garbage everywhere, padding included
        layer[name] = ckpt.Sharded(
            not_bits(leaf.tensor), dim=leaf.dim, rank=leaf.rank, world=leaf.world, parts=leaf.parts,
            logical_size=leaf.logical_size, replica=leaf.replica,
        )
    dest["iteration"] = -1
    assert ckpt.load(dest, url) == STEP
    check_tp_load(dest, rank, world, rank=rank, world=saved_world)
    if rank == world - 1:  # TP=4: the last rank holds only padding rows of the embedding
        assert padded_vocab(world) // world * rank >= VOCAB
        assert not layer["emb"].tensor.any()


def save_dp_tp_worker(rank: int, world: int, url: str) -> None:
    tp = 2
    dp_rank, tp_rank = divmod(rank, tp)
    state = tp_state(tp_rank, tp, dp_rank=dp_rank, dp=world // tp, avg_group=dist.group.WORLD, pad_value=-5.0)
    ckpt.save(state, url, step=STEP, max_chunk_bytes=128)


# ---------------------------------------------------------------------------------------------
# Tests


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("megatron")
    url = str(root / "run")
    run_distributed(save_tp2_worker, 2, url, tmp_path=root)
    return url


def test_tp2_save_writes_each_chunk_once(tp2_run: str) -> None:
    manifest, writers = assert_each_chunk_written_once(tp2_run, STEP)
    ref = reference()
    arrays = {p.removeprefix("layers/0/"): spec for p, spec in manifest.arrays.items()}
    for name, t in ref.items():
        assert arrays[name].shape == tuple(t.shape), name  # global, unpadded shapes
    assert arrays["ln_avg"].shape == (HIDDEN,)
    assert len(writers["layers/0/ln"]) == 1 and len(writers["layers/0/ln_avg"]) == 1
    assert writers["layers/0/qkv"] == {"rank00000", "rank00001"}
    assert manifest.arrays["layers/0/emb"].layout["logical_size"] == VOCAB
    assert manifest.arrays["layers/0/qkv"].layout["parts"] == [Q, KV, KV]


def test_tp2_to_tp4(tp2_run: str, tmp_path) -> None:
    run_distributed(load_tp4_worker, 4, tp2_run, 2, tmp_path=tmp_path)


def test_tp2_to_tp1(tp2_run: str) -> None:
    """One process, no process group: plain full tensors get the logical tensors."""
    ref = reference()
    state = {
        "layers": {"0": {n: not_bits(t) for n, t in ref.items()} | {"ln_avg": torch.full((HIDDEN,), float("nan"))}},
        "iteration": -1,
    }
    assert ckpt.load(state, tp2_run) == STEP
    for name, t in ref.items():
        assert_bitexact(state["layers"]["0"][name], t, f"TP=1 plain: {name}")
    assert_bitexact(state["layers"]["0"]["ln_avg"], ln_mean(2), "TP=1 plain: ln_avg")

    # TP=1 keeping the padded embedding of 40 rows: the 3 padding rows come back as zeros.
    emb = ckpt.Sharded(torch.full((40, HIDDEN), 9.0), dim=0, rank=0, world=1, logical_size=VOCAB)
    ckpt.load({"layers": {"0": {"emb": emb}}}, tp2_run, strict=False)
    assert_bitexact(emb.tensor[:VOCAB], ref["emb"], "TP=1 padded emb")
    assert not emb.tensor[VOCAB:].any()


def test_dp2_tp2_writes_each_chunk_once(tmp_path) -> None:
    url = str(tmp_path / "run")
    run_distributed(save_dp_tp_worker, 4, url, tmp_path=tmp_path)
    _, writers = assert_each_chunk_written_once(url, STEP)
    # The replicas share the writes: over the whole layer, both DP replicas of each TP rank write.
    everyone = set().union(*writers.values())
    assert everyone == {f"rank{r:05d}" for r in range(4)}, everyone
    # And what was written is the model: a TP=1 load gets the logical tensors.
    ref = reference()
    layer = {n: not_bits(t) for n, t in ref.items()} | {"ln_avg": torch.zeros(HIDDEN)}
    state = {"layers": {"0": layer}, "iteration": -1}
    ckpt.load(state, url)
    for name, t in ref.items():
        assert_bitexact(state["layers"]["0"][name], t, f"DPxTP -> TP=1: {name}")
    assert_bitexact(state["layers"]["0"]["ln_avg"], ln_mean(4), "DPxTP -> TP=1: ln_avg")
