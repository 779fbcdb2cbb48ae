"""What a node agent does while it waits for a commit someone else makes (``commit_by="external"``,
the coordinator of ``recovery.run``): poll storage for the commit point (every 0.05 s, doubling
to 1 s), or be told by the committer (``Agent.notice_commit``: the coordinator calls each node's
agent once per checkpoint) and read it once. Per checkpoint: the agent's reads of the commit point
and how long after the commit its writer's handle says committed, for commits that come
``--delays`` seconds after the last fragment (a coordinator at scale commits later).

    python benchmarks/bench_commit_notice.py --delays 0.2,1,5 --checkpoints 3
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch import nn

import ckpt
from ckpt import format as fmt
from ckpt.commit import wait_for_fragments


def run(told: bool, delay_s: float, checkpoints: int) -> list[dict[str, float]]:
    from agent.config import AgentConfig
    from agent.daemon import AgentDaemon

    reads: collections.Counter[int] = collections.Counter()
    real = fmt.read_manifest_bytes

    def counting(storage, step):  # type: ignore[no-untyped-def]
        reads[step] += 1
        return real(storage, step)

    fmt.read_manifest_bytes = counting
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-notice-") as root:
        shm = Path(root) / "shm"
        shm.mkdir()
        daemon = AgentDaemon(AgentConfig(socket_path=f"{root}/a.sock", memory_budget_bytes=64 << 20,
                                         shm_dir=str(shm), shm_prefix="cknb", log_format="text"))
        daemon.start()
        try:
            if told:  # the run is known to announce its commits (as after its first one)
                daemon.agent.notice_commit(ckpt.open_storage(f"{root}/run").url, -1, "")
            with ckpt.Checkpointer(f"{root}/run", agent=f"unix://{root}/a.sock", every_n_steps=1,
                                   commit_by="external", commit_timeout_s=120, keep_last=None) as c:
                model = nn.Linear(64, 64)
                for step in range(checkpoints):
                    h = c.save(step, {"model": model})
                    save = f"{c.run_id}-{step}"
                    wait_for_fragments(c.storage, step, save, c.writers, timeout_s=60, poll_s=0.01)
                    time.sleep(delay_s)
                    ckpt.commit(c.storage, step, c.writers, save_id=save)
                    t0 = time.perf_counter()
                    if told:
                        daemon.agent.notice_commit(c.storage.url, step, save)
                    done = threading.Event()
                    h.committed.add_done_callback(lambda _f: done.set())
                    done.wait(120)
                    rows.append({"reads": reads[step], "seen_after_s": time.perf_counter() - t0})
        finally:
            daemon.stop()
            fmt.read_manifest_bytes = real
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--delays", default="0.2,1,5", help="seconds from the last fragment to the commit")
    p.add_argument("--checkpoints", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    out = []
    print("| commit after | polled: reads / checkpoint | told: reads | polled: seen after commit | told: seen after | "
          "reads told / polled |\n|---:|---:|---:|---:|---:|---:|")
    for delay in (float(x) for x in args.delays.split(",")):
        polled, told = run(False, delay, args.checkpoints), run(True, delay, args.checkpoints)

        def med(rows: list[dict[str, float]], key: str) -> float:
            return statistics.median(r[key] for r in rows)

        row = {"delay_s": delay, "polled_reads": med(polled, "reads"), "told_reads": med(told, "reads"),
               "polled_seen_s": med(polled, "seen_after_s"), "told_seen_s": med(told, "seen_after_s")}
        out.append(row)
        print(f"| {delay:g} s | {row['polled_reads']:g} | {row['told_reads']:g} | {row['polled_seen_s']:.3f} s | "
              f"{row['told_seen_s']:.3f} s | {row['told_reads'] / row['polled_reads']:.2f}x |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
