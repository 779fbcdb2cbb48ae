#!/usr/bin/env python
"""Restore at the real shape under ``recovery.run``, side by side with the same bytes in 8 tensors.

One run: ``--runs`` times each, alternating, ``examples.llama_shaped`` (8 workers, Llama-70B's
2,160 arrays of 8 x 8 with Adam, data-parallel on gloo, the last rank SIGKILLed before step 8,
an in-place reload from agent memory) and the same with ``--packed`` (the same 4.4 MB in 8
tensors). Per run it prints every rank's restore time (``ctx.checkpointer.last_restore``) and
checks that every rank restored bit for bit from agent memory with no fallback; at the end, the
median over runs of the slowest rank's restore, each way, and their ratio (issue target: <= 2x).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def one_run(packed: bool, workers: int, standby: int = 1) -> list[float]:
    import recovery
    from examples.llama_shaped import LlamaShapedTrainer, digest

    run_dir = tempfile.mkdtemp(prefix="bench-restore-shapes-")
    trainer = LlamaShapedTrainer(kill_at=8, kill_rank=workers - 1, packed=packed)
    ncpu = os.cpu_count() or 2
    try:
        result = recovery.run(trainer, num_workers=workers, storage=run_dir, num_cpus=ncpu,
                              ray_init_options={"log_to_driver": False}, resources_per_worker={"CPU": ncpu / workers},
                              every_n_steps=5, keep_last=None, max_failures=1, startup_timeout_s=300,
                              agent_memory_bytes=1 << 30, standby=standby)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    returns = sorted(result.returns, key=lambda r: r["rank"])
    (failure,) = result.failures
    expect = digest(trainer.reference(failure.restore_step + 1, workers))
    if failure.fallbacks or any(r["restored_digest"] != expect or r["restore"] is None
                                or r["restore"]["bytes"]["storage"] for r in returns):
        raise SystemExit(f"not restored bit for bit from agent memory: {failure.fallbacks}")
    return [r["restore"]["seconds"] for r in returns]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--standby", type=int, default=1, help="warm standbys per node (RunConfig.standby; 1 by default)")
    p.add_argument("--json", default=None, help="write the per-run figures here")
    args = p.parse_args()
    ways = {"2,160 arrays": False, "8 tensors": True}
    per_rank: dict[str, list[list[float]]] = {w: [] for w in ways}
    for i in range(args.runs):
        for way, packed in (ways.items() if i % 2 == 0 else reversed(ways.items())):
            times = one_run(packed, args.workers, args.standby)
            per_rank[way].append(times)
            print(f"run {i + 1} {way:>12}: ranks {' '.join(f'{t * 1e3:5.1f}' for t in times)} ms; "
                  f"slowest {max(times) * 1e3:.1f} ms", flush=True)
    slowest = {w: statistics.median(max(t) for t in runs) for w, runs in per_rank.items()}
    median_rank = {w: statistics.median(x for t in runs for x in t) for w, runs in per_rank.items()}
    a, b = ways
    print(f"slowest rank, median of {args.runs}: {a} {slowest[a] * 1e3:.1f} ms, {b} {slowest[b] * 1e3:.1f} ms, "
          f"ratio {slowest[a] / slowest[b]:.2f}x (target <= 2x)")
    print(f"every rank, median: {a} {median_rank[a] * 1e3:.1f} ms, {b} {median_rank[b] * 1e3:.1f} ms, "
          f"ratio {median_rank[a] / median_rank[b]:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"workers": args.workers, "cpus": os.cpu_count(), "per_rank_s": per_rank,
                       "slowest_median_s": slowest, "rank_median_s": median_rank}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
