#!/usr/bin/env python
"""Restore of the same checkpoint from a node agent's memory vs from storage.

One run: start a ``ckpt-agent`` (a subprocess with its own socket), save one checkpoint of
``--gb`` GB (float32 tensors of ``--tensor-mb`` MB) through ``Checkpointer(agent=...)`` and
wait until it is committed, then restore it ``--repeat`` times each way, interleaved:

* ``agent``: ``Checkpointer(run, agent=...)``: chunks are copied out of the agent's shared
  memory (crc32c still checked against the writer's record);
* ``storage``: ``Checkpointer(run)`` (no agent), with the page cache dropped before each
  restore (``echo 3 > /proc/sys/vm/drop_caches``; needs root, else the run is marked warm);
* ``peer`` (with ``--peer``): a trainer on a "replacement node": a fresh agent of the ring
  that holds nothing; the restore has it fetch the snapshot from the agent that took it, over
  loopback TCP with the ring's token, then reads it from its own memory. A new such agent per
  repeat (its fetched copy would otherwise serve the next restore from memory).

Each restore is a new Checkpointer into preallocated destination tensors; the time is that of
``restore()`` alone. Prints the median of each and their ratio. The storage directory is on
``--dir`` (default: a temporary directory under the current directory: not tmpfs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import ckpt
from ckpt.testing.net import free_ports


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=1.0)
    p.add_argument("--tensor-mb", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--dir", default=".")
    p.add_argument("--io-threads", type=int, default=8)
    p.add_argument("--peer", action="store_true", help="also restore from a peer agent (see above)")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-agent-", dir=args.dir)).resolve()
    run = work / "run"
    budget = int(args.gb * 3 * 2**30) + (256 << 20)
    ring: list[str] = []
    ring_flags: list[str] = []
    if args.peer:
        token = work / "token"
        token.write_text(os.urandom(16).hex())
        ring = [f"127.0.0.1:{port}" for port in free_ports(2)]
        ring_flags = ["--peers", ",".join(ring), "--token-file", str(token)]

    def start_agent(name: str, peer_address: str | None) -> tuple[subprocess.Popen, str]:
        sock, ready = work / f"{name}.sock", work / f"{name}.ready"
        ready.unlink(missing_ok=True)
        flags = ["--peer-listen", peer_address, *ring_flags] if peer_address else []
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "serve", "--socket", str(sock),
                                 "--memory-budget", str(budget), "--ready-file", str(ready), "--log-level", "WARNING",
                                 "--shm-prefix", f"benchagent{name}", *flags])
        while not ready.exists():
            if proc.poll() is not None:
                raise SystemExit(f"the agent {name} did not start")
            time.sleep(0.05)
        return proc, f"unix://{sock}"

    def stop_agent(proc: subprocess.Popen) -> None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)

    agent, address = start_agent("a", ring[0] if ring else None)
    try:
        n = max(1, int(args.gb * 1024 / args.tensor_mb))
        numel = args.tensor_mb * 2**20 // 4
        g = torch.Generator().manual_seed(0)
        state = {f"layer{i}.weight": torch.randn(numel // 1024, 1024, generator=g) for i in range(n)}
        nbytes = sum(t.numel() * 4 for t in state.values())
        with ckpt.Checkpointer(str(run), agent=address, io_threads=args.io_threads) as c:
            c.save(1, state, force=True).result()
        print(f"checkpoint: {nbytes / 1e9:.2f} GB in {n} tensors, committed through the agent")

        dest = {k: torch.empty_like(v) for k, v in state.items()}
        for t in dest.values():
            t.fill_(1.0)  # touch the pages: allocation is not what is timed

        def restore(way: str) -> float:
            for t in dest.values():
                t.zero_()
            fresh = None
            opts = {}
            if way == "agent":
                opts = {"agent": address}
            elif way == "peer":
                fresh, fresh_address = start_agent("b", ring[1])
                opts = {"agent": fresh_address}
            try:
                with ckpt.Checkpointer(str(run), io_threads=args.io_threads, **opts) as c:
                    mem = c._restore_source()
                    c._restore_source = lambda step=None: mem
                    t0 = time.perf_counter()
                    start = c.restore(dest)
                    dt = time.perf_counter() - t0
                if way == "peer":
                    assert mem.fetched_bytes >= nbytes, "the snapshot did not come from the peer"
            finally:
                if fresh is not None:
                    stop_agent(fresh)
            assert start == 2
            return dt

        ways = ["agent", "storage"] + (["peer"] if args.peer else [])
        times: dict[str, list[float]] = {w: [] for w in ways}
        cold = True
        for r in range(args.repeat):
            for way in ways[r % len(ways):] + ways[: r % len(ways)]:
                if way == "storage":
                    cold = drop_caches() and cold
                times[way].append(restore(way))
        assert all(torch.equal(dest[k], state[k]) for k in state)
        med = {k: statistics.median(v) for k, v in times.items()}
        gbps = {k: nbytes / v / 1e9 for k, v in med.items()}
        print(json.dumps({"runs": {k: [round(x, 4) for x in v] for k, v in times.items()}}))
        print(f"restore from agent memory:      median {med['agent']:.3f} s  ({gbps['agent']:.2f} GB/s)")
        print(f"restore from storage ({'cold' if cold else 'WARM: could not drop caches'}): "
              f"median {med['storage']:.3f} s  ({gbps['storage']:.2f} GB/s)")
        if "peer" in med:
            print(f"restore from a peer agent (fetched over TCP): median {med['peer']:.3f} s  ({gbps['peer']:.2f} GB/s)")
        print(f"ratio storage/agent: {med['storage'] / med['agent']:.1f}x  (repeat={args.repeat})")
        if "peer" in med:
            print(f"ratio storage/peer: {med['storage'] / med['peer']:.2f}x")
    finally:
        stop_agent(agent)
        shutil.rmtree(work, ignore_errors=True)
    return 0




if __name__ == "__main__":
    sys.exit(main())
