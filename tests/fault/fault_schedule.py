"""Checkpoints of a training loop through a storage that fails at random, then what landed.

One run: a :class:`ckpt.Checkpointer` saves every step through ``faulty://`` (see
``faultfs``) while a seeded schedule injects transient errors, latency, partial writes,
answers lost after the write landed, disk-full periods and whole-backend outages at random
call numbers (so they land inside saves, at any point of persist or commit). Training never
stops. Afterwards, reading the run's directory directly (not through the faults):

- every committed step verifies (``ckpt.verify``) and loads bit-exactly to what was saved;
- a save reported as committed is committed in storage;
- ``ckpt gc --min-age 0`` leaves only committed steps.

    python -m tests.fault.fault_schedule --runs 20 --saves 50 --seed 0
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

import ckpt
from ckpt.retention import RetentionPolicy, run_gc
from ckpt.verify import verify_step

from .faultfs import FaultPlan, faulty_url

RETRY = ckpt.RetryPolicy(attempts=3, initial_backoff_s=0.0005, max_backoff_s=0.002)


def state_at(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    return {
        "w": torch.randn(48, 32, generator=g),
        "b": torch.randn(40, generator=g).bfloat16(),
        "i": torch.randint(-1000, 1000, (7, 9), generator=g),
        "meta": {"step": step, "tag": f"s{step}"},
    }


def empty_state() -> dict[str, Any]:
    return {"w": torch.zeros(48, 32), "b": torch.zeros(40, dtype=torch.bfloat16),
            "i": torch.zeros(7, 9, dtype=torch.int64), "meta": {}}


def equal_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in ("w", "b", "i")) and a["meta"] == b["meta"]


def check_run(root: Path, *, expected_committed: set[int] = frozenset()) -> dict[str, int]:
    """Everything committed in ``root`` verifies and loads as saved; gc leaves only those."""
    storage = ckpt.open_storage(str(root))
    steps = ckpt.list_steps(storage)
    committed = [s.step for s in steps if s.committed]
    missing = expected_committed - set(committed)
    assert not missing, f"saves reported committed are not committed in storage: {sorted(missing)}"
    for s in committed:
        report = verify_step(storage, s)
        assert report.ok, f"committed step {s} does not verify: {[p.message for p in report.problems]}"
        out = empty_state()
        ckpt.load(out, storage, step=s)
        assert equal_state(out, state_at(s)), f"committed step {s} loads other values than were saved"
    incomplete = [s.step for s in steps if not s.committed]
    if committed:
        out = empty_state()
        assert ckpt.load(out, storage) == committed[-1]
    for s in incomplete:  # never visible to readers
        try:
            ckpt.load(empty_state(), storage, step=s)
        except ckpt.CheckpointNotFoundError:
            pass
        else:
            raise AssertionError(f"incomplete step {s} loaded")
    run_gc(storage, RetentionPolicy(keep_last=max(1, len(committed)), min_age_s=0))
    left = sorted(p.name for p in root.iterdir()) if root.exists() else []
    want = [ckpt.format.step_dir(s) for s in committed]
    assert left == want, f"after gc: {left}, expected only the committed steps {want}"
    return {"committed": len(committed), "incomplete_removed": len(incomplete)}


def one_run(root: Path, *, seed: int, saves: int) -> dict[str, Any]:
    rng = random.Random(seed)
    plan = FaultPlan(seed=seed, transient=rng.choice((0.0, 0.05, 0.15)), partial=rng.choice((0.0, 0.05, 0.15)),
                     ghost=rng.choice((0.0, 0.03, 0.1)), latency=rng.choice((0.0, 0.1)), max_latency_s=0.002)
    # Outages and a full disk at random call numbers: about 40 calls per save.
    total_calls = saves * 40
    for _ in range(rng.randint(0, 3)):
        a = rng.randrange(total_calls)
        plan.outages.append((a, a + rng.randint(1, 60)))
    full_at = rng.randrange(total_calls) if rng.random() < 0.5 else None
    full_for = rng.randint(1, max(1, saves // 4))
    url = faulty_url(root)
    ck = ckpt.Checkpointer(url, every_n_steps=1, keep_last=None, storage_options={"faults": plan}, retry=RETRY,
                           max_chunk_bytes=1024, io_threads=4, commit_timeout_s=30)
    reported: dict[int, str] = {}
    full_until = None
    try:
        for step in range(saves):
            n = sum(plan.calls.values())
            if full_at is not None and n >= full_at and full_until is None:
                plan.capacity_bytes = plan.written_bytes  # the disk fills up here
                full_until = step + full_for
            if full_until is not None and step >= full_until:
                plan.capacity_bytes = None
            h = ck.save(step, state_at(step))  # training goes on whatever storage does
            try:
                h.result(timeout=60)
                reported[step] = "committed"
            except Exception as e:  # noqa: BLE001 - reported, training continues
                reported[step] = type(e).__name__
    finally:
        ck.close(wait=True)
    status = ck.status()
    assert status.failed == sum(1 for v in reported.values() if v != "committed")
    figures = check_run(root, expected_committed={s for s, v in reported.items() if v == "committed"})
    return {"saves": saves, "failed_saves": status.failed, "faults": dict(plan.injected),
            "calls": sum(plan.calls.values()), **figures}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--saves", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.CRITICAL)
    torch.set_num_threads(1)
    totals: Counter = Counter()
    faults: Counter = Counter()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.runs):
            out = one_run(Path(tmp) / f"run{r}", seed=args.seed * 100_003 + r, saves=args.saves)
            faults.update(out.pop("faults"))
            totals.update({k: v for k, v in out.items()})
    print(json.dumps({"runs": args.runs, **totals, "faults": dict(faults), "faults_total": sum(faults.values()),
                      "corrupt_committed": 0, "lost_committed": 0, "seconds": round(time.monotonic() - t0, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
