#!/usr/bin/env python
"""Files and storage calls per checkpoint on an S3-compatible store, at a real shape.

A state of Llama-70B's parameter count with tiny tensors (80 layers x 9 weights, Adam's two
moments: 2,160 arrays) saved and loaded through a local S3-compatible server (moto's, on
loopback), side by side: ckpt's Checkpointer (format 3 packs; its storage calls counted by kind),
ckpt at 8 writers (Shard(0) of every array, ranks as threads), and DCP's fsspec writer/reader.
Objects per step are counted in the bucket. Times are on loopback (no network latency, a Python
server): read the counts, and the times only side by side.

    python benchmarks/bench_s3.py [--layers 80] [--reps 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import torch
from bench_scale import Counting

import ckpt
from ckpt.storage import open_storage
from ckpt.testing.threads import thread_groups
from tests.integration.s3_server import moto_endpoint, s3_options

WEIGHTS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "attention_norm", "ffn_norm")
WRITERS = 8


def state(layers: int, rows: int, cols: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for i in range(layers):
        for w in WEIGHTS:
            for kind in ("param", "exp_avg", "exp_avg_sq"):
                out[f"{kind}.layers.{i}.{w}"] = torch.randn(rows, cols, generator=g)
    return out


def objects(fs: Any, prefix: str) -> int:
    return len([p for p in fs.find(prefix) if not p.endswith("/")])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=80)
    p.add_argument("--rows", type=int, default=48)
    p.add_argument("--cols", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", help="write the figures here")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    import s3fs
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    sd = state(a.layers, a.rows, a.cols)
    out: dict[str, Any] = {"arrays": len(sd), "bytes": sum(t.numel() * 4 for t in sd.values()), "reps": a.reps}
    times: dict[str, list[float]] = {k: [] for k in ("ckpt_save", "ckpt_load", "dcp_save", "dcp_load", "ckpt8_save")}
    with moto_endpoint("bench") as endpoint:
        opts = s3_options(endpoint)
        fs = s3fs.S3FileSystem(**opts)
        for rep in range(a.reps):
            # ckpt, one writer
            url = f"s3://bench/ckpt{rep}"
            counted = Counting(open_storage(url, storage_options=opts))
            t0 = time.perf_counter()
            with ckpt.Checkpointer(counted, keep_last=None, consolidate="never") as c:
                c.save(1, sd, force=True).result(600)
            times["ckpt_save"].append(time.perf_counter() - t0)
            save_ops = dict(counted.ops)
            counted.ops.clear()
            dest = {k: torch.empty_like(v) for k, v in sd.items()}
            t0 = time.perf_counter()
            with ckpt.Checkpointer(counted, keep_last=None, consolidate="never") as c:
                c.restore(dest)
            times["ckpt_load"].append(time.perf_counter() - t0)
            assert all(torch.equal(dest[k], v) for k, v in sd.items())
            out["ckpt"] = {"objects": objects(fs, f"bench/ckpt{rep}/000000000001"), "save_ops": save_ops,
                           "load_ops": dict(counted.ops)}
            # DCP's fsspec writer and reader
            url = f"s3://bench/dcp{rep}"
            t0 = time.perf_counter()
            dcp.save(sd, storage_writer=FsspecWriter(url, **opts))
            times["dcp_save"].append(time.perf_counter() - t0)
            dest = {k: torch.empty_like(v) for k, v in sd.items()}
            t0 = time.perf_counter()
            dcp.load(dest, storage_reader=FsspecReader(url, **opts))
            times["dcp_load"].append(time.perf_counter() - t0)
            assert all(torch.equal(dest[k], v) for k, v in sd.items())
            out["dcp"] = {"objects": objects(fs, f"bench/dcp{rep}")}
            # ckpt, 8 writers (every array Shard(0) 8 ways), ranks as threads
            url = f"s3://bench/ckpt8w{rep}"
            counted = Counting(open_storage(url, storage_options=opts))
            groups = thread_groups(WRITERS)
            rows = a.rows // WRITERS

            def save(rank: int, counted: Counting = counted, groups: list = groups, rows: int = rows) -> int:
                group = groups[rank]
                local = {k: ckpt.Sharded(v[rank * rows:(rank + 1) * rows], dim=0, rank=rank, world=WRITERS)
                         for k, v in sd.items()}
                with ckpt.Checkpointer(counted, keep_last=None, consolidate="never", process_group=group) as c:
                    return c.save(1, local, force=True).result(600).step

            t0 = time.perf_counter()
            with ThreadPoolExecutor(WRITERS) as pool:
                assert list(pool.map(save, range(WRITERS))) == [1] * WRITERS
            times["ckpt8_save"].append(time.perf_counter() - t0)
            out["ckpt_8_writers"] = {"objects": objects(fs, f"bench/ckpt8w{rep}/000000000001"), "save_ops": dict(counted.ops)}
    out["seconds"] = {k: statistics.median(v) for k, v in times.items()}
    s = out["seconds"]
    out["ratios"] = {"save_ckpt_vs_dcp": s["ckpt_save"] / s["dcp_save"], "load_ckpt_vs_dcp": s["ckpt_load"] / s["dcp_load"]}
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
