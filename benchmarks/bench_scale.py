"""The control plane at thousands of ranks, measured by simulation.

Drives the real classes with simulated ranks: the coordinator's registry and commit
(``recovery.registry.CheckpointRegistry``, ``ckpt.coverage.CommitBuilder``,
``ckpt.commit``), hang detection (``recovery.detect.Membership``), restore planning
(``ckpt.plan.plan_load`` of DTensors on a fake process group, meta tensors) and, for liveness,
one real Ray actor running ``recovery.coordinator.Coordinator`` fed by the node agents' relay
calls (``Coordinator.relayed``) at the rate the relay sends them.

Simulated writers: every writer of an FSDP-like job holds one chunk of each of ``T`` arrays
(dim 0 split N ways) in one pack. Their fragments are generated on read by a storage layer
over ``memory://`` (nothing of N x T is kept in memory); pack sizes are answered from the
fragments. A counting layer above counts every storage call by kind (PUT, GET, LIST, HEAD,
DELETE) and the bytes moved (both in ``scale_storage.py``).

    python benchmarks/bench_scale.py --quick            # <= 15 minutes on 2 cores
    python benchmarks/bench_scale.py --quick --json     # one JSON object a line
    python benchmarks/bench_scale.py                    # further: 16,384 ranks, 4,000 arrays

Each figure: ``{"figure", "ranks", "value", "unit", "target", "met"}`` (and ``arrays`` where
arrays matter, ``how`` where a figure is derived rather than timed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scale_storage import COLS, ROWS, SAVE, STEP, Counting, SimulatedWriters  # noqa: E402

from ckpt import format as fmt  # noqa: E402
from ckpt.manifest import writer_name  # noqa: E402
from ckpt.storage import open_storage  # noqa: E402

FIGURES: list[dict[str, Any]] = []


def figure(name: str, ranks: int, value: float, unit: str, target: float | None, met: bool | None,
           **extra: Any) -> None:
    rec = {"figure": name, "ranks": ranks, "value": value, "unit": unit, "target": target, "met": met, **extra}
    FIGURES.append(rec)
    if ARGS.json:
        print(json.dumps(rec), flush=True)
    else:
        more = " ".join(f"{k}={v}" for k, v in extra.items())
        ok = "" if met is None else (" met" if met else " NOT MET")
        tgt = "" if target is None else f" (target {target:g})"
        print(f"  {name:<40} N={ranks:>6} {value:>12.4g} {unit}{tgt}{ok} {more}", flush=True)


# -- 1. commit: latency after the last fragment, storage calls, commit point ---------------------


def commit_figures(n: int, t: int) -> Any:
    from recovery.registry import CheckpointRegistry

    sim = SimulatedWriters(open_storage(f"memory://bench-scale-{n}-{t}"), n, t)
    st = Counting(sim)
    reg = CheckpointRegistry(st, rescan_after_s=3600)
    writers = sim.writers
    reg.saving(STEP, SAVE, writers, attempt=0)
    cpu0, gen0 = time.process_time(), sim.generate_s
    for w in writers[:-1]:  # as each writer announces its durable fragment, during the save
        reg.fragment_ready(STEP, SAVE, w)
    ingest_cpu = time.process_time() - cpu0 - (sim.generate_s - gen0)
    before = st.snapshot()
    for _ in range(20):  # polling rounds while the last writer is still writing
        assert reg.poll().committed == ()
    idle = sum(st.ops.values()) - sum(before.values())
    t0, gen0 = time.perf_counter(), sim.generate_s
    reg.fragment_ready(STEP, SAVE, writers[-1])
    result = reg.poll()
    latency = time.perf_counter() - t0 - (sim.generate_s - gen0)
    assert [r.step for r in result.committed] == [STEP], result
    cp_path = f"{fmt.step_dir(STEP)}/{fmt.META}"
    cp_bytes = st.put_sizes[cp_path]
    figure("commit_latency_after_last_fragment", n, round(latency, 4), "s", 5.0, latency <= 5.0, arrays=t)
    # Target: 3 ms per fragment of 2,000 arrays, whatever N (30 cpu-s at 10,000 ranks: 10% of a core
    # for a checkpoint every 5 minutes); format 3's object per chunk record took 28-46 ms.
    figure("coordinator_cpu_reading_fragments", n, round(ingest_cpu, 2), "cpu-s per checkpoint", 0.003 * n,
           ingest_cpu <= 0.003 * n, arrays=t, per_fragment_ms=round(ingest_cpu / max(1, n - 1) * 1e3, 3),
           how="every fragment read and validated once, as it is announced, spread over the save")
    ops = dict(st.ops)
    total = sum(ops.values())
    figure("coordinator_storage_ops_per_checkpoint", n, total, "calls", n + 8, total <= n + 8, arrays=t,
           by_kind=ops, fragment_reads=reg.fragment_reads)
    figure("storage_ops_per_idle_polling_round", n, idle / 20, "calls", 0, idle == 0, arrays=t)
    figure("commit_point_bytes", n, cp_bytes, "bytes", None, None, arrays=t,
           per_array=round(cp_bytes / t, 1))
    return reg, st, sim


def writer_ops(t: int) -> None:
    """A real writer's storage calls per checkpoint (ckpt's own write path, one writer)."""
    import tempfile

    import torch

    import ckpt

    with tempfile.TemporaryDirectory() as d:
        st = Counting(open_storage(d))
        state = {f"layers.{i // 9}.w{i % 9}": torch.zeros(8, 8) for i in range(t)}
        from ckpt.commit import commit
        from ckpt.io import write_plan
        from ckpt.plan import plan_save

        plan = plan_save(state, rank=0, world=1)
        write_plan(st, plan, step=1, writer=writer_name(0), save_id="w")
        writes = dict(st.ops)
        commit(open_storage(d), 1, [writer_name(0)], save_id="w")
        ckpt.load  # noqa: B018 - imported for the reader below
    figure("writer_storage_ops_per_checkpoint", 1, sum(writes.values()), "calls", 4,
           sum(writes.values()) <= 4, arrays=t, by_kind=writes,
           how="one writer's persist of T arrays (a pack and a fragment); N writers: N times this")


# -- 2. liveness: one real Ray actor, relayed heartbeats ----------------------------------------


def liveness(ranks_list: Sequence[int], window_s: float, per_node: int = 8) -> None:
    import ray

    from recovery.config import DetectConfig
    from recovery.coordinator import Coordinator
    from recovery.fleet import RELAY_GROUP

    class Measured(Coordinator):
        def cpu(self) -> float:
            return time.process_time()

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        detect = DetectConfig()
        actor = ray.remote(Measured).options(max_concurrency=8).remote("memory://bench-liveness", detect)
        ray.get(actor.ping.remote())
        for n in ranks_list:
            nodes = max(1, n // per_node)
            leaders = -(-nodes // RELAY_GROUP)
            interval = detect.relay_interval(nodes, RELAY_GROUP)
            rate = leaders / interval  # calls a second reaching the coordinator
            ray.get(actor.begin_attempt.remote(0, n))
            status = {"used_bytes": 1 << 30, "budget_bytes": 4 << 30, "snapshots": 16, "sessions": per_node,
                      "persist_queue": 0, "state": "ok"}
            calls = max(leaders, int(rate * window_s))
            step = 0
            c0, w0 = ray.get(actor.cpu.remote()), time.perf_counter()
            refs = []
            for i in range(calls):
                leader = i % leaders
                if leader == 0:
                    step += 1
                group = range(leader * RELAY_GROUP, min(nodes, (leader + 1) * RELAY_GROUP))
                batches = [(f"node{node}", status,
                            [("heartbeat", (0, node * per_node + k, n, step, {"loss": 1.0}, f"node{node}", "run"))
                             for k in range(per_node)]) for node in group]
                refs.append(actor.relayed_many.remote(batches))
                # pace the calls at the relay's rate
                ahead = (i + 1) / rate - (time.perf_counter() - w0)
                if ahead > 0:
                    time.sleep(ahead)
                if len(refs) > 2000:
                    ray.get(refs)
                    refs = []
            ray.get(refs)
            wall = time.perf_counter() - w0
            cpu = ray.get(actor.cpu.remote()) - c0
            frac = cpu / wall
            figure("coordinator_cpu_liveness", n, round(frac, 4), "fraction of one core", 0.10, frac <= 0.10,
                   nodes=nodes, relay_groups=leaders, relay_interval_s=round(interval, 3),
                   calls_per_s=round(calls / wall, 1), heartbeats_per_s=round(calls * nodes / leaders * per_node / wall, 1),
                   cpu_per_call_us=round(cpu / max(1, calls) * 1e6, 1))
        # The former design, for comparison: every rank calls the actor at 5 Hz on its own.
        n = ranks_list[0]
        rate, calls = n / detect.heartbeat_interval_s, 0
        c0, w0 = ray.get(actor.cpu.remote()), time.perf_counter()
        refs = []
        while time.perf_counter() - w0 < window_s:
            calls += 1
            refs.append(actor.heartbeat.remote(0, calls % n, n, calls // n, {"loss": 1.0}, "node", "run"))
            if len(refs) > 2000:
                ray.get(refs)
                refs = []
        ray.get(refs)
        wall = time.perf_counter() - w0
        cpu = ray.get(actor.cpu.remote()) - c0
        per_call = cpu / calls
        figure("coordinator_cpu_liveness_direct_per_rank", n, round(per_call * rate, 3), "fraction of one core",
               0.10, per_call * rate <= 0.10, calls_per_s_needed=rate, calls_per_s_reached=round(calls / wall, 1),
               cpu_per_call_us=round(per_call * 1e6, 1),
               how="one call per rank and heartbeat (before the relay): CPU per call x the rate it needs")
    finally:
        ray.shutdown()


# -- 3. hang detection -----------------------------------------------------------------------------


def hang_round(n: int) -> None:
    from recovery.config import DetectConfig
    from recovery.detect import HANG, Membership

    m = Membership(DetectConfig(hang_timeout_s=10, startup_timeout_s=100))
    m.begin_attempt(0, n, now=0)
    culprit = (n * 7) // 11
    for r in range(n):
        m.heartbeat(0, r, n, 41, {}, now=1)
    for r in range(n):
        if r != culprit:
            m.heartbeat(0, r, n, 42, {}, now=2 + r / n)
    t0 = time.perf_counter()
    failures = m.check(now=13)
    dt = time.perf_counter() - t0
    (f,) = failures
    named = f.kind == HANG and f.culprits == (culprit,)
    figure("hang_detection_round_all_stalled", n, round(dt, 4), "s", 0.1, dt <= 0.1 and named,
           culprit_named=named, report_chars=len(f.detail))


# -- 4. restore: one rank's planning of an N -> N-8 reshard ----------------------------------------


def restore_planning(n: int, st: Any, sim: SimulatedWriters) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from ckpt.layouts import ChunkLayout, Locator
    from ckpt.plan import plan_load

    before = st.snapshot()
    gets0 = st.nbytes["GET"]
    manifest = fmt.read_manifest(st, STEP)
    cp_read = st.nbytes["GET"] - gets0
    world = n - 8
    rank = world // 2
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",))
        shape = (n * ROWS, COLS)
        local_rows = torch.arange(shape[0]).chunk(world)[rank].numel()
        state: dict[str, Any] = {}
        for p in sim.paths:
            group, name = p.split("/")
            state.setdefault(group, {})[name] = DTensor.from_local(
                torch.empty((local_rows, COLS), device="meta"), mesh, [Shard(0)], run_check=False,
                shape=torch.Size(shape), stride=(COLS, 1))
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            plan = plan_load(state, manifest, rank=rank, world=world, strict=False)
            times.append(time.perf_counter() - t0)
    finally:
        dist.destroy_process_group()
    plan_s = statistics.median(times)
    locator = Locator(st, STEP, ChunkLayout.of(manifest), manifest.arrays)
    writers = locator.writers_of((r.path, tuple(r.index)) for r in plan.requests)
    figure("restore_planning_per_rank", n, round(plan_s, 3), "s", 1.0, plan_s <= 1.0, arrays=len(sim.paths),
           reshard=f"{n}->{world}")
    reads = len(plan.requests) + len(writers)
    figure("restore_read_requests_per_rank", n, reads, "requests", None, None, arrays=len(sim.paths),
           reshard=f"{n}->{world}", chunk_reads=len(plan.requests), fragment_reads=len(writers),
           commit_point_read_bytes=cp_read, fragment_bytes=len(sim.fragment(0)),
           how="ranged reads of the chunks the rank's slices overlap, plus the fragments that locate them")
    agent_rpcs_for_reshard(n, rank, {int(w.removeprefix("rank")) for w in writers})
    del before


def agent_rpcs_for_reshard(n: int, rank: int, real_writers: set[int], per_node: int = 8) -> None:
    # Counted from the protocol (agent.daemon.replication, agent.trainer.memory): every node of
    # the N-8 job restores rows that writers of other nodes saved. Before: each node that reads a
    # writer it does not hold lists every other agent of the ring (shared by its ranks). With the
    # directory (RestorePoint.holders, one listing of every agent by the coordinator), each node
    # asks only the agents holding the writers its ranks read (Locator.writers_of), once each.
    rows, world = n * ROWS, n - 8
    size = -(-rows // world)  # torch.chunk's rows per rank

    def needed(r: int) -> set[int]:
        lo, hi = r * size, min((r + 1) * size, rows)
        return set(range(lo // ROWS, -(-hi // ROWS))) if hi > lo else set()

    assert needed(rank) == real_writers, (needed(rank), real_writers)  # the arithmetic is the planner's
    nodes = -(-world // per_node)
    ring = directory = 0
    for k in range(nodes):
        wanted = set().union(*(needed(r) for r in range(k * per_node, min((k + 1) * per_node, world))))
        holders = {w // per_node for w in wanted} - {k}
        if holders:
            ring += nodes - 1
            directory += len(holders)
    directory += nodes  # the coordinator's listing of every agent (made anyway, to plan the restore)
    figure("agent_rpcs_resharded_restore", n, directory, "RPCs", 4 * nodes, directory <= 4 * nodes,
           reshard=f"{n}->{world}", ring_listing_rpcs=ring, nodes=nodes,
           how="derived: per node, one listing per agent holding a writer its ranks read (the directory), "
               "against every other agent of the ring for every node that reads a writer it does not hold")


def commit_point_reads(n: int, cp_bytes: int, per_node: int = 8) -> None:
    # Counted from the protocol: a node agent, told of the commit by the coordinator, reads the
    # commit point once for all its writers and serves restores from that copy (agent.daemon.core);
    # without agents, each writer's in-process sink reads it once (ckpt.commit.wait_for_commit).
    nodes = max(1, n // per_node)
    figure("commit_point_bytes_read_per_checkpoint", n, nodes * cp_bytes, "bytes", nodes * cp_bytes, True,
           readers=nodes, without_agents=n * cp_bytes,
           how="derived: one read per node with node agents; one per writer without")


# -- main ----------------------------------------------------------------------------------------


def main() -> int:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="up to 10,000 ranks, 2,000 arrays (<= 15 min on 2 cores)")
    ap.add_argument("--json", action="store_true", help="one JSON object a line")
    ap.add_argument("--only", default="", help="comma list of parts: commit, liveness, hang, restore")
    ap.add_argument("--out", default="", help="also write the JSON lines to this file")
    ARGS = ap.parse_args()
    only = set(filter(None, ARGS.only.split(",")))
    want = (lambda part: not only or part in only)
    ranks = [1000, 4000, 10000] if ARGS.quick else [1000, 4000, 10000, 16384]
    arrays = 2000
    started = time.perf_counter()
    if want("hang"):
        for n in ranks + [20000]:
            hang_round(n)
    if want("commit") or want("restore"):
        for n in ranks:
            reg, st, sim = commit_figures(n, arrays)
            cp = st.put_sizes[f"{fmt.step_dir(STEP)}/{fmt.META}"]
            commit_point_reads(n, cp)
            if want("restore"):
                restore_planning(n, st, sim)
            del reg, st, sim
        if not ARGS.quick:
            commit_figures(4000, 4000)
        writer_ops(arrays)
    if want("liveness"):
        liveness(ranks if ARGS.quick else ranks + [32768], window_s=8 if ARGS.quick else 20)
    if ARGS.out:
        Path(ARGS.out).write_text("".join(json.dumps(f) + "\n" for f in FIGURES))
    if not ARGS.json:
        unmet = [f"{f['figure']}@{f['ranks']}" for f in FIGURES if f["met"] is False]
        print(f"done in {time.perf_counter() - started:.0f} s; targets not met: {unmet or 'none'}")
    return 0


ARGS: argparse.Namespace

if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
