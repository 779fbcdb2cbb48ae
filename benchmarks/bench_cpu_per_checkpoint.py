#!/usr/bin/env python
"""CPU time one checkpoint costs the host, with no training running: ``ckpt.Checkpointer`` vs
DCP ``async_save`` vs ``torch.save`` (+fsync), side by side in one process.

The same GPT-style model as ``bench_engine.py`` (``--params-m`` million parameters + AdamW
state), one checkpoint per round, each method in turn (order rotating), ``--rounds`` rounds.
A figure is user + system CPU of this process and its children from the save call until the
checkpoint is durable (ours: committed; async_save: its future; torch.save: written and
fsynced), so the background work counts. Before each save: ``sync`` and the page cache dropped
(as root), so that no method pays for another's writeback or reclaim. On a machine whose cores all train (CPU training),
this CPU is what checkpointing takes from training; divided by ``every`` × step time × cores
it is the floor of the throughput cost at that interval, before any scheduling effects.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def settle() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass  # not root: the page cache stays (the figures are then noisier)
    time.sleep(0.5)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params-m", type=float, default=90.0)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--root", default=".", help="parent of the storage directories (not tmpfs)")
    args = p.parse_args()

    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    import bench_engine as be
    import ckpt

    ns = argparse.Namespace(params_m=args.params_m, d_model=None, vocab=None, seq=32, batch=1, seed=0,
                            layers=None, heads=None)
    be.shape_model(ns)
    model = be.build_model(ns)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(2):  # creates the AdamW state
        idx = torch.randint(0, ns.vocab, (1, 32))
        torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
        opt.step()
        opt.zero_grad()
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    nbytes += sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                  if isinstance(v, torch.Tensor))
    root = Path(tempfile.mkdtemp(prefix="bench-cpu-", dir=args.root)).resolve()
    ours = ckpt.Checkpointer(str(root / "ckpt"), every_n_steps=1, keep_last=2)
    ours.attach(opt)
    state = {"model": model, "optim": opt}
    step = 0

    def run_ckpt() -> None:
        ours.save(step, state).result()

    def run_dcp_async() -> None:
        msd, osd = get_state_dict(model, opt)
        d = root / "dcp" / str(step)
        dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=str(d)).result()
        os.sync()  # DCP does not fsync; count the flush like ours (durable) does

    def run_torch_save() -> None:
        d = root / "torch"
        d.mkdir(exist_ok=True)
        with open(d / f"{step}.pt", "wb") as f:
            torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, f)
            f.flush()
            os.fsync(f.fileno())

    methods = {"ckpt": run_ckpt, "dcp_async": run_dcp_async, "torch_save": run_torch_save}
    names = list(methods)
    cpu: dict[str, list[float]] = {m: [] for m in names}
    wall: dict[str, list[float]] = {m: [] for m in names}
    try:
        for r in range(args.rounds + 1):  # round 0 warms up every method (first-use costs)
            for m in names[r % len(names):] + names[: r % len(names)]:
                step += 1
                settle()  # the previous method's dirty pages and cache are not charged to this one
                c0, t0 = cpu_s(), time.perf_counter()
                methods[m]()
                c1, t1 = cpu_s(), time.perf_counter()
                if r:
                    cpu[m].append(c1 - c0)
                    wall[m].append(t1 - t0)
                for old in (root / "dcp").glob("*") if m == "dcp_async" else ():
                    if old.name != str(step):
                        shutil.rmtree(old, ignore_errors=True)
        ours.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"state: {nbytes / 1e9:.2f} GB; {args.rounds} rounds; medians (each round)")
    base = statistics.median(cpu["ckpt"])
    for m in names:
        c, w = statistics.median(cpu[m]), statistics.median(wall[m])
        print(f"{m:11s} CPU {c:.2f} s ({', '.join(f'{x:.2f}' for x in cpu[m])})  wall {w:.2f} s  "
              f"CPU / ours {c / base:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
