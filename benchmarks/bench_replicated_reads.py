#!/usr/bin/env python
"""Restoring data-parallel replicas: every rank reads everything, or each array read once and
broadcast (``replicated_reads``), side by side with DCP's load, on N gloo processes.

    python benchmarks/bench_replicated_reads.py [--world 4] [--mb 256] [--arrays 600] [--reps 3]

Every rank holds the same plain tensors (a data-parallel model and its Adam state). Reported per
mode: restore seconds (slowest rank, median over repeats), bytes read from storage summed over
the ranks, and the ratio to DCP's load. Local disk, page cache warm: the bytes are what scale
to a shared file system or an object store.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE)]

import torch

from tests.integration._multiproc import run_distributed


def _state(arrays: int, mb: int) -> dict:
    g = torch.Generator().manual_seed(0)
    per = max(1, mb * 2**20 // 4 // arrays)
    return {f"p{i}": torch.randn(per, generator=g) for i in range(arrays)}


def worker(rank: int, world: int, root: str, arrays: int, mb: int, reps: int) -> dict:
    import torch.distributed.checkpoint as dcp

    import ckpt
    from ckpt.restore import Tier

    warnings.filterwarnings("ignore")
    state = _state(arrays, mb)
    url = os.path.join(root, "ckpt")
    with ckpt.Checkpointer(url, keep_last=None, consolidate="never") as c:
        c.save(1, state, force=True).result(600)
    dcp.save(state, checkpoint_id=os.path.join(root, "dcp"))
    out: dict = {}
    for mode in ("each", "once"):
        times, served = [], 0
        for _ in range(reps):
            dest = {k: torch.empty_like(v) for k, v in state.items()}
            torch.distributed.barrier()
            t0 = time.perf_counter()
            with ckpt.Checkpointer(url, replicated_reads=mode) as c:
                c.restore(dest)
                served = c.last_restore.served[Tier.STORAGE]
            times.append(time.perf_counter() - t0)
            assert all(torch.equal(dest[k], v) for k, v in state.items())
        out[mode] = {"s": times, "served": served}
    times = []
    for _ in range(reps):
        dest = {k: torch.empty_like(v) for k, v in state.items()}
        torch.distributed.barrier()
        t0 = time.perf_counter()
        dcp.load(dest, checkpoint_id=os.path.join(root, "dcp"))
        times.append(time.perf_counter() - t0)
    out["dcp"] = {"s": times, "served": sum(t.numel() * 4 for t in state.values())}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--mb", type=int, default=256)
    p.add_argument("--arrays", type=int, default=600)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        from pathlib import Path

        results = run_distributed(worker, a.world, root, a.arrays, a.mb, a.reps, tmp_path=Path(root), timeout=1800)
    summary = {}
    for mode in ("each", "once", "dcp"):
        slowest = [max(r[mode]["s"][i] for r in results) for i in range(a.reps)]
        summary[mode] = {"seconds": statistics.median(slowest), "bytes_read_all_ranks": sum(r[mode]["served"] for r in results)}
    for mode in ("each", "once"):
        summary[mode]["vs_dcp"] = summary[mode]["seconds"] / summary["dcp"]["seconds"]
    out = {"world": a.world, "mb": a.mb, "arrays": a.arrays, "reps": a.reps, **summary}
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
