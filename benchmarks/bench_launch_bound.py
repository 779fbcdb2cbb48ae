#!/usr/bin/env python
"""What checkpointing every step costs a launch-bound training loop, on the CPU: the share of
the GIL and of the host that the checkpoint's background threads take from the training thread.

On a GPU node the training thread spends most of a step launching kernels from Python (the GPU
kit measured 0.46 s of a 0.50 s step), and every op it launches gives up the GIL and takes it
back. Background threads that hold the GIL, or take it often, lengthen the step even though the
copies and writes themselves run elsewhere. This benchmark reproduces that on a CPU machine: a
loop of ``--ops`` small in-place ops per step (each releases the GIL, like a launch), AdamW over
``--tensors`` small tensors (so that bytes are negligible and the per-array work shows), and a
checkpoint every step. Methods, each in a fresh process, in rotating order, ``--rounds`` rounds:

- ``none``: the loop alone;
- ``ckpt``: ``ckpt.Checkpointer`` with its in-process writers;
- ``ckpt_agent``: ``ckpt.Checkpointer`` handing over to a ``ckpt-agent`` process;
- ``dcp_async``: ``torch.distributed.checkpoint.async_save`` (one save in flight, as DCP requires).

Figures: the median step per method and the added milliseconds per step over ``none``.

    python benchmarks/bench_launch_bound.py                     # 663 tensors (the GPU kit's model)
    python benchmarks/bench_launch_bound.py --tensors 2160 --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

METHODS = ("none", "ckpt", "ckpt_agent", "dcp_async")


def worker(method: str, tensors: int, ops: int, steps: int, root: str, agent: str | None) -> dict:
    import torch

    import ckpt

    torch.manual_seed(0)
    model = torch.nn.ModuleList([torch.nn.Linear(64, 64, bias=False) for _ in range(max(1, tensors // 3))])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    state = {"model": model, "optim": opt}
    ck, pending = None, []
    if method in ("ckpt", "ckpt_agent"):
        ck = ckpt.Checkpointer(root, every_n_steps=1, keep_last=2, **({"agent": agent} if agent else {}))
        ck.attach(opt)
    elif method == "dcp_async":
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{root}.pg", rank=0, world_size=1)
    x = torch.zeros(4)
    times = []
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        for _ in range(ops):
            x.add_(1)
        opt.step()
        if ck is not None:
            ck.save(step, state, force=True)
        elif method == "dcp_async":
            from torch.distributed.checkpoint.state_dict import get_state_dict
            from torch.distributed.checkpoint.state_dict_saver import async_save

            for f in pending:
                f.result()
            msd, osd = get_state_dict(model, opt)
            pending = [async_save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(root, f"step_{step}"))]
            if step > 2:
                shutil.rmtree(os.path.join(root, f"step_{step - 2}"), ignore_errors=True)
        times.append(time.perf_counter() - t0)
    if ck is not None:
        ck.wait()
        ck.close()
    for f in pending:
        f.result()
    warm = min(5, steps // 4)
    return {"median_step_s": statistics.median(times[warm:]), "steps": steps - warm}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tensors", type=int, default=663)
    p.add_argument("--ops", type=int, default=20000, help="small ops per step (each releases the GIL)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--root", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--agent", help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.tensors, a.ops, a.steps, a.run, a.agent)))
        return
    import bench_engine

    methods = a.methods.split(",")
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")
    base = tempfile.mkdtemp(prefix="bench-launch-", dir=a.root)
    agent, proc = None, None
    results: dict[str, list[float]] = {m: [] for m in methods}
    try:
        if "ckpt_agent" in methods:
            agent, proc = bench_engine._start_agent(base, 1 << 30, shm_dir=a.root)
        for r in range(a.rounds):
            for m in methods[r % len(methods):] + methods[:r % len(methods)]:
                run = os.path.join(base, f"{m}-{r}")
                cmd = [sys.executable, __file__, "--worker", m, "--tensors", str(a.tensors), "--ops", str(a.ops),
                       "--steps", str(a.steps), "--run", run, *(["--agent", agent] if m == "ckpt_agent" else [])]
                out = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=str(HERE.parent))
                if out.returncode != 0:
                    raise SystemExit(f"{m} failed:\n{out.stderr[-3000:]}")
                results[m].append(json.loads(out.stdout.strip().splitlines()[-1])["median_step_s"])
                shutil.rmtree(run, ignore_errors=True)
    finally:
        if proc is not None:
            bench_engine._stop_agent(proc)
        shutil.rmtree(base, ignore_errors=True)
    med = {m: statistics.median(v) for m, v in results.items()}
    base_s = med.get("none")
    rows = {m: {"median_step_ms": med[m] * 1e3, "runs_ms": [round(x * 1e3, 1) for x in results[m]],
                "added_ms": None if base_s is None else (med[m] - base_s) * 1e3} for m in methods}
    if a.json:
        print(json.dumps({"tensors": a.tensors, "ops": a.ops, "rows": rows}, indent=1))
        return
    print(f"{a.tensors} tensors, {a.ops} small ops per step, a checkpoint every step; medians of {a.rounds} runs")
    print(f"{'method':<12} {'step ms':>9} {'added ms':>9}  runs")
    for m, r in rows.items():
        added = "-" if r["added_ms"] is None or m == "none" else f"{r['added_ms']:+.1f}"
        print(f"{m:<12} {r['median_step_ms']:>9.1f} {added:>9}  {r['runs_ms']}")
    if "dcp_async" in rows and "ckpt" in rows and base_s is not None and rows["dcp_async"]["added_ms"]:
        print(f"ckpt's added time / DCP async_save's: {rows['ckpt']['added_ms'] / rows['dcp_async']['added_ms']:.2f}x")


if __name__ == "__main__":
    main()
