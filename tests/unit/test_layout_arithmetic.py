"""Layouts are computed arithmetically, never by walking the mesh: the boundaries between the
boxes of every process come as one gcd per dimension, equal to what enumerating every box gives."""

from __future__ import annotations

import math
import random
import subprocess
import sys
from pathlib import Path

import torch

import ckpt
from ckpt.layout import chunk_range, split_edges_gcd

REPO = Path(__file__).resolve().parents[2]


def _brute(start: int, length: int, splits: list[int], total: int) -> int:
    edges = {start, start + length}

    def rec(a: int, n: int, sp: list[int]) -> None:
        if sp:
            for i in range(sp[0]):
                o, ln = chunk_range(n, sp[0], i)
                edges.update((a + o, a + o + ln))
                rec(a + o, ln, sp[1:])

    rec(start, length, splits)
    g = 0
    for e in edges:
        if 0 < e < total:
            g = math.gcd(g, e)
    return g


def test_split_boundaries_match_enumerating_every_box():
    rng = random.Random(0)
    for _ in range(2000):
        total = rng.randint(1, 300)
        start = rng.randint(0, total - 1)
        length = rng.randint(0, total - start)
        splits = [rng.randint(1, 9) for _ in range(rng.randint(1, 3))]
        assert split_edges_gcd(start, length, splits, total) == _brute(start, length, splits, total), (
            start, length, splits, total)


def test_sharded_layouts_give_the_grid_of_their_shards():
    t = torch.zeros(6, 4)
    assert ckpt.Sharded(t, dim=0, rank=1, world=4).layout().edges_gcd == (6, 0)
    assert ckpt.Sharded(t, dim=0, rank=0, world=1).layout().edges_gcd == (0, 0)
    assert ckpt.Sharded(t, dim=0, rank=3, world=4, logical_size=20).layout().edges_gcd == (6, 0)
    qkv = ckpt.Sharded(torch.zeros(4, 4), dim=0, rank=0, world=2, parts=(4, 1, 1))  # GQA: 2 + 1 + 1 rows here
    assert qkv.layout().edges_gcd == (1, 0)
    assert ckpt.Sharded(t, replica=(0, 2)).layout().edges_gcd == (0, 0)


def test_dtensor_planning_at_world_4096_walks_no_mesh():
    """One rank of 4,096 (fake process group, meta tensors) plans 2-D sharded DTensors: its one
    box per tensor, its replica position, the grid; nothing proportional to the world."""
    code = r"""
import json, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, Replicate
from torch.testing._internal.distributed.fake_pg import FakeStore
from ckpt.layout import layout_of
dist.init_process_group("fake", store=FakeStore(), rank=1234, world_size=4096)
mesh = init_device_mesh("cpu", (8, 64, 8), mesh_dim_names=("replicate", "shard", "tp"))
local = torch.empty(2, 8, device="meta")
dt = DTensor.from_local(local, mesh, [Replicate(), Shard(0), Shard(1)], run_check=False,
                        shape=torch.Size((128, 64)), stride=(64, 1))
_, lay = layout_of(dt, rank=1234, world=4096)
print(json.dumps({"edges": lay.edges_gcd, "pieces": [[p.box.offsets, p.box.sizes] for p in lay.pieces],
                  "replica": [lay.replica_index, lay.replica_count]}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                         check=True)
    import json

    got = json.loads(out.stdout.strip().splitlines()[-1])
    # rank 1234 = coordinate (2, 26, 2): rows 52..54 of 128 (Shard(0) over 64), columns 16..24 (Shard(1) over 8)
    assert got == {"edges": [2, 8], "pieces": [[[52, 16], [2, 8]]], "replica": [2, 8]}
