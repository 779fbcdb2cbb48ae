#!/usr/bin/env python
"""Per-tensor and per-rank costs at the shape of a real LLM, side by side: ckpt vs DCP vs torch.save.

Models with the parameter *count* of Llama-7B (32 layers x 9 weights + 3) and Llama-70B
(80 layers x 9 + 3), with tiny tensors (``--rows`` x ``--cols``, so it runs anywhere) and Adam
state (exp_avg, exp_avg_sq, step per parameter): about 870 and 2,170 arrays. One run measures:

1. **one writer** (this process): save, load; files per step; metadata bytes (commit point,
   fragments; DCP's ``.metadata``); for ckpt (``ckpt.save``/``ckpt.load``), DCP
   (``dcp.save``/``dcp.load``, one process) and ``torch.save``/``torch.load``.
2. **8 writers** (real processes, gloo): every tensor a DTensor sharded 8 ways on dim 0
   (FSDP-like): save, load 8 -> 8, resharded load 8 -> 6 (6 processes, Shard(0) over 6); files
   and metadata bytes; ckpt and DCP.
3. **64 writers, simulated** in one process through ckpt's planning and write path (each
   simulated rank plans its Shard(0) slices and writes them, then one commit): files, commit
   point and fragment bytes, time. DCP writes one file per rank plus ``.metadata``: N + 1.
   **Planning at world 4,096**: one rank plans a state of ~2,000 DTensors on a 512 x 8 mesh
   (fake process group, meta tensors), in a process of its own.
4. **CPU per checkpoint** in a ``Checkpointer`` loop against ``dcp.async_save`` (process CPU,
   user + system, from the save call until durable), one writer.

Times are medians over ``--reps``; every figure is printed with its ratio to DCP's.

    python benchmarks/bench_shapes.py                    # 7b and 70b shapes, all sections
    python benchmarks/bench_shapes.py --shapes 70b --sections one,eight --reps 3
    python benchmarks/bench_shapes.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {"7b": 32, "70b": 80}  # layers
WEIGHTS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
           "feed_forward.w3", "attention_norm", "ffn_norm")


def params(layers: int, rows: int, cols: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(layers)
    out = {"tok_embeddings.weight": torch.randn(rows, cols, generator=g)}
    for layer in range(layers):
        for w in WEIGHTS:
            out[f"layers.{layer}.{w}.weight"] = torch.randn(rows, cols, generator=g)
    out["norm.weight"] = torch.randn(rows, cols, generator=g)
    out["output.weight"] = torch.randn(rows, cols, generator=g)
    return out


def train_state(p: dict[str, Any]) -> dict[str, Any]:
    """A model and Adam state as flat tensors (the shape of a state dict a trainer saves)."""
    import torch

    state = {k: {"exp_avg": v * 0.5, "exp_avg_sq": v * v, "step": torch.tensor(7.0)} for k, v in p.items()}
    return {"model": dict(p), "optim": {"state": state, "param_groups": [{"lr": 1e-4, "params": sorted(p)}]}}


def count_arrays(state: Any) -> int:
    import ckpt.state

    return sum(1 for _p, _l, is_t in ckpt.state.flatten(state) if is_t)


def files_and_bytes(root: str) -> tuple[int, dict[str, int]]:
    n, meta = 0, {"commit_point": 0, "fragments": 0, "dcp_metadata": 0}
    for d, _dirs, files in os.walk(root):
        for f in files:
            n += 1
            size = os.path.getsize(os.path.join(d, f))
            if f == ".metadata":
                meta["dcp_metadata"] += size
            elif d.endswith(".fragments"):
                meta["fragments"] += size
            elif f == "zarr.json" and os.path.basename(d).isdigit():
                meta["commit_point"] += size
    return n, meta


def timed(fn: Any, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fresh(root: str, name: str) -> str:
    path = os.path.join(root, name)
    shutil.rmtree(path, ignore_errors=True)
    return path


# ---------------------------------------------------------------------------------------------
# 1. One writer


def one_writer(shape: str, args: argparse.Namespace, root: str) -> dict[str, Any]:
    import torch
    import torch.distributed.checkpoint as dcp

    import ckpt

    state = train_state(params(SHAPES[shape], args.rows, args.cols))
    out: dict[str, Any] = {"arrays": count_arrays(state)}
    paths = {"ckpt": os.path.join(root, "one-ckpt"), "dcp": os.path.join(root, "one-dcp"),
             "torch_save": os.path.join(root, "one.pt")}

    def ckpt_save() -> None:
        ckpt.save(state, fresh(root, "one-ckpt"), step=1)

    def dcp_save() -> None:
        dcp.save(state, checkpoint_id=fresh(root, "one-dcp"), no_dist=True)

    def torch_save() -> None:
        with open(paths["torch_save"], "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())

    for name, fn in (("ckpt", ckpt_save), ("dcp", dcp_save), ("torch", torch_save)):
        out[f"{name}_save_s"] = timed(fn, args.reps)
    out["ckpt_load_s"] = timed(lambda: ckpt.load(state, paths["ckpt"]), args.reps)
    out["dcp_load_s"] = timed(lambda: dcp.load(state, checkpoint_id=paths["dcp"], no_dist=True), args.reps)
    out["torch_load_s"] = timed(lambda: torch.load(paths["torch_save"], weights_only=True), args.reps)
    for name in ("ckpt", "dcp"):
        n, meta = files_and_bytes(paths[name])
        out[f"{name}_files"] = n
        out[f"{name}_metadata_bytes"] = meta
    out["torch_save_files"] = 1
    return out


# ---------------------------------------------------------------------------------------------
# 2. Eight writers, real processes


def _dtensor_state(state: dict[str, Any], mesh: Any) -> dict[str, Any]:
    """Every tensor as a DTensor sharded on dim 0 over ``mesh`` (from local slices: no comms)."""
    import torch
    from torch.distributed.tensor import DTensor, Shard

    rank, world = mesh.get_local_rank(), mesh.size()

    def conv(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, list):
            return [conv(x) for x in v]
        if isinstance(v, torch.Tensor) and v.dim() >= 1:
            local = v.chunk(world, dim=0)[rank].clone()
            return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=v.shape, stride=v.stride())
        return v

    return conv(state)


def _zeroed(state: Any) -> Any:
    import torch
    from torch.distributed.tensor import DTensor

    if isinstance(state, dict):
        return {k: _zeroed(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_zeroed(v) for v in state]
    if isinstance(state, DTensor):
        return DTensor.from_local(torch.zeros_like(state.to_local()), state.device_mesh, state.placements,
                                  run_check=False, shape=state.shape, stride=state.stride())
    if isinstance(state, torch.Tensor):
        return torch.zeros_like(state)
    return state


def _worker(rank: int, world: int, port: int, task: str, shape: str, rows: int, cols: int, root: str, reps: int,
            out_path: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    import ckpt

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    state = _dtensor_state(train_state(params(SHAPES[shape], rows, cols)), mesh)
    results: dict[str, Any] = {}

    def run(name: str, fn: Any) -> None:
        times = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            dist.barrier()
            times.append(time.perf_counter() - t0)
        results[name] = statistics.median(times)

    if task == "save":
        def ckpt_save() -> None:
            if rank == 0:
                shutil.rmtree(os.path.join(root, "eight-ckpt"), ignore_errors=True)
            dist.barrier()
            ckpt.save(state, os.path.join(root, "eight-ckpt"), step=1)

        def dcp_save() -> None:
            if rank == 0:
                shutil.rmtree(os.path.join(root, "eight-dcp"), ignore_errors=True)
            dist.barrier()
            dcp.save(state, checkpoint_id=os.path.join(root, "eight-dcp"))

        run("ckpt_save_s", ckpt_save)
        run("dcp_save_s", dcp_save)
    dest = _zeroed(state)
    run(f"ckpt_load_{world}_s", lambda: ckpt.load(dest, os.path.join(root, "eight-ckpt")))
    run(f"dcp_load_{world}_s", lambda: dcp.load(dest, checkpoint_id=os.path.join(root, "eight-dcp")))
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eight_writers(shape: str, args: argparse.Namespace, root: str) -> dict[str, Any]:
    import torch.multiprocessing as mp

    out: dict[str, Any] = {}
    for task, world in (("save", 8), ("load", 6)):
        res = os.path.join(root, f"eight-{task}.json")
        mp.spawn(_worker, args=(world, _free_port(), task, shape, args.rows, args.cols, root, args.reps, res),
                 nprocs=world, join=True)
        with open(res) as f:
            out.update(json.load(f))
    for name in ("ckpt", "dcp"):
        n, meta = files_and_bytes(os.path.join(root, f"eight-{name}"))
        out[f"{name}_files"] = n
        out[f"{name}_metadata_bytes"] = meta
    return out


# ---------------------------------------------------------------------------------------------
# 3. Sixty-four writers, simulated


def sixty_four(shape: str, args: argparse.Namespace, root: str) -> dict[str, Any]:
    import ckpt
    from ckpt.commit import commit
    from ckpt.format import writer_name
    from ckpt.io import write_plan
    from ckpt.plan import plan_save

    world = 64
    rows = max(args.rows, world)
    full = train_state(params(SHAPES[shape], rows, args.cols))

    def sharded(v: Any, r: int) -> Any:
        if isinstance(v, dict):
            return {k: sharded(x, r) for k, x in v.items()}
        if isinstance(v, list):
            return [sharded(x, r) for x in v]
        if hasattr(v, "dim") and v.dim() >= 1:
            return ckpt.Sharded(v.chunk(world, dim=0)[r], dim=0, rank=r, world=world)
        return v

    path = fresh(root, "sixtyfour-ckpt")
    storage = ckpt.open_storage(path)
    writers = [writer_name(r) for r in range(world)]
    t0 = time.perf_counter()
    plan_s = 0.0
    for r in range(world):
        t = time.perf_counter()
        plan = plan_save(sharded(full, r), rank=r, world=world)
        plan_s += time.perf_counter() - t
        write_plan(storage, plan, step=1, writer=writers[r], save_id="sim")
    commit(storage, 1, writers, save_id="sim")
    total = time.perf_counter() - t0
    n, meta = files_and_bytes(path)
    return {"writers": world, "save_s": total, "plan_s_per_rank": plan_s / world, "ckpt_files": n,
            "ckpt_metadata_bytes": meta, "dcp_files": world + 1}


# ---------------------------------------------------------------------------------------------
# 3b. Planning at world 4,096 (a fake process group, meta tensors)

PLAN_WORLD = 4096


def _plan_worker(world: int, layers: int) -> dict[str, Any]:
    """One rank's planning of a Llama-shaped state of DTensors on a 2-D mesh (dp x tp = world),
    in a fresh process: a fake process group and meta tensors, nothing allocated or sent."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from ckpt.plan import plan_save

    rank = 1234 % world
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    tp = 8
    mesh = init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("dp_shard", "tp"))
    shape = (world * 2, 64)
    state = {}
    for layer in range(layers):
        for w in WEIGHTS:
            local = torch.empty((shape[0] // (world // tp), shape[1] // tp), device="meta")
            state[f"layers.{layer}.{w}"] = DTensor.from_local(local, mesh, [Shard(0), Shard(1)], run_check=False,
                                                              shape=torch.Size(shape), stride=(shape[1], 1))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        plan = plan_save(state, rank=rank, world=world)
        times.append(time.perf_counter() - t0)
    return {"world": world, "arrays": len(state), "plan_s": statistics.median(times), "requests": len(plan.requests)}


def planning(shape: str, args: argparse.Namespace, root: str) -> dict[str, Any]:
    import subprocess

    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_shapes; "
            f"print(json.dumps(bench_shapes._plan_worker({PLAN_WORLD}, {SHAPES[shape] * 25 // 9})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# 4. CPU per checkpoint


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def cpu_per_checkpoint(shape: str, args: argparse.Namespace, root: str) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict_saver import async_save

    import ckpt

    state = train_state(params(SHAPES[shape], args.rows, args.cols))
    out: dict[str, Any] = {}
    ours, theirs = [], []
    with ckpt.Checkpointer(fresh(root, "cpu-ckpt"), every_n_steps=1, keep_last=2) as c:
        for step in range(args.reps + 1):
            c0 = cpu_s()
            c.save(step, state).result()
            if step:  # the first checkpoint builds the plan and the host pool
                ours.append(cpu_s() - c0)
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    for step in range(args.reps + 1):
        c0 = cpu_s()
        async_save(state, checkpoint_id=fresh(root, f"cpu-dcp-{step % 2}")).result()
        if step:
            theirs.append(cpu_s() - c0)
    dist.destroy_process_group()
    out["ckpt_cpu_s"] = statistics.median(ours)
    out["dcp_async_cpu_s"] = statistics.median(theirs)
    return out


# ---------------------------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def report(results: dict[str, Any]) -> None:
    for shape, sec in results.items():
        print(f"\n== {shape} ({sec.get('one', {}).get('arrays', '?')} arrays per full state)")
        one = sec.get("one")
        if one:
            print(f"  1 writer   save ckpt {one['ckpt_save_s']:.3f} s, DCP {one['dcp_save_s']:.3f} s "
                  f"({ratio(one['ckpt_save_s'], one['dcp_save_s'])} DCP), torch.save {one['torch_save_s']:.3f} s")
            print(f"             load ckpt {one['ckpt_load_s']:.3f} s, DCP {one['dcp_load_s']:.3f} s "
                  f"({ratio(one['ckpt_load_s'], one['dcp_load_s'])}), torch.load {one['torch_load_s']:.3f} s")
            print(f"             files ckpt {one['ckpt_files']}, DCP {one['dcp_files']}, torch.save 1; "
                  f"metadata ckpt {one['ckpt_metadata_bytes']}, DCP {one['dcp_metadata_bytes']['dcp_metadata']} B")
        eight = sec.get("eight")
        if eight:
            print(f"  8 writers  save ckpt {eight['ckpt_save_s']:.3f} s, DCP {eight['dcp_save_s']:.3f} s "
                  f"({ratio(eight['ckpt_save_s'], eight['dcp_save_s'])}); load 8->8 ckpt {eight['ckpt_load_8_s']:.3f} s, "
                  f"DCP {eight['dcp_load_8_s']:.3f} s ({ratio(eight['ckpt_load_8_s'], eight['dcp_load_8_s'])}); "
                  f"8->6 ckpt {eight['ckpt_load_6_s']:.3f} s, DCP {eight['dcp_load_6_s']:.3f} s "
                  f"({ratio(eight['ckpt_load_6_s'], eight['dcp_load_6_s'])})")
            print(f"             files ckpt {eight['ckpt_files']}, DCP {eight['dcp_files']}; metadata ckpt "
                  f"{eight['ckpt_metadata_bytes']}, DCP {eight['dcp_metadata_bytes']['dcp_metadata']} B")
        sim = sec.get("sixtyfour")
        if sim:
            print(f"  64 writers (simulated) files ckpt {sim['ckpt_files']}, DCP {sim['dcp_files']}; metadata "
                  f"{sim['ckpt_metadata_bytes']}; save {sim['save_s']:.2f} s, planning {sim['plan_s_per_rank'] * 1e3:.1f} ms/rank")
        plan = sec.get("planning")
        if plan:
            print(f"  planning one rank of {plan['world']} (DTensors, 2-D mesh): {plan['arrays']} arrays in "
                  f"{plan['plan_s']:.3f} s")
        cpu = sec.get("cpu")
        if cpu:
            print(f"  CPU per checkpoint: Checkpointer {cpu['ckpt_cpu_s']:.3f} s, async_save {cpu['dcp_async_cpu_s']:.3f} s "
                  f"({ratio(cpu['ckpt_cpu_s'], cpu['dcp_async_cpu_s'])})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="7b,70b")
    p.add_argument("--sections", default="one,eight,sixtyfour,planning,cpu")
    p.add_argument("--rows", type=int, default=48, help="rows of every tensor (divisible by 8 and 6)")
    p.add_argument("--cols", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--root", help="where checkpoints go (default: a temp dir, removed after)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    import warnings

    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    root = args.root or tempfile.mkdtemp(prefix="bench-shapes-")
    sections = {"one": one_writer, "eight": eight_writers, "sixtyfour": sixty_four, "planning": planning,
                "cpu": cpu_per_checkpoint}
    results: dict[str, Any] = {}
    try:
        for shape in args.shapes.split(","):
            results[shape] = {}
            for name in args.sections.split(","):
                t0 = time.perf_counter()
                results[shape][name] = sections[name](shape, args, root)
                print(f"[{shape} {name}] {time.perf_counter() - t0:.1f} s", flush=True)
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)
    report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
