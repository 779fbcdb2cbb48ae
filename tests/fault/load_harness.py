"""Load: many writer processes saving many checkpoints at once on one machine.

``--writers`` processes each train a tiny model and save ``--checkpoints`` checkpoints
(every step, ``keep_last=3``) into a run of their own; half of them hand their snapshots to
one shared ``ckpt-agent`` daemon, the others persist in-process. Each writer runs two
Checkpointer lifetimes (the second restores from the first) and reports its open file
descriptors and threads before, between and after. Checked:

- retention honoured: every run holds exactly its 3 newest steps, all committed, and nothing
  else (no incomplete step, no trash);
- no leaks: a second Checkpointer lifetime ends with the same file descriptors and threads as
  the first, and no Python thread of the library outlives ``close()``; the agent's shared
  memory holds at most one snapshot per writer while it runs, and nothing after it stops.

    python -m tests.fault.load_trials --writers 16 --checkpoints 100
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

import ckpt

from .crash_harness import SHM, Agent, context

KEEP_LAST = 3


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def writer_main(run: str, agent: str | None, checkpoints: int, out: str) -> None:
    torch.set_num_threads(1)
    import logging

    logging.basicConfig(level=logging.ERROR)
    model = torch.nn.Linear(16, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {"model": model, "optim": opt, "step": {"n": 0}}
    report: dict[str, Any] = {"fds": [_fds()], "threads": [threading.active_count()], "failed": 0}
    half = checkpoints // 2
    step = 0
    for lifetime, last in ((0, half), (1, checkpoints)):
        ck = ckpt.Checkpointer(run, every_n_steps=1, keep_last=KEEP_LAST, agent=agent, io_threads=2,
                               commit_timeout_s=120)
        start = ck.restore(state)
        assert (start or 0) == step, (start, step)
        ck.attach(opt)
        while step < last:
            model(torch.randn(4, 16)).sum().backward()
            opt.step()
            opt.zero_grad()
            state["step"]["n"] = step
            ck.save(step, state)
            step += 1
        ck.wait()
        report["failed"] += ck.status().failed
        report[f"last_committed_{lifetime}"] = ck.status().last_committed
        ck.close()
        del ck
        import gc

        gc.collect()
        report["fds"].append(_fds())
        report["threads"].append(threading.active_count())
    report["thread_names"] = sorted(t.name for t in threading.enumerate())
    Path(out).write_text(json.dumps(report))


def run(writers: int, checkpoints: int, *, workdir: str | None = None, agent_share: float = 0.5) -> dict[str, Any]:
    torch.set_num_threads(1)
    ctx = context()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ckl", dir=workdir) as tmp:
        home = Path(tmp)
        prefix = f"load{os.getpid() % 100000}"
        n_agent = int(round(writers * agent_share))
        agent = Agent(home, prefix, 0) if n_agent else None
        procs = []
        for w in range(writers):
            use_agent = agent.address if (agent and w < n_agent) else None
            p = ctx.Process(target=writer_main, args=(str(home / f"run{w}"), use_agent, checkpoints,
                                                      str(home / f"w{w}.json")))
            p.start()
            procs.append(p)
        for p in procs:
            p.join(1800)
        exitcodes = [p.exitcode for p in procs]
        segments_while_running = sorted(n for n in os.listdir(SHM) if n.startswith(prefix + "."))
        agent_exit = agent.stop() if agent else 0
        segments_after = sorted(n for n in os.listdir(SHM) if n.startswith(prefix + "."))
        reports = [json.loads((home / f"w{w}.json").read_text()) if (home / f"w{w}.json").exists() else None
                   for w in range(writers)]
        runs = []
        deadline = time.monotonic() + 30
        for w in range(writers):
            root = home / f"run{w}"
            while any(p.name.startswith(".trash-") for p in root.iterdir()) and time.monotonic() < deadline:
                time.sleep(0.05)  # retention's background deletion finishing
            storage = ckpt.open_storage(str(root))
            steps = ckpt.list_steps(storage)
            runs.append({"committed": [s.step for s in steps if s.committed],
                         "incomplete": [s.step for s in steps if not s.committed],
                         "other": sorted(p.name for p in root.iterdir() if ckpt.format.parse_step(p.name) is None)})
    want = list(range(checkpoints - KEEP_LAST, checkpoints))
    return {
        "writers": writers,
        "checkpoints_per_writer": checkpoints,
        "checkpoints_total": writers * checkpoints,
        "agent_writers": n_agent,
        "exitcodes_nonzero": sum(1 for c in exitcodes if c != 0),
        "failed_checkpoints": sum(r["failed"] for r in reports if r),
        "runs_with_retention_honoured": sum(1 for r in runs if r["committed"] == want and not r["incomplete"]
                                            and not r["other"]),
        "fd_growth_second_lifetime": max((r["fds"][2] - r["fds"][1] for r in reports if r), default=None),
        # threads left after close() but the main thread and tqdm's own process-wide monitor
        "threads_left_after_close": max((len([n for n in r["thread_names"] if n not in ("MainThread", "tqdm_monitor")])
                                         for r in reports if r), default=None),
        "segments_while_agent_runs": len(segments_while_running),
        "segments_after_agent_stops": len(segments_after),
        "agent_exit": agent_exit,
        "seconds": round(time.monotonic() - t0, 1),
        "runs": runs,
        "reports": reports,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--writers", type=int, default=16)
    ap.add_argument("--checkpoints", type=int, default=100)
    args = ap.parse_args(argv)
    out = run(args.writers, args.checkpoints)
    detail = {k: out.pop(k) for k in ("runs", "reports")}
    print(json.dumps(out))
    ok = (out["exitcodes_nonzero"] == 0 and out["failed_checkpoints"] == 0
          and out["runs_with_retention_honoured"] == args.writers and out["fd_growth_second_lifetime"] == 0
          and out["threads_left_after_close"] == 0 and out["segments_after_agent_stops"] == 0)
    if not ok:
        print(json.dumps(detail)[:20000])
    return 0 if ok else 1
