"""Save with 4 processes, load with 1, 2, 3 and 8: bit-exact, whatever the layouts.

Real processes on a gloo process group (see ``_multiproc``). One 4-process job saves two
checkpoints:

- ``run1d``: DTensors on a 1-D mesh of 4 with ``Shard(0)``/``Shard(1)`` over uneven sizes
  (torch.chunk semantics: a ragged last shard, and dims smaller than the world so that some
  ranks hold empty shards), ``Replicate()`` DTensors, plain tensors (replicated on every rank,
  written once), float32/float16/bfloat16/int64/bool and a 0-d tensor, and non-tensor values:
  a step, a config, and a per-rank data loader position;
- ``run2d``: DTensors on 2x2 meshes: HSDP-like ``("replicate", "shard")`` with
  ``(Replicate(), Shard(0))``, TP+FSDP-like ``(Shard(0), Shard(1))``, and more.

Every tensor holds random bit patterns (NaN payloads, -0.0, infinities, subnormals), and every
destination starts as the bitwise NOT of the expected value, so only a complete, bit-exact load
passes. Loads with 2, 3 and 8 processes use DTensors on a 1-D mesh of that size with placements
other than the saved ones (and some plain tensors); the load with 1 process runs in the pytest
process with plain full tensors and no process group.

Non-tensor values with a different world size: the manifest keeps the first writer's (rank 0's)
values and, per other writer, the values that differ (``values_by_writer``). A loading process
of global rank r gets the value saved by rank r if rank r existed at save time, otherwise rank
0's. So a per-rank data loader position is restored per rank at the same world size; after a
change of world size the ranks that existed keep theirs and new ranks get rank 0's, and it is the
application's job to re-derive positions that depend on the world size.
"""

from __future__ import annotations

import time

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import ckpt
from tests.helpers import random_bits

from ._checks import assert_bitexact, assert_each_chunk_written_once, not_bits
from ._multiproc import run_distributed

SAVE_WORLD = 4
STEP = 7
# Small enough that most shards are split in several chunks: a load reads parts of chunks,
# several chunks per shard, and chunks of several save-time shards.
MAX_CHUNK_BYTES = 64

S0, S1, R = Shard(0), Shard(1), Replicate()
PLAIN = None  # a plain tensor: on save replicated on every rank, on load read whole

# name: shape, dtype, placement at save (4 ranks), placement at load with 2, 3, 8 processes.
TENSORS_1D: dict[str, tuple[tuple[int, ...], torch.dtype, object, dict[int, object]]] = {
    "s0_f32": ((10, 7), torch.float32, S0, {2: S1, 3: R, 8: S0}),  # rows 3,3,3,1; on 8: 2x5 + 3 empty
    "s1_f32": ((10, 7), torch.float32, S1, {2: R, 3: S0, 8: S1}),  # cols 2,2,2,1; on 8: 1x7 + 1 empty
    "small_f32": ((3, 5), torch.float32, S0, {2: S1, 3: S0, 8: S0}),  # rows 1,1,1,0: rank 3 empty
    "rep_f32": ((6, 4), torch.float32, R, {2: S0, 3: S1, 8: S1}),
    "s1_bf16": ((9, 5), torch.bfloat16, S1, {2: S0, 3: R, 8: S1}),  # cols 2,2,1,0
    "s0_i64": ((11,), torch.int64, S0, {2: R, 3: S0, 8: S0}),  # 3,3,3,2
    "s0_bool": ((7, 3), torch.bool, S0, {2: S1, 3: S1, 8: S0}),  # 2,2,2,1
    "rep_i64": ((5,), torch.int64, R, {2: PLAIN, 3: S0, 8: S0}),
    "plain_f32": ((5, 3), torch.float32, PLAIN, {2: PLAIN, 3: S0, 8: S1}),
    "plain_f16": ((3, 3), torch.float16, PLAIN, {2: S1, 3: PLAIN, 8: R}),
    "plain_bf16": ((6,), torch.bfloat16, PLAIN, {2: S0, 3: PLAIN, 8: S0}),
    "plain_i64": ((4, 2), torch.int64, PLAIN, {2: PLAIN, 3: S1, 8: PLAIN}),
    "plain_bool": ((9,), torch.bool, PLAIN, {2: S0, 3: S0, 8: PLAIN}),
    "plain_scalar": ((), torch.float32, PLAIN, {2: PLAIN, 3: PLAIN, 8: R}),
}

# name: shape, dtype, mesh ("hsdp": dims replicate x shard, "tp": dims dp x tp), placements at
# save on the 2x2 mesh, placement at load on a 1-D mesh of 2.
TENSORS_2D: dict[str, tuple[tuple[int, ...], torch.dtype, str, tuple, object]] = {
    "hsdp_f32": ((9, 6), torch.float32, "hsdp", (R, S0), S1),  # rows 5,4, each on 2 replicas
    "hsdp_bf16": ((5, 3), torch.bfloat16, "hsdp", (R, S0), S0),
    "tp_fsdp_f32": ((7, 5), torch.float32, "tp", (S0, S1), R),  # rows 4,3 x cols 3,2
    "tp_fsdp_i64": ((3, 9), torch.int64, "tp", (S1, S0), S1),  # cols 5,4 x rows 2,1
    "nested_f32": ((9, 4), torch.float32, "hsdp", (S0, S0), S0),  # rows 5,4 then 3,2 / 2,2
    "s1_rep_bool": ((4, 7), torch.bool, "tp", (S1, R), S0),
}


def loader_position(rank: int) -> dict:
    return {"position": 1000 + 37 * rank, "epoch": 2}


CONFIG = {"lr": 0.25, "betas": (0.9, 0.95), "name": "run-a", "schedule": [1, 2.5, None]}


def reference(specs: dict, seed: int) -> dict[str, torch.Tensor]:
    """The global tensors, identical in every process."""
    return {name: random_bits(spec[0], spec[1], seed=1000 * seed + i) for i, (name, spec) in enumerate(specs.items())}


def ref_1d() -> dict[str, torch.Tensor]:
    return reference(TENSORS_1D, 1)


def ref_2d() -> dict[str, torch.Tensor]:
    return reference(TENSORS_2D, 2)


def placed(full: torch.Tensor, mesh, placements) -> torch.Tensor:
    """``full`` laid out as a DTensor (each process slices its own shard: no communication)."""
    if placements is PLAIN:
        return full.clone()
    if not isinstance(placements, tuple):
        placements = (placements,)
    return distribute_tensor(full.clone(), mesh, list(placements), src_data_rank=None)


def expected_local(full: torch.Tensor, mesh, placements) -> torch.Tensor:
    """What this process should hold of ``full``, by torch's own DTensor sharding."""
    t = placed(full, mesh, placements)
    return t.to_local() if isinstance(t, DTensor) else t


# ---------------------------------------------------------------------------------------------
# The workers (run in the spawned processes)


def save_worker(rank: int, world: int, url1d: str, url2d: str) -> dict:
    assert world == SAVE_WORLD
    mesh = init_device_mesh("cpu", (world,))
    ref = ref_1d()
    state = {
        "model": {name: placed(ref[name], mesh, spec[2]) for name, spec in TENSORS_1D.items()},
        "step": STEP,
        "config": CONFIG,
        "loader": loader_position(rank),
    }
    manifest = ckpt.save(state, url1d, step=STEP, max_chunk_bytes=MAX_CHUNK_BYTES)
    assert manifest.step == STEP
    # Saving leaves the live state as it was.
    for name, spec in TENSORS_1D.items():
        live = state["model"][name]
        live = live.to_local() if isinstance(live, DTensor) else live
        assert_bitexact(live, expected_local(ref[name], mesh, spec[2]), f"rank {rank}: live {name} after save")

    meshes = {
        "hsdp": init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard")),
        "tp": init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp")),
    }
    ref2 = ref_2d()
    state2 = {
        "model": {name: placed(ref2[name], meshes[spec[2]], spec[3]) for name, spec in TENSORS_2D.items()},
        "step": STEP,
    }
    ckpt.save(state2, url2d, step=STEP, max_chunk_bytes=MAX_CHUNK_BYTES)
    return {"rank": rank}


def load_worker(rank: int, world: int, url1d: str, url2d: str) -> dict:
    mesh = init_device_mesh("cpu", (world,))
    ref = ref_1d()
    dests = {name: placed(not_bits(ref[name]), mesh, spec[3][world]) for name, spec in TENSORS_1D.items()}
    state = {"model": dict(dests), "step": -1, "config": None, "loader": {"position": -1, "epoch": -1}}
    assert ckpt.load(state, url1d) == STEP
    for name, spec in TENSORS_1D.items():
        p = spec[3][world]
        got = state["model"][name]
        assert got is dests[name], f"{name}: load must fill the destination in place"
        if p is not PLAIN:
            assert isinstance(got, DTensor) and tuple(got.placements) == (p,), f"{name}: placements changed"
            got = got.to_local()
        assert_bitexact(got, expected_local(ref[name], mesh, p), f"rank {rank}/{world}: {name} loaded as {p}")

    ref2 = ref_2d()
    dests2 = {name: placed(not_bits(ref2[name]), mesh, spec[4]) for name, spec in TENSORS_2D.items()}
    state2 = {"model": dests2, "step": -1}
    assert ckpt.load(state2, url2d, step=STEP) == STEP
    for name, spec in TENSORS_2D.items():
        assert_bitexact(
            state2["model"][name].to_local(),
            expected_local(ref2[name], mesh, spec[4]),
            f"rank {rank}/{world}: 2-D {name} loaded as {spec[4]}",
        )
    return {"step": state["step"], "config": state["config"], "loader": state["loader"], "step2d": state2["step"]}


# ---------------------------------------------------------------------------------------------
# The tests


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("reshard")
    url1d, url2d = str(root / "run1d"), str(root / "run2d")
    t = time.monotonic()
    run_distributed(save_worker, SAVE_WORLD, url1d, url2d, tmp_path=root)
    print(f"save with {SAVE_WORLD} processes: {time.monotonic() - t:.1f}s")
    return url1d, url2d


def test_saved_chunks_have_one_writer_each(saved: tuple[str, str]) -> None:
    url1d, url2d = saved
    manifest, writers_of = assert_each_chunk_written_once(url1d, STEP)
    assert manifest.writers == tuple(f"rank{r:05d}" for r in range(SAVE_WORLD))
    assert set(manifest.arrays) == {f"model/{n}" for n in TENSORS_1D}
    for name, spec in TENSORS_1D.items():
        assert manifest.arrays[f"model/{name}"].shape == spec[0]
        assert manifest.arrays[f"model/{name}"].dtype == str(spec[1]).removeprefix("torch.")
    # Sharded arrays: written by the ranks that hold a non-empty shard.
    assert writers_of["model/s0_f32"] == {f"rank{r:05d}" for r in range(4)}
    assert writers_of["model/small_f32"] == {f"rank{r:05d}" for r in range(3)}  # rank 3's shard is empty
    assert writers_of["model/s1_bf16"] == {f"rank{r:05d}" for r in range(3)}
    # Replicated tensors (plain, and Replicate() DTensors): each written by one rank, and the
    # ranks share that work.
    replicated = [n for n, s in TENSORS_1D.items() if s[2] is PLAIN or s[2] == R]
    for name in replicated:
        assert len(writers_of[f"model/{name}"]) == 1, (name, writers_of[f"model/{name}"])
    spread = set().union(*(writers_of[f"model/{n}"] for n in replicated))
    assert len(spread) > 1, f"every replicated tensor was written by {spread}: no load balance"

    # Non-tensor values: common ones once, per-rank ones per writer.
    assert manifest.values["step"] == STEP
    assert manifest.values["loader"] == loader_position(0)
    for r in range(1, SAVE_WORLD):
        assert ckpt.format.values_by_writer(ckpt.open_storage(url1d), manifest)[f"rank{r:05d}"] == {
            "loader": loader_position(r)}

    manifest2, writers2 = assert_each_chunk_written_once(url2d, STEP)
    assert set(manifest2.arrays) == {f"model/{n}" for n in TENSORS_2D}
    # (Replicate, Shard(0)) on the 2x2 mesh: shard 0 is held by ranks 0 and 2, shard 1 by ranks
    # 1 and 3; each is written by one of its holders.
    for name in ("hsdp_f32", "hsdp_bf16"):
        w = writers2[f"model/{name}"]
        assert len(w) == 2 and len(w & {"rank00000", "rank00002"}) == 1 and len(w & {"rank00001", "rank00003"}) == 1, w
    assert len(writers2["model/tp_fsdp_f32"]) == 4
    assert len(writers2["model/nested_f32"]) == 4


def test_load_with_one_process(saved: tuple[str, str]) -> None:
    """No process group: plain full tensors as destinations."""
    url1d, url2d = saved
    ref = ref_1d()
    state = {"model": {n: not_bits(t) for n, t in ref.items()}, "step": -1, "config": None, "loader": None}
    assert ckpt.load(state, url1d) == STEP
    for name, t in ref.items():
        assert_bitexact(state["model"][name], t, f"1 process: {name}")
    assert state["step"] == STEP
    assert state["config"] == CONFIG  # the tuple comes back a tuple
    assert state["loader"] == loader_position(0)

    ref2 = ref_2d()
    state2 = {"model": {n: not_bits(t) for n, t in ref2.items()}, "step": -1}
    assert ckpt.load(state2, url2d) == STEP
    for name, t in ref2.items():
        assert_bitexact(state2["model"][name], t, f"1 process: 2-D {name}")


@pytest.mark.parametrize("world", [2, 3, 8])
def test_load_with_other_world_sizes(saved: tuple[str, str], world: int, tmp_path) -> None:
    url1d, url2d = saved
    t = time.monotonic()
    results = run_distributed(load_worker, world, url1d, url2d, tmp_path=tmp_path)
    print(f"load with {world} processes: {time.monotonic() - t:.1f}s")
    for rank, res in enumerate(results):
        assert res["step"] == STEP and res["step2d"] == STEP
        assert res["config"] == CONFIG
        # Ranks that existed at save time get their own position; others get rank 0's.
        assert res["loader"] == loader_position(rank if rank < SAVE_WORLD else 0), (rank, res["loader"])
