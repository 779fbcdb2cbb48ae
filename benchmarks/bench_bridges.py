#!/usr/bin/env python
"""The bridges side by side: DCP through ckpt.dcp against DCP's own filesystem backend, and a
Hugging Face export by ckpt against transformers' own save_pretrained.

One run measures, on the same machine and the same state, one system after the other within
every repeat (medians over ``--reps``; every load checked bit for bit, untimed):

1. ``dcp.save`` of a training-like state (``--tensors`` float32 tensors of ``--mb`` MiB in all,
   plus an optimizer-like ``param_groups`` value), one process, no process group:
   ``FileSystemWriter`` (DCP's default: one file per rank, fsync) vs ``ckpt.dcp.Writer``
   (``layout="shards"``, the default: packs then consolidation into zarr shards, so any zarr
   reader opens the step; and ``layout="packs"``: no consolidation, read by ckpt). Time and
   files per checkpoint.
2. ``dcp.load`` of the same state, in place: ``FileSystemReader`` vs ``ckpt.dcp.Reader`` (on
   the shards step and on the packs step). Page cache warm for every system (said so).
3. A random-init Llama-style ``transformers`` model (``--hf-*`` shape, float32, untied
   embeddings): ``model.save_pretrained(dir)`` vs ``ckpt export RUN --format hf dir`` of the
   same weights saved by ``ckpt.save({"model": model.state_dict()})`` (the training job's
   checkpoint, not timed); both outputs load with ``from_pretrained`` to the same logits
   (checked once, untimed).

    python benchmarks/bench_bridges.py
    python benchmarks/bench_bridges.py --mb 1024 --tensors 400 --reps 5 --json out.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
warnings.filterwarnings("ignore")


def files_and_bytes(path: str) -> tuple[int, int]:
    n = size = 0
    for d, _s, fs in os.walk(path):
        for f in fs:
            n += 1
            size += os.path.getsize(os.path.join(d, f))
    return n, size


def make_state(mb: int, tensors: int) -> dict[str, Any]:
    import torch

    per = max(1, (mb << 20) // 4 // tensors)
    cols = 256
    g = torch.Generator().manual_seed(0)
    model = {f"layers.{i}.weight": torch.randn(max(1, per // cols), cols, generator=g) for i in range(tensors)}
    return {"model": model, "optim": {"param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": list(model)}]},
            "step": 100}


def zeros_like(state: Any) -> Any:
    import copy

    import torch

    if isinstance(state, dict):
        return {k: zeros_like(v) for k, v in state.items()}
    if isinstance(state, torch.Tensor):
        return torch.zeros_like(state)
    return copy.deepcopy(state)


def same(a: Any, b: Any) -> bool:
    import torch

    if isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in b)
    if isinstance(b, torch.Tensor):
        return torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1 else a, b)
    return a == b


def timed(fn: Any, *args: Any) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def bench_dcp(args: argparse.Namespace, root: str) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    import ckpt.dcp

    state = make_state(args.mb, args.tensors)
    nbytes = sum(t.numel() * 4 for t in state["model"].values())
    systems = {
        "dcp FileSystemWriter": lambda d: dcp.save(state, storage_writer=dcp.FileSystemWriter(d)),
        "ckpt.dcp.Writer shards": lambda d: dcp.save(state, storage_writer=ckpt.dcp.Writer(d, step=1)),
        "ckpt.dcp.Writer packs": lambda d: dcp.save(state, storage_writer=ckpt.dcp.Writer(d, step=1, layout="packs")),
    }
    readers = {
        "dcp FileSystemReader": ("dcp FileSystemWriter", lambda d: dcp.FileSystemReader(d)),
        "ckpt.dcp.Reader (shards step)": ("ckpt.dcp.Writer shards", lambda d: ckpt.dcp.Reader(d)),
        "ckpt.dcp.Reader (packs step)": ("ckpt.dcp.Writer packs", lambda d: ckpt.dcp.Reader(d)),
    }
    saves: dict[str, list[float]] = {k: [] for k in systems}
    loads: dict[str, list[float]] = {k: [] for k in readers}
    files: dict[str, tuple[int, int]] = {}
    for rep in range(args.reps):
        dirs = {}
        for name, save in systems.items():
            d = os.path.join(root, f"dcp-{rep}-{name.replace(' ', '_')}")
            os.sync()
            saves[name].append(timed(save, d))
            files[name] = files_and_bytes(d)
            dirs[name] = d
        for name, (source, reader) in readers.items():
            into = zeros_like(state)
            loads[name].append(timed(functools.partial(dcp.load, into, storage_reader=reader(dirs[source]))))
            if not same(into, state):
                raise AssertionError(f"{name}: the load differs from the state")
        for d in dirs.values():
            shutil.rmtree(d)
    out = {"state_bytes": nbytes, "tensors": args.tensors, "save": {}, "load": {}}
    base = statistics.median(saves["dcp FileSystemWriter"])
    print(f"\n1. dcp.save of {args.tensors} tensors, {nbytes / 2**20:.0f} MiB, one process "
          f"(median of {args.reps}):")
    print(f"   {'system':28} {'time':>8} {'ratio':>6} {'files':>6}")
    for name, times in saves.items():
        med = statistics.median(times)
        out["save"][name] = {"s": med, "ratio": med / base, "files": files[name][0], "bytes": files[name][1]}
        print(f"   {name:28} {med:7.2f}s {med / base:5.2f}x {files[name][0]:6d}")
    base = statistics.median(loads["dcp FileSystemReader"])
    print(f"\n2. dcp.load of the same state, in place, page cache warm (median of {args.reps}):")
    for name, times in loads.items():
        med = statistics.median(times)
        out["load"][name] = {"s": med, "ratio": med / base}
        print(f"   {name:28} {med:7.2f}s {med / base:5.2f}x")
    return out


def bench_hf(args: argparse.Namespace, root: str) -> dict[str, Any]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import ckpt
    from ckpt.cli import main as ckpt_cli

    cfg = LlamaConfig(vocab_size=args.hf_vocab, hidden_size=args.hf_hidden, intermediate_size=args.hf_hidden * 8 // 3,
                      num_hidden_layers=args.hf_layers, num_attention_heads=max(1, args.hf_hidden // 64),
                      num_key_value_heads=max(1, args.hf_hidden // 256), tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    run = os.path.join(root, "hf-run")
    ckpt.save({"model": model.state_dict()}, run, step=1)
    cfg_dir = os.path.join(root, "hf-cfg")
    cfg.save_pretrained(cfg_dir)
    times: dict[str, list[float]] = {"transformers save_pretrained": [], "ckpt export --format hf": []}
    files: dict[str, tuple[int, int]] = {}
    for rep in range(args.reps):
        a, b = os.path.join(root, f"sp-{rep}"), os.path.join(root, f"ex-{rep}")
        os.sync()
        times["transformers save_pretrained"].append(timed(model.save_pretrained, a))
        os.sync()
        times["ckpt export --format hf"].append(timed(
            ckpt_cli, ["export", run, "--format", "hf", b, "--config", os.path.join(cfg_dir, "config.json")]))
        files = {"transformers save_pretrained": files_and_bytes(a), "ckpt export --format hf": files_and_bytes(b)}
        if rep == 0:
            ids = torch.randint(0, args.hf_vocab, (1, 16), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                ref = model(ids).logits
                for d in (a, b):
                    if not torch.equal(LlamaForCausalLM.from_pretrained(d).eval()(ids).logits, ref):
                        raise AssertionError(f"{d}: from_pretrained gives other logits")
        shutil.rmtree(a)
        shutil.rmtree(b)
    base = statistics.median(times["transformers save_pretrained"])
    print(f"\n3. Hugging Face folder of a Llama-style model, {nbytes / 2**20:.0f} MiB float32 "
          f"({args.hf_layers} layers, hidden {args.hf_hidden}, vocab {args.hf_vocab}; median of {args.reps}):")
    out: dict[str, Any] = {"state_bytes": nbytes}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {"s": med, "ratio": med / base, "files": files[name][0], "bytes": files[name][1]}
        print(f"   {name:30} {med:7.2f}s {med / base:5.2f}x {files[name][0]:4d} files")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=512, help="size of the DCP state in MiB (default 512)")
    p.add_argument("--tensors", type=int, default=300, help="tensors of the DCP state (default 300)")
    p.add_argument("--hf-layers", type=int, default=8)
    p.add_argument("--hf-hidden", type=int, default=768)
    p.add_argument("--hf-vocab", type=int, default=32000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--sections", default="dcp,hf", help="dcp, hf or both (default)")
    p.add_argument("--dir", help="where to write (default: a temp directory)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    root = tempfile.mkdtemp(prefix="bench-bridges-", dir=args.dir)
    print(f"bench_bridges: torch {torch.__version__}, {os.cpu_count()} cores, writing under {root}")
    result: dict[str, Any] = {}
    try:
        if "dcp" in args.sections:
            result["dcp"] = bench_dcp(args, root)
        if "hf" in args.sections:
            result["hf"] = bench_hf(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
