"""The main job of the README: save a sharded checkpoint with 4 processes, reshard-load it with 3.

    python -m ckpt.demo [--run DIR] [--save-world 4] [--load-world 3]

Every process builds the same small GPT-style model from a seed; the saving job shards its
parameters and optimizer state row-wise (Shard(0), as FSDP does) across ``--save-world``
gloo processes; the loading job shards them column-wise (Shard(1), as tensor parallelism
does) across ``--load-world`` processes, loads, and checks every value against the model.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def build_state(seed: int = 0) -> dict[str, Any]:
    """A GPT-style model's parameters and Adam moments, as plain full tensors."""
    g = torch.Generator().manual_seed(seed)
    vocab, dim, layers = 1000, 96, 4
    model: dict[str, torch.Tensor] = {"tok_emb.weight": torch.randn(vocab, dim, generator=g)}
    for i in range(layers):
        p = f"blocks.{i}."
        model[p + "attn.qkv.weight"] = torch.randn(3 * dim, dim, generator=g)
        model[p + "attn.proj.weight"] = torch.randn(dim, dim, generator=g)
        model[p + "mlp.up.weight"] = torch.randn(4 * dim, dim, generator=g)
        model[p + "mlp.down.weight"] = torch.randn(dim, 4 * dim, generator=g)
        model[p + "ln.weight"] = torch.randn(dim, generator=g)
    model["lm_head.weight"] = torch.randn(vocab, dim, generator=g).bfloat16()
    optim = {name: {"exp_avg": torch.randn(t.shape, generator=g), "exp_avg_sq": torch.rand(t.shape, generator=g)}
             for name, t in model.items() if t.dim() == 2}
    return {"model": model, "optim": {"state": optim}}


def _shard(state: Any, mesh: Any, dim: int) -> Any:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    if isinstance(state, dict):
        return {k: _shard(v, mesh, dim) for k, v in state.items()}
    placement = Shard(dim) if state.dim() > dim else Replicate()
    return distribute_tensor(state, mesh, [placement])


def _worker(rank: int, world: int, port: int, role: str, run: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        import ckpt

        mesh = init_device_mesh("cpu", (world,))
        reference = build_state()
        report: dict[str, Any] = {}
        if role == "save":
            state = _shard(reference, mesh, 0)
            state["step"] = 1000
            state["data_loader"] = {"epoch": 3, "sample": 1000 * 32 * world + rank}
            t0 = time.perf_counter()
            manifest = ckpt.save(state, run, step=1000, progress=False)
            report["seconds"] = time.perf_counter() - t0
            report["tensors"] = len(manifest.arrays)
            report["chunks"] = sum(a.num_chunks for a in manifest.arrays.values())
        else:
            state = _shard({k: v for k, v in reference.items()}, mesh, 1)
            for part in (state["model"], *state["optim"]["state"].values()):
                for t in part.values():
                    t.to_local().zero_()
            state["step"] = 0
            state["data_loader"] = None
            t0 = time.perf_counter()
            step = ckpt.load(state, run)
            report["seconds"] = time.perf_counter() - t0
            report["step"] = step
            bad = []
            for name, t in state["model"].items():
                if not torch.equal(t.full_tensor(), reference["model"][name]):
                    bad.append(name)
            for name, moments in state["optim"]["state"].items():
                for k, t in moments.items():
                    if not torch.equal(t.full_tensor(), reference["optim"]["state"][name][k]):
                        bad.append(f"{name}/{k}")
            report["mismatched"] = bad
            report["data_loader"] = state["data_loader"]
        if rank == 0:
            Path(out).write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, role: str, run: str) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        mp.start_processes(_worker, args=(world, _free_port(), role, run, out), nprocs=world, start_method="spawn")
        return json.loads(Path(out).read_text())
    finally:
        os.unlink(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ckpt.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default=None, help="run directory or fsspec URL (default: a new temp dir)")
    parser.add_argument("--save-world", type=int, default=4)
    parser.add_argument("--load-world", type=int, default=3)
    args = parser.parse_args(argv)
    run = args.run or tempfile.mkdtemp(prefix="ckpt-demo-")
    import ckpt

    state = build_state()
    params = sum(t.numel() * t.element_size() for t in state["model"].values())
    moments = sum(t.numel() * t.element_size() for m in state["optim"]["state"].values() for t in m.values())
    print(f"run: {run}")
    print(f"model: GPT-style, {params / 1e6:.1f} MB of parameters + {moments / 1e6:.1f} MB of Adam moments")
    try:
        saved = _launch(args.save_world, "save", run)
        print(f"saved step 1000 with {args.save_world} processes, parameters sharded Shard(0): "
              f"{saved['tensors']} tensors in {saved['chunks']} chunks, {saved['seconds']:.2f} s")
        storage = ckpt.open_storage(run)
        for info in ckpt.list_steps(storage):
            size = sum(storage.walk(ckpt.format.step_dir(info.step)).values())
            print(f"  step {info.step}: {'committed' if info.committed else 'incomplete'}, {size / 1e6:.1f} MB on storage")
        loaded = _launch(args.load_world, "load", run)
        print(f"loaded step {loaded['step']} with {args.load_world} processes, resharded to Shard(1): "
              f"{loaded['seconds']:.2f} s; data loader state of rank 0: {loaded['data_loader']}")
        if loaded["mismatched"]:
            print(f"MISMATCH in {len(loaded['mismatched'])} tensors: {loaded['mismatched'][:5]}")
            return 1
        print("every parameter and optimizer moment is bit-identical to the model that was saved")
        print(f"inspect it with: ckpt inspect {run}   verify it with: ckpt verify {run}")
        return 0
    except Exception:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
