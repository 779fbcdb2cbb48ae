"""Restore of replicated state read once per process group (``ckpt.replicated``), on 4 gloo
processes: arrays every rank holds whole are read by one rank each and broadcast; what each rank
holds a part of it reads itself. Asserts values and byte counts, never times."""

from __future__ import annotations

import os

import pytest
import torch

import ckpt
from ckpt.restore import Tier
from tests.integration._multiproc import run_distributed

WORLD = 4


def _state(rank: int, *, zeros: bool = False) -> dict:
    g = torch.Generator().manual_seed(0)
    whole = {f"w{i}": torch.randn(16 + i, 8, generator=g) for i in range(12)}  # the same on every rank
    whole["step"] = torch.tensor(7, dtype=torch.int64)
    whole["half"] = torch.randn(5, 3, generator=g).to(torch.bfloat16)
    part = torch.randn(4 * WORLD, 6, generator=g)[4 * rank: 4 * rank + 4]
    if zeros:
        whole = {k: torch.zeros_like(v) for k, v in whole.items()}
        part = torch.zeros_like(part)
    return {"model": whole, "shard": ckpt.Sharded(part.clone(), dim=0, rank=rank, world=WORLD)}


def _nbytes(state: dict) -> tuple[int, int]:
    whole = sum(t.numel() * t.element_size() for t in state["model"].values())
    return whole, state["shard"].tensor.numel() * 4  # (one chunk per array at this size)


def worker(rank: int, world: int, url: str, mode: str) -> dict:
    with ckpt.Checkpointer(url, keep_last=None, consolidate="never") as c:
        c.save(1, _state(rank), force=True).result(120)
    dest = _state(rank, zeros=True)
    with ckpt.Checkpointer(url, replicated_reads=mode) as c:
        try:
            assert c.restore(dest) == 2
        except Exception as e:  # noqa: BLE001 - reported to the test
            return {"error": f"{type(e).__name__}: {e}"}
        served = c.last_restore.served[Tier.STORAGE]
    want = _state(rank)
    exact = all(torch.equal(dest["model"][k], v) for k, v in want["model"].items())
    exact = exact and torch.equal(dest["shard"].tensor, want["shard"].tensor)
    return {"exact": exact, "served": served}


@pytest.mark.parametrize("mode", ["once", "each"])
def test_whole_tensors_are_read_once_per_group_and_broadcast(tmp_path, mode):
    url = str(tmp_path / "run")
    results = run_distributed(worker, WORLD, url, mode, tmp_path=tmp_path)
    whole, part = _nbytes(_state(0))
    whole += 4 * len(_state(0)["model"])  # every chunk is served with its crc32c
    part += 4
    assert all(r.get("exact") for r in results), results
    served = [r["served"] for r in results]
    if mode == "each":
        assert served == [whole + part] * WORLD
    else:
        assert sum(served) == whole + WORLD * part  # every whole array read by exactly one rank
        assert all(part < s < whole for s in served), served  # and the reading spread over the ranks


def _restore_only(rank: int, url: str) -> dict:
    dest = _state(rank, zeros=True)
    with ckpt.Checkpointer(url, replicated_reads="once") as c:
        try:
            c.restore(dest)
        except Exception as e:  # noqa: BLE001 - reported to the test
            return {"error": f"{type(e).__name__}: {e}"}
    return {"error": None}


def save_worker(rank: int, world: int, url: str) -> None:
    with ckpt.Checkpointer(url, keep_last=None, consolidate="never") as c:
        c.save(1, _state(rank), force=True).result(120)


def test_a_failed_read_on_one_rank_fails_every_rank_and_none_waits(tmp_path):
    url = str(tmp_path / "run")
    run_distributed(save_worker, WORLD, url, tmp_path=tmp_path)
    packs = tmp_path / "run" / "000000000001" / ".packs"
    victim = min(packs.iterdir())
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF  # inside its first chunk: a checksum mismatch for whoever reads it
    victim.write_bytes(bytes(data))
    results = run_distributed(_restore_only_entry, WORLD, url, tmp_path=tmp_path)
    errors = [r["error"] for r in results]
    assert all(errors), errors
    assert sum("corrupt chunk" in e for e in errors) >= 1
    assert all("corrupt chunk" in e or "another rank's read failed" in e for e in errors), errors


def _restore_only_entry(rank: int, world: int, url: str) -> dict:
    return _restore_only(rank, url)


if not hasattr(os, "fork"):  # pragma: no cover - the helper needs POSIX processes
    pytestmark = pytest.mark.skip(reason="needs POSIX processes")
