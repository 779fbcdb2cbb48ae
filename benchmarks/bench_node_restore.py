#!/usr/bin/env python
"""Eight ranks of one node restoring at once from their node agent's memory, at the real shape
and with the same bytes in 8 tensors, without Ray in the way.

One run: start a ``ckpt-agent`` (its own process), have ``--workers`` processes save one
data-parallel checkpoint of ``examples.llama_shaped``'s state through it (2,160 arrays of 8 x 8
with Adam; ``--packed``-like: the same 4.4 MB in 8 tensors), then ``--repeat`` times start that
many fresh processes that restore it at the same moment (``Checkpointer.restore(state, step=5)``,
as ``recovery.run``'s workers do). Per repeat: every rank's restore time and the CPU its
restoring thread used, and the agent's CPU over the restore (clock ticks: 10 ms steps). At the
end, the median of the slowest rank each way and their ratio, and the median CPU per rank.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def _save(rank: int, world: int, run: str, address: str, packed: bool, store: str) -> None:
    import torch.distributed as dist

    import ckpt
    from examples.llama_shaped import LlamaShapedTrainer

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    with ckpt.Checkpointer(run, agent=address, every_n_steps=5, keep_last=None) as c:
        c.save(5, LlamaShapedTrainer(packed=packed).build()).result(300)
    dist.destroy_process_group()


def _restore(run: str, address: str, packed: bool, go: mp.Event, out: mp.Queue) -> None:
    import ckpt
    from examples.llama_shaped import LlamaShapedTrainer

    state = LlamaShapedTrainer(packed=packed).build()
    c = ckpt.Checkpointer(run, agent=address, every_n_steps=5)
    go.wait()
    t0, c0 = time.perf_counter(), time.thread_time()
    c.restore(state, step=5)
    out.put((time.perf_counter() - t0, time.thread_time() - c0, c.last_restore.served))
    c.close()


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(packed: bool, workers: int, repeat: int) -> dict[str, list[float]]:
    from ckpt.restore import Tier

    ctx = mp.get_context("spawn")
    work = Path(tempfile.mkdtemp(prefix="bench-node-restore-"))
    run, sock, ready = str(work / "run"), work / "a.sock", work / "a.ready"
    agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "serve", "--socket", str(sock), "--memory-budget",
                              str(1 << 30), "--ready-file", str(ready), "--log-level", "WARNING",
                              "--shm-prefix", f"benchnode{os.getpid()}"], cwd=REPO)
    try:
        while not ready.exists():
            if agent.poll() is not None:
                raise SystemExit("the agent did not start")
            time.sleep(0.05)
        address = f"unix://{sock}"
        savers = [ctx.Process(target=_save, args=(r, workers, run, address, packed, str(work / "store")))
                  for r in range(workers)]
        for p in savers:
            p.start()
        for p in savers:
            p.join()
        if any(p.exitcode for p in savers):
            raise SystemExit("a saver failed")
        got: dict[str, list[float]] = {"slowest": [], "rank": [], "cpu": [], "agent_cpu": []}
        for _ in range(repeat):
            go, out = ctx.Event(), ctx.Queue()
            procs = [ctx.Process(target=_restore, args=(run, address, packed, go, out)) for _ in range(workers)]
            for p in procs:
                p.start()
            time.sleep(4)  # every process imported and connected
            a0 = _cpu_s(agent.pid)
            go.set()
            results = [out.get(timeout=300) for _ in procs]
            agent_cpu = _cpu_s(agent.pid) - a0
            for p in procs:
                p.join()
            if any(served[Tier.STORAGE] for *_, served in results):
                raise SystemExit("a rank read from storage")
            got["slowest"].append(max(r[0] for r in results))
            got["rank"] += [r[0] for r in results]
            got["cpu"] += [r[1] for r in results]
            got["agent_cpu"].append(agent_cpu)
            print(f"  {'8 tensors' if packed else '2,160 arrays':>12}: ranks "
                  f"{' '.join(f'{r[0] * 1e3:5.1f}' for r in sorted(results))} ms, restoring thread CPU "
                  f"{statistics.median(r[1] for r in results) * 1e3:.1f} ms median, agent CPU {agent_cpu * 1e3:.0f} ms",
                  flush=True)
        return got
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(60)
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    a = measure(False, args.workers, args.repeat)
    b = measure(True, args.workers, args.repeat)
    med = statistics.median
    print(f"slowest rank, median of {args.repeat}: 2,160 arrays {med(a['slowest']) * 1e3:.1f} ms, 8 tensors "
          f"{med(b['slowest']) * 1e3:.1f} ms, ratio {med(a['slowest']) / med(b['slowest']):.2f}x")
    print(f"every rank, median: {med(a['rank']) * 1e3:.1f} ms vs {med(b['rank']) * 1e3:.1f} ms; restoring thread CPU "
          f"{med(a['cpu']) * 1e3:.1f} ms vs {med(b['cpu']) * 1e3:.1f} ms ({med(a['cpu']) / med(b['cpu']):.1f}x); "
          f"agent CPU per restore of all ranks {med(a['agent_cpu']) * 1e3:.0f} ms vs {med(b['agent_cpu']) * 1e3:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
