#!/usr/bin/env python
"""How soon a straggler is reported, and what finding stragglers costs the coordinator.

1. Latency (a real job): ``recovery.run`` of :class:`recovery.demo.DemoTrainer` on ``--workers``
   Ray workers (gloo, node agents run by recovery) on a local Ray cluster; every rank computes
   ``--compute`` s a step inside ``ctx.timed()``; one rank's compute becomes ``--factor`` times
   as long (a ``SLOW`` fault) once the straggler window has filled (1.5 windows into the run).
   The figure is the time from the slowed rank's first slow step to the coordinator's
   ``straggler`` event for it, against the window (the detector reports a rank once the median
   of its window is slow: about half a window, plus a relay interval and a detection round).
   Wrong reports (another rank, or none) are counted. Medians over ``--runs`` runs.
2. Cost (simulated ranks): one detection round of :class:`recovery.detect.Membership` with
   1,000 and 10,000 ranks whose heartbeats filled a window, the straggler round side by side
   with the hang round of the same membership (the baseline: the detection that was there),
   and a heartbeat's cost with its timing against one without.

    python benchmarks/bench_stragglers.py                  # 3 runs, 3 workers, 5 s window
    python benchmarks/bench_stragglers.py --runs 1 --window 3 --skip-cost   # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def latency_run(args: argparse.Namespace, index: int) -> dict[str, Any]:
    import recovery
    from recovery.demo import SLOW, DemoTrainer, Fault

    step_s = args.compute + 0.02  # compute plus the rest of a step here, roughly
    slow_at = math.ceil(1.5 * args.window / step_s)
    slow_steps = math.ceil(2.0 * args.window / (args.factor * step_s))
    rank = index % (args.workers - 1) + 1
    trainer = DemoTrainer(steps=slow_at + slow_steps + 10, width=32, depth=2, global_batch=4 * args.workers,
                          compute_s=args.compute, faults=(Fault(SLOW, slow_at, rank=rank, factor=args.factor),))
    with tempfile.TemporaryDirectory(prefix="bench-stragglers-") as tmp:
        result = recovery.run(trainer, num_workers=args.workers, storage=os.path.join(tmp, "run"), echo=None,
                              metrics=None, resources_per_worker={"CPU": min(1.0, (os.cpu_count() or 2) /
                                                                              (args.workers + 1))},
                              every_n_steps=50, keep_last=2, heartbeat_interval_s=0.1, backoff_s=0.0,
                              straggler_window_s=args.window, straggler_factor=1.5, straggler_min_steps=5)
    slowed_at = result.returns[rank]["slowed_at"]
    events = [e.fields for e in result.events if e.kind == "straggler" and e.fields.get("state") == "slow"]
    mine = [e for e in events if e["rank"] == rank]
    latency = mine[0]["detected_at"] - slowed_at if mine and slowed_at is not None else None
    return {"run": index, "rank": rank, "latency_s": None if latency is None else round(latency, 3),
            "factor_seen": mine[0]["factor"] if mine else None,
            "wrong_reports": len(events) - len(mine), "failures": len(result.failures)}


def latency(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        runs = []
        for i in range(args.runs):
            runs.append(latency_run(args, i))
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
    found = [r["latency_s"] for r in runs if r["latency_s"] is not None]
    med = statistics.median(found) if found else None
    return {"window_s": args.window, "factor": args.factor, "workers": args.workers, "runs": len(runs),
            "detected": len(found), "latency_median_s": med,
            "latency_over_window": None if med is None else round(med / args.window, 3),
            "latency_min_s": min(found, default=None), "latency_max_s": max(found, default=None),
            "wrong_reports": sum(r["wrong_reports"] for r in runs), "per_run": runs}


def cost(n: int, repeat: int = 5) -> dict[str, Any]:
    from recovery.config import DetectConfig
    from recovery.detect import Membership

    m = Membership(DetectConfig(straggler_window_s=10.0, hang_timeout_s=5.0))
    m.begin_attempt(0, n, now=0)
    slow = n // 3
    for t in range(1, 13):  # a window of heartbeats, one a second, ten steps each
        for r in range(n):
            m.heartbeat(0, r, n, t, {}, now=float(t), timing=(10 * t, t * (2.0 if r == slow else 1.0), True))
        m.check_stragglers(float(t))  # the coordinator's rounds fold what arrived
    assert m.progress()["stragglers"] == {slow: 2.0}
    straggler, hang = [], []
    for i in range(repeat):
        t0 = time.process_time()
        m.check_stragglers(12.5 + i * 0.01)
        straggler.append(time.process_time() - t0)
        for st in m.ranks.values():  # judge the same stalled membership again each time
            st.hung_reported = False
        t0 = time.process_time()
        hangs = m.check(30.0)
        hang.append(time.process_time() - t0)
        assert hangs
    s, h = statistics.median(straggler), statistics.median(hang)
    cells = m.stragglers.work
    beat = {}
    for with_timing in (False, True):  # a heartbeat's cost at the coordinator, with and without timing
        m.begin_attempt(1, n, now=0)
        t0 = time.process_time()
        for t in range(1, 4):
            for r in range(n):
                m.heartbeat(1, r, n, t, {}, now=float(t), timing=(10 * t, float(t), True) if with_timing else None)
        beat[with_timing] = (time.process_time() - t0) / (3 * n)
    return {"ranks": n, "straggler_round_ms": round(s * 1e3, 3), "hang_round_ms": round(h * 1e3, 3),
            "straggler_over_hang": round(s / h, 3) if h else None, "cells_touched": cells,
            "heartbeat_us": round(beat[True] * 1e6, 2), "heartbeat_without_timing_us": round(beat[False] * 1e6, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--window", type=float, default=5.0, help="straggler_window_s")
    p.add_argument("--factor", type=float, default=2.0, help="how many times slower the slowed rank computes")
    p.add_argument("--compute", type=float, default=0.05, help="seconds of compute per step on every rank")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    args = p.parse_args(argv)
    if args.workers < 2:
        p.error("--workers must be at least 2 (a straggler is slower than its peers)")
    out: dict[str, Any] = {}
    if not args.skip_cost:
        out["cost"] = [cost(n) for n in (1_000, 10_000)]
    if not args.skip_latency:
        out["latency"] = latency(args)
    if args.json:
        print(json.dumps(out))
        return 0
    for c in out.get("cost", []):
        print(f"detection round, {c['ranks']:>6,} ranks: stragglers {c['straggler_round_ms']:8.3f} ms CPU, "
              f"hangs (baseline) {c['hang_round_ms']:8.3f} ms, ratio {c['straggler_over_hang']}; a heartbeat "
              f"{c['heartbeat_us']} us with timing, {c['heartbeat_without_timing_us']} us without")
    lat = out.get("latency")
    if lat:
        print(f"straggler {lat['factor']:g}x slower, window {lat['window_s']:g} s, {lat['workers']} workers: "
              f"reported in {lat['detected']}/{lat['runs']} runs, median {lat['latency_median_s']} s after the "
              f"slowdown began ({lat['latency_over_window']} of the window; min {lat['latency_min_s']}, max "
              f"{lat['latency_max_s']}), wrong reports {lat['wrong_reports']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
