"""A job that commits itself with a node agent per node (``ckpt.Checkpointer(agent=...)``, a process
group, no coordinator): how the agents learn of each other's progress. ``polled``: the committing
agent looks for the other writers' fragments in storage and the second node's agent for the
commit point (0.05 s doubling to 1 s), as before ``agent.trainer.relay``; ``relayed``: the
trainers tell each other through the job's c10d store and each tells its agent
(``NoticePersisted`` to the committing one, ``NoticeCommit`` to the others), which then read each
document once.

Two trainer processes (gloo over loopback), two agents in this process (one per "node"); each
checkpoint is a 4 MB model, every ``--interval`` seconds. Per checkpoint: the committing agent's
fragment reads (those that found nothing included), the second agent's reads of the commit point,
and how long after the committer's handle said committed the second trainer's handle said so.
Medians over ``--checkpoints``.

    python benchmarks/bench_commit_relay.py --checkpoints 12 --interval 0.5 --width 512 --repeats 3
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.multiprocessing as mp
from torch import nn

import ckpt
from ckpt import format as fmt


def trainer(rank: int, root: str, relayed: bool, checkpoints: int, interval: float, width: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(f"{root}/store", 2), rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(4)])
    times = []
    with ckpt.Checkpointer(f"{root}/run", agent=f"unix://{root}/{'ab'[rank]}.sock", every_n_steps=1,
                           keep_last=None, commit_timeout_s=120) as c:
        if not relayed and c.sink.relay is not None:  # as before the relay: the agent polls
            c.sink.relay.close()
            c.sink.relay = None
        for step in range(checkpoints):
            with torch.no_grad():
                model[0].weight.add_(1.0)
            h = c.save(step, {"model": model})
            h.committed.result(120)
            times.append(time.time())
            time.sleep(interval)
    Path(out).write_text(json.dumps(times))
    dist.barrier()
    dist.destroy_process_group()


def run(relayed: bool, checkpoints: int, interval: float, width: int) -> dict[str, float]:
    from agent.config import AgentConfig
    from agent.daemon import AgentDaemon

    reads: collections.Counter[str] = collections.Counter()
    fragments: collections.Counter[int] = collections.Counter()
    lock = threading.Lock()
    real = fmt.read_manifest_bytes
    commit_module = sys.modules["ckpt.commit"]
    real_fragment = commit_module.read_fragment

    def counting(storage, step):  # type: ignore[no-untyped-def]
        with lock:
            reads[threading.current_thread().name] += 1
        return real(storage, step)

    def counting_fragments(storage, step, writer):  # type: ignore[no-untyped-def]
        with lock:
            fragments[step] += 1
        return real_fragment(storage, step, writer)

    fmt.read_manifest_bytes = counting
    commit_module.read_fragment = counting_fragments
    try:
        with tempfile.TemporaryDirectory(prefix="bench-relay-") as root:
            daemons = []
            for name in "ab":
                (Path(root) / f"shm-{name}").mkdir()
                d = AgentDaemon(AgentConfig(socket_path=f"{root}/{name}.sock", memory_budget_bytes=256 << 20,
                                            shm_dir=f"{root}/shm-{name}", shm_prefix=f"ckrb{os.getpid()}{name}",
                                            log_format="text"))
                d.start()
                daemons.append(d)
            try:
                ctx = mp.get_context("spawn")
                procs = [ctx.Process(target=trainer, args=(r, root, relayed, checkpoints, interval, width,
                                                              f"{root}/t{r}.json"))
                         for r in range(2)]
                for p in procs:
                    p.start()
                for p in procs:
                    p.join(600)
                if any(p.exitcode != 0 for p in procs):
                    raise RuntimeError(f"a trainer failed: {[p.exitcode for p in procs]}")
                t0, t1 = (json.loads(Path(f"{root}/t{r}.json").read_text()) for r in range(2))
            finally:
                for d in daemons:
                    d.stop()
    finally:
        fmt.read_manifest_bytes = real
        commit_module.read_fragment = real_fragment
    lags = [b - a for a, b in zip(t0, t1)][1:]  # the first: no agent has been told of a commit yet
    return {"mode": "relayed" if relayed else "polled", "checkpoints": checkpoints,
            "commit_point_reads_per_checkpoint": round(sum(reads.values()) / checkpoints, 2),
            "fragment_reads_per_checkpoint_after_the_first": round(
                statistics.median(fragments[s] for s in range(1, checkpoints)), 2),
            "lag_median_s": round(statistics.median(lags), 4), "lag_max_s": round(max(lags), 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", type=int, default=12)
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--width", type=int, default=512, help="4 linear layers of width x width (512: 4 MB)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each mode; the medians are printed")
    args = ap.parse_args(argv)
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for _ in range(args.repeats):
        for relayed in (False, True):
            runs[relayed].append(run(relayed, args.checkpoints, args.interval, args.width))
            print(json.dumps(runs[relayed][-1]))
    rows = [{k: (statistics.median(r[k] for r in runs[m]) if isinstance(v, float | int) and k != "checkpoints" else v)
             for k, v in runs[m][0].items()} | {"of": f"median of {args.repeats}", "width": args.width}
            for m in (False, True)]
    for row in rows:
        print(json.dumps(row))
    polled, relayed = rows
    print(json.dumps({"reads_ratio_relayed_vs_polled": round(relayed["commit_point_reads_per_checkpoint"]
                                                             / max(polled["commit_point_reads_per_checkpoint"], 1e-9), 3),
                      "fragment_reads_ratio": round(relayed["fragment_reads_per_checkpoint_after_the_first"]
                                                    / max(polled["fragment_reads_per_checkpoint_after_the_first"], 1e-9), 3),
                      "lag_ratio_relayed_vs_polled": round(relayed["lag_median_s"] / max(polled["lag_median_s"], 1e-9), 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
