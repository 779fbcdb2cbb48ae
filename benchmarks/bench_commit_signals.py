"""Storage requests of an in-process commit, writers as real gloo processes: polling storage (the
commit point and every missing fragment and failure marker, round after round) against the job's
c10d store (``ckpt.signals``: the committer waits on a count, writers on their own key; storage
read once per document). Counts, not times, decide; medians are not needed.

    python benchmarks/bench_commit_signals.py --writers 8 --checkpoints 5
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _work(rank: int, world: int, root: str, port: int, signals: bool, checkpoints: int, arrays: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import ckpt
    import ckpt.signals
    from ckpt.storage import LocalStorage, StorageWrapper

    if not signals:  # the protocol before: every writer polls storage
        ckpt.signals.CommitSignals.of = classmethod(lambda cls, *a, **k: None)

    class Counted(StorageWrapper):
        def __init__(self, inner: object) -> None:
            super().__init__(inner)
            self.ops: collections.Counter[str] = collections.Counter()

        def read(self, path: str) -> bytes:
            kind = "commit point" if path.endswith("/zarr.json") else "failure marker" if path.endswith(".failed") \
                else "fragment" if "/.fragments/" in path else "other"
            self.ops[f"GET {kind}"] += 1
            return super().read(path)

        def exists(self, path: str) -> bool:
            self.ops["HEAD"] += 1
            return super().exists(path)

    storage = Counted(LocalStorage(root))
    state = {f"layers.{i}.w": torch.full((8, 4), float(i)) for i in range(arrays)}
    with ckpt.Checkpointer(storage, keep_last=None, consolidate="never") as c:
        for step in range(checkpoints):
            c.save(step, state, force=True).result(120)
    Path(f"{root}.rank{rank}.json").write_text(json.dumps(dict(storage.ops)))
    dist.destroy_process_group()


def measure(world: int, checkpoints: int, arrays: int, signals: bool) -> dict[str, int]:
    root = tempfile.mkdtemp(prefix="commit-signals-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_work, args=(world, root, port, signals, checkpoints, arrays), nprocs=world)
    total: collections.Counter[str] = collections.Counter()
    for r in range(world):
        total.update(json.loads(Path(f"{root}.rank{r}.json").read_text()))
    return dict(total)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--writers", type=int, default=8)
    p.add_argument("--checkpoints", type=int, default=5)
    p.add_argument("--arrays", type=int, default=64)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    out = {}
    for signals in (False, True):
        name = "store" if signals else "polling"
        out[name] = measure(args.writers, args.checkpoints, args.arrays, signals)
    per = {name: {k: round(v / args.checkpoints, 1) for k, v in sorted(ops.items())} for name, ops in out.items()}
    gets = {name: sum(v for k, v in ops.items() if k.startswith("GET")) / args.checkpoints for name, ops in out.items()}
    print(f"{args.writers} writers (processes), {args.arrays} arrays, {args.checkpoints} checkpoints; "
          "storage requests per checkpoint:")
    for name, ops in per.items():
        print(f"  {name:8} {ops}")
    print(f"  GETs per checkpoint: polling {gets['polling']:.1f}, store {gets['store']:.1f} "
          f"({gets['store'] / max(gets['polling'], 1e-9):.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps({"writers": args.writers, "per_checkpoint": per, "gets": gets}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
