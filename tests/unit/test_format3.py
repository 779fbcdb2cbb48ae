"""Format 3: per-writer packs, a commit point that does not grow with writers, consolidation into
zarr shards, and damage to any of it detected."""

from __future__ import annotations

import json
import os

import pytest
import torch

import ckpt
from ckpt import format as fmt
from ckpt.consolidate import consolidate
from ckpt.layouts import encode_runs, run_owner
from ckpt.verify import verify_step
from tests.helpers import bits_equal, load_as_readers, save_as_writers


def _files(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _llama_like(layers: int, rows: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(layers)
    out = {f"layers.{i}.{w}": torch.randn(rows, 4, generator=g) for i in range(layers)
           for w in ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "n1", "n2")}
    return out | {"emb": torch.randn(rows, 4, generator=g)}


def test_a_step_is_two_files_per_writer_plus_one_whatever_the_arrays(tmp_path):
    state = {"model": _llama_like(20), "optim": {k: v * 2 for k, v in _llama_like(20).items()}}
    ckpt.save(state, tmp_path, step=1)
    files = _files(tmp_path)
    assert files == ["000000000001/.fragments/rank00000.json", "000000000001/.packs/rank00000.0",
                     "000000000001/zarr.json"]
    out = {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()},
           "optim": {k: torch.zeros_like(v) for k, v in state["optim"].items()}}
    ckpt.load(out, tmp_path)
    assert all(bits_equal(out[g][k], state[g][k]) for g in state for k in state[g])


@pytest.mark.parametrize("writers", [2, 8, 32])
def test_files_grow_with_writers_not_arrays_times_writers(tmp_path, writers):
    arrays = _llama_like(10, rows=64)  # 91 arrays, each sharded over every writer (FSDP-like)
    states = [{k: ckpt.Sharded(v.chunk(writers)[r].clone(), dim=0, rank=r, world=writers) for k, v in arrays.items()}
              for r in range(writers)]
    m = save_as_writers(states, tmp_path, step=2)
    files = _files(tmp_path)
    assert len(files) == 2 * writers + 1 <= len(arrays) + 2 * writers + 1
    # The commit point is O(arrays): one run per array says which writer holds which chunk.
    assert all(len(runs) == 1 for runs in m.writer_runs.values())
    root = (tmp_path / fmt.step_dir(2) / "zarr.json").read_bytes()
    assert json.loads(root)["attributes"]["ckpt"]["writers"] == {"ranks": writers}
    out = [{k: ckpt.Sharded(torch.zeros_like(v.chunk(4)[r]), dim=0, rank=r, world=4) for k, v in arrays.items()}
           for r in range(4)]
    load_as_readers(out, tmp_path)  # resharded: writers -> 4
    for k, v in arrays.items():
        assert bits_equal(torch.cat([o[k].tensor for o in out]), v), k


def test_commit_point_size_does_not_depend_on_the_number_of_writers(tmp_path):
    arrays = _llama_like(4, rows=64)
    sizes = {}
    for writers in (4, 32):
        states = [{k: ckpt.Sharded(v.chunk(writers)[r].clone(), dim=0, rank=r, world=writers) for k, v in arrays.items()}
                  | {"rng": {"rank": r}} for r in range(writers)]
        save_as_writers(states, tmp_path / str(writers), step=1)
        sizes[writers] = len((tmp_path / str(writers) / fmt.step_dir(1) / "zarr.json").read_bytes())
    assert abs(sizes[32] - sizes[4]) < 64, sizes  # only digits of counts differ


def test_per_writer_values_come_from_the_own_fragment(tmp_path):
    states = [{"w": ckpt.Sharded(torch.full((2, 2), float(r)), dim=0, rank=r, world=4), "pos": 100 + r}
              for r in range(4)]
    m = save_as_writers(states, tmp_path, step=3)
    assert m.values_by_writer == {} and m.varying_values == ("pos",)
    assert fmt.values_by_writer(ckpt.open_storage(str(tmp_path)), m) == {f"rank0000{r}": {"pos": 100 + r}
                                                                         for r in range(1, 4)}
    outs = [{"w": ckpt.Sharded(torch.zeros(2, 2), dim=0, rank=r, world=4), "pos": None} for r in range(4)]
    load_as_readers(outs, tmp_path)
    assert [o["pos"] for o in outs] == [100, 101, 102, 103]


def test_runs_encode_the_owner_of_every_chunk():
    for owners in ([0, 1, 2, 3], [0, 0, 1, 1, 2, 2], [5, 5, 5], [3, 1, 4, 1, 5, 9, 2, 6], [0, 2, 4, 6, 1]):
        runs = encode_runs(owners)
        assert [run_owner(runs, i) for i in range(len(owners))] == owners
    assert len(encode_runs([w for w in range(1024) for _ in range(4)])) == 1


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete_pack", "delete_fragment"])
def test_damage_to_a_pack_is_found_by_load_and_verify(tmp_path, damage):
    state = {"w": torch.randn(64, 8), "b": torch.randn(8)}
    ckpt.save(state, tmp_path, step=4, max_chunk_bytes=256)
    sdir = tmp_path / fmt.step_dir(4)
    pack = sdir / ".packs" / "rank00000.0"
    if damage == "flip":
        data = bytearray(pack.read_bytes())
        data[100] ^= 0x40
        pack.write_bytes(bytes(data))
    elif damage == "truncate":
        pack.write_bytes(pack.read_bytes()[:-10])
    elif damage == "delete_pack":
        pack.unlink()
    else:
        (sdir / ".fragments" / "rank00000.json").unlink()
    with pytest.raises(ckpt.CorruptCheckpointError):
        ckpt.load({k: torch.zeros_like(v) for k, v in state.items()}, tmp_path)
    report = verify_step(ckpt.open_storage(str(tmp_path)), 4)
    assert not report.ok
    assert {p.path for p in report.problems if p.path} <= {"w", "b"}


def test_a_chunk_of_another_save_in_a_pack_is_caught_by_the_recorded_crc(tmp_path):
    ckpt.save({"w": torch.ones(16, 4)}, tmp_path / "a", step=1, max_chunk_bytes=64)
    ckpt.save({"w": torch.zeros(16, 4)}, tmp_path / "b", step=1, max_chunk_bytes=64)
    pa = tmp_path / "a" / fmt.step_dir(1) / ".packs" / "rank00000.0"
    pb = tmp_path / "b" / fmt.step_dir(1) / ".packs" / "rank00000.0"
    pa.write_bytes(pb.read_bytes())  # every chunk valid on its own, none the one recorded
    with pytest.raises(ckpt.CorruptCheckpointError, match="not the chunk its writer recorded"):
        ckpt.load({"w": torch.zeros(16, 4)}, tmp_path / "a")
    assert not verify_step(ckpt.open_storage(str(tmp_path / "a")), 1).ok


def test_consolidated_step_is_zarr_readable_verified_and_loads(tmp_path):
    ts = pytest.importorskip("tensorstore")
    state = {"model": {"w": torch.randn(37, 13), "h": torch.randn(5, 3).to(torch.bfloat16)}, "pos": 3}
    ckpt.save(state, tmp_path, step=5, max_chunk_bytes=128)
    storage = ckpt.open_storage(str(tmp_path))
    assert ckpt.read_manifest(storage, 5).layout == "packs"
    m = consolidate(storage, 5)
    assert m.layout == "shards" and not (tmp_path / fmt.step_dir(5) / ".packs").exists()
    assert verify_step(storage, 5).ok
    arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file",
                                                  "path": str(tmp_path / fmt.step_dir(5) / "model" / "w")}}).result()
    assert arr.read().result().tobytes() == state["model"]["w"].numpy().tobytes()
    out = {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()}, "pos": None}
    ckpt.load(out, tmp_path)
    assert all(bits_equal(out["model"][k], v) for k, v in state["model"].items()) and out["pos"] == 3
    assert consolidate(storage, 5).layout == "shards"  # again: nothing to do


def test_a_consolidated_step_keeps_who_wrote_each_chunk(tmp_path):
    """The writer runs survive consolidation: a restore from agents' memory (snapshots held by
    writer) asks the holders of the writers it reads only, as for a packs step."""
    from ckpt.layouts import ChunkLayout, Locator

    full = torch.arange(8 * 4, dtype=torch.float32).reshape(8, 4)
    save_as_writers([{"w": ckpt.Sharded(full.chunk(4)[r].clone(), dim=0, rank=r, world=4)} for r in range(4)],
                    str(tmp_path), step=2, max_chunk_bytes=16)
    storage = ckpt.open_storage(str(tmp_path))
    before = ckpt.read_manifest(storage, 2)
    after = consolidate(storage, 2)
    assert after.layout == "shards" and after.writer_runs == before.writer_runs
    assert ckpt.read_manifest(storage, 2).writer_runs == before.writer_runs
    loc = Locator(storage, 2, ChunkLayout.of(after), after.arrays)
    assert loc.writers_of([("w", (7, 0))]) == {fmt.writer_name(3)}  # rows 6 and 7: the last writer
    assert verify_step(storage, 2).ok


def test_a_damaged_shard_index_is_found(tmp_path):
    ckpt.save({"w": torch.randn(16, 4)}, tmp_path, step=1, max_chunk_bytes=64, layout="shards")
    shard = tmp_path / fmt.step_dir(1) / "w" / "c" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[-6] ^= 1  # inside the index
    shard.write_bytes(bytes(data))
    report = verify_step(ckpt.open_storage(str(tmp_path)), 1)
    assert any("shard index" in p.message for p in report.problems)


def test_checkpointer_consolidates_the_steps_kept_for_good_and_the_last(tmp_path):
    state = {"w": torch.randn(8, 8)}
    with ckpt.Checkpointer(tmp_path, every_n_steps=1, keep_last=2, keep_every=4) as c:
        for step in range(7):
            state["w"] += 1
            c.save(step, state)
        c.wait()
    storage = ckpt.open_storage(str(tmp_path))
    layouts = {s: ckpt.read_manifest(storage, s).layout for s in ckpt.committed_steps(storage)}
    assert layouts == {0: "shards", 4: "shards", 5: "packs", 6: "shards"}, layouts


def test_inspect_says_whether_a_step_is_zarr_readable(tmp_path, capsys):
    from ckpt.cli import main

    ckpt.save({"w": torch.ones(2)}, tmp_path, step=1)
    ckpt.save({"w": torch.ones(2)}, tmp_path, step=2, layout="shards")
    for step, readable in ((1, False), (2, True)):
        assert main(["inspect", str(tmp_path), "--step", str(step), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["zarr_readable"] is readable and info["layout"] == ("shards" if readable else "packs")


def test_a_writers_packs_are_written_at_once_on_threads_of_their_own(tmp_path, monkeypatch):
    """Each pack is one object written by a thread of its own: two packs are in flight together
    (they once went out one after the other on the persist thread, 2.5x slower to durable)."""
    import functools
    import threading

    import ckpt.io
    from ckpt.plan import pack_slots
    from ckpt.storage import LocalStorage
    from ckpt.storage.wrapper import StorageWrapper

    monkeypatch.setattr(ckpt.io, "pack_slots", functools.partial(pack_slots, pack_bytes=1 << 20))
    both_in = threading.Barrier(2, timeout=30)
    threads: set[str] = set()

    class Meeting(StorageWrapper):
        def write(self, path, parts, *, durable=True):
            if "/.packs/" in path:
                threads.add(threading.current_thread().name)
                both_in.wait()  # a broken barrier (one writer at a time) fails the save
            super().write(path, parts, durable=durable)

    state = {f"w{i}": torch.randn(256, 256) for i in range(8)}  # 2 MiB: two packs of 1 MiB
    ckpt.save(state, Meeting(LocalStorage(str(tmp_path))), step=1, io_threads=2)
    assert len(threads) == 2
    assert [f for f in _files(tmp_path) if "/.packs/" in f] == ["000000000001/.packs/rank00000.0",
                                                              "000000000001/.packs/rank00000.1"]
    out = {k: torch.zeros_like(v) for k, v in state.items()}
    ckpt.load(out, str(tmp_path))
    assert all(bits_equal(out[k], state[k]) for k in state)
