#!/usr/bin/env python
"""Side-by-side throughput of the ckpt format against raw file I/O, torch.save and DCP.

One run measures, on the same storage directory and the same state (a GPT-like block stack of
float32 and bfloat16 matrices plus small vectors, ``--size-mb`` of tensor bytes):

1. raw: one file per tensor, ``write`` + ``fsync`` (our durability), then ``readinto``
   preallocated buffers; single thread, sequential: the baseline;
2. ``torch.save`` (+ ``fsync`` of the file, for fairness) / ``torch.load`` (weights_only,
   no mmap; it allocates its own tensors);
3. ``torch.distributed.checkpoint`` save/load, one process, no process group,
   ``FileSystemWriter`` (``sync_files=True``, its default: it fsyncs) / ``FileSystemReader``,
   loading in place into preallocated tensors;
4. ``ckpt.save`` / ``ckpt.load`` (defaults), loading in place into preallocated tensors;
5. resharding: the state saved as if by 4 writers holding ``torch.chunk(t, 4, dim=0)`` pieces
   (``ckpt.Sharded(piece, dim=0, rank=r, world=4)``, ``plan_save``/``write_plan``/``commit``
   in this one process), then loaded by (a) 4 readers with the same split and (b) 3 readers
   with a ``torch.chunk(t, 3, dim=0)`` split; readers run one after the other in this process
   (each a full ``ckpt.load``: manifest, plan, read), total time of all readers per layout.

   ``Sharded(dim=0, world=W)`` without ``logical_size`` means equal local sizes (global =
   local x W). torch.chunk of n rows in 3 gives ceil(n/3) rows to every rank but the last,
   which gets fewer; that is exactly ``Sharded(buf, dim=0, rank=r, world=3,
   logical_size=n)`` with every local buffer ceil(n/3) rows (the last one's padding rows
   are zero-filled by the load). The 3 buffers are consecutive slices of one padded buffer
   of 3*ceil(n/3) rows whose first n rows are the destination tensor, so no extra copy.

Page cache: before every load (and before every save: ``sync``) the script drops the page
cache (``echo 3 > /proc/sys/vm/drop_caches``, root only). If that is refused, every system
reads warm (its own just-written files); the report says which. Within one resharded layout
the readers share the page cache (as processes on one node do).

Every measurement is repeated ``--repeat`` times, the systems interleaved within a repeat;
medians are reported. Every load is verified bit for bit against the source (not timed).
Peak memory is the state plus one copy (the load destination, or torch.load's result).

    python benchmarks/bench_format.py                       # ~1 GiB, 3 repeats
    python benchmarks/bench_format.py --size-mb 64 --repeat 1   # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable
from typing import Any

import torch

try:
    import ckpt
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import ckpt

GB = 1e9
RESHARD_SAVE = 4
RESHARD_LOAD = 3
# ckpt's max_chunk_bytes for every ckpt save (None: the library default); --max-chunk-mb
MAX_CHUNK_BYTES: int | None = None

# ---------------------------------------------------------------------------------------------
# State


def layer_shapes(d: int) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, shape, is_matrix_dtype) of one pre-LN GPT block of width ``d``."""
    return [
        ("ln1.weight", (d,), False),
        ("ln1.bias", (d,), False),
        ("attn.qkv.weight", (3 * d, d), True),
        ("attn.qkv.bias", (3 * d,), True),
        ("attn.proj.weight", (d, d), True),
        ("attn.proj.bias", (d,), True),
        ("ln2.weight", (d,), False),
        ("ln2.bias", (d,), False),
        ("mlp.fc1.weight", (4 * d, d), True),
        ("mlp.fc1.bias", (4 * d,), True),
        ("mlp.fc2.weight", (d, 4 * d), True),
        ("mlp.fc2.bias", (d,), True),
    ]


def layer_dtype(layer: int) -> torch.dtype:
    # Mixed precision stack: even blocks float32, odd blocks bfloat16 (norms stay float32).
    return torch.float32 if layer % 2 == 0 else torch.bfloat16


def layer_nbytes(d: int, layer: int) -> int:
    return sum(math.prod(s) * (layer_dtype(layer).itemsize if m else 4) for _n, s, m in layer_shapes(d))


def plan_state(size_mb: float) -> tuple[int, int]:
    """Width and depth whose total is closest to ``size_mb`` MiB (at least 2 blocks)."""
    target = size_mb * (1 << 20)
    d = 2048
    while d > 128 and layer_nbytes(d, 0) > target / 2:
        d //= 2
    total, layers = 0, 0
    while layers < 2 or total + layer_nbytes(d, layers) / 2 <= target:
        total += layer_nbytes(d, layers)
        layers += 1
    return d, layers


def build_state(d: int, layers: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(layers):
        for name, shape, is_mat in layer_shapes(d):
            dtype = layer_dtype(layer) if is_mat else torch.float32
            t = torch.empty(shape, dtype=torch.float32).normal_(generator=g)
            state[f"layers.{layer}.{name}"] = t if dtype == torch.float32 else t.to(dtype)
    return state


def state_nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
    )


class Dest:
    """Preallocated, page-faulted load destinations: one padded buffer per tensor.

    ``full[k]`` is the destination tensor (the first n rows of the buffer); the buffer has
    RESHARD_LOAD * ceil(n / RESHARD_LOAD) rows so the 3-reader layout can use slices of it.
    """

    def __init__(self, src: dict[str, torch.Tensor]) -> None:
        self.buf: dict[str, torch.Tensor] = {}
        self.full: dict[str, torch.Tensor] = {}
        for k, t in src.items():
            n = t.shape[0]
            rows = RESHARD_LOAD * -(-n // RESHARD_LOAD)
            buf = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype)  # zeros: pages faulted in now
            self.buf[k] = buf
            self.full[k] = buf[:n]

    def clear(self) -> None:
        for b in self.buf.values():
            b.zero_()

    def check(self, src: dict[str, torch.Tensor], what: str) -> None:
        bad = [k for k, t in src.items() if not bits_equal(self.full[k], t)]
        bad += [k for k, b in self.buf.items() if b.shape[0] > src[k].shape[0] and b[src[k].shape[0] :].any()]
        if bad:
            raise AssertionError(f"{what}: {len(bad)} tensors differ from the source, e.g. {bad[:3]}")


def check_loaded(loaded: dict[str, torch.Tensor], src: dict[str, torch.Tensor], what: str) -> None:
    bad = [k for k, t in src.items() if k not in loaded or not bits_equal(loaded[k], t)]
    if bad or set(loaded) != set(src):
        raise AssertionError(f"{what}: {len(bad)} tensors differ from the source, e.g. {bad[:3]}")


# ---------------------------------------------------------------------------------------------
# Page cache


def can_drop_caches() -> bool:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
        return True
    except OSError:
        return False


def settle(drop: bool) -> None:
    """Flush dirty pages (always) and drop the page cache (when allowed) before a phase."""
    gc.collect()
    os.sync()
    if drop:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")


# ---------------------------------------------------------------------------------------------
# Systems


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_write(state: dict[str, torch.Tensor], d: str) -> None:
    os.makedirs(d)
    for i, t in enumerate(state.values()):
        view = as_bytes(t)
        fd = os.open(os.path.join(d, f"{i}.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            while view.nbytes:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)


def raw_read(dest: dict[str, torch.Tensor], d: str) -> None:
    for i, t in enumerate(dest.values()):
        view = as_bytes(t)
        with open(os.path.join(d, f"{i}.bin"), "rb", buffering=0) as f:
            while view.nbytes:
                n = f.readinto(view)
                if not n:
                    raise EOFError(f"{d}/{i}.bin: short")
                view = view[n:]


def torch_save(state: dict[str, torch.Tensor], d: str) -> None:
    os.makedirs(d)
    with open(os.path.join(d, "state.pt"), "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def torch_load(d: str) -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True, mmap=False)


def dcp_save(state: dict[str, torch.Tensor], d: str) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(d, sync_files=True), no_dist=True)


def dcp_load(dest: dict[str, torch.Tensor], d: str) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(dest, storage_reader=dcp.FileSystemReader(d), no_dist=True)


def _chunk_kw() -> dict[str, int]:
    return {} if MAX_CHUNK_BYTES is None else {"max_chunk_bytes": MAX_CHUNK_BYTES}


def ckpt_save(state: dict[str, torch.Tensor], d: str) -> None:
    ckpt.save(state, d, step=0, **_chunk_kw())


def ckpt_load(dest: dict[str, torch.Tensor], d: str) -> None:
    ckpt.load(dest, d)


def reshard_save(state: dict[str, torch.Tensor], d: str, world: int = RESHARD_SAVE) -> None:
    """Save as ``world`` writers each holding torch.chunk(t, world, 0)[r], one after the other."""
    storage = ckpt.open_storage(d)
    writers = [ckpt.format.writer_name(r) for r in range(world)]
    save_id = uuid.uuid4().hex
    for r in range(world):
        local = {k: _sharded(t, torch.chunk(t, world, 0)[r], r, world) for k, t in state.items()}
        plan = ckpt.plan_save(local, rank=r, world=world, **_chunk_kw())
        ckpt.write_plan(storage, plan, step=0, writer=writers[r], save_id=save_id)
    ckpt.commit(storage, 0, writers, save_id=save_id)


def _sharded(full: torch.Tensor, piece: torch.Tensor, rank: int, world: int) -> ckpt.Sharded:
    n = full.shape[0]
    if n % world == 0:
        return ckpt.Sharded(piece, dim=0, rank=rank, world=world)
    raise ValueError(f"save layout needs dim 0 ({n}) divisible by {world}")


def reader_states(dest: Dest, world: int) -> list[dict[str, ckpt.Sharded]]:
    """Destinations of ``world`` readers, each its torch.chunk(t, world, 0) piece of ``dest``."""
    states: list[dict[str, ckpt.Sharded]] = [{} for _ in range(world)]
    for k, full in dest.full.items():
        n = full.shape[0]
        local = -(-n // world)
        for r in range(world):
            if n % world == 0:
                states[r][k] = ckpt.Sharded(full.narrow(0, r * local, local), dim=0, rank=r, world=world)
            else:  # uneven torch.chunk: padded local buffers, see the module docstring
                assert dest.buf[k].shape[0] >= world * local
                piece = dest.buf[k].narrow(0, r * local, local)
                states[r][k] = ckpt.Sharded(piece, dim=0, rank=r, world=world, logical_size=n)
    return states


def load_readers(states: list[dict[str, ckpt.Sharded]], d: str, per_reader: list[float]) -> None:
    for st in states:
        t0 = time.perf_counter()
        ckpt.load(st, d)
        per_reader.append(time.perf_counter() - t0)


def planned_read_bytes(states: list[dict[str, ckpt.Sharded]], d: str) -> int:
    """Bytes of chunks the readers' plans read in total (chunks overlapping two readers count twice)."""
    storage = ckpt.open_storage(d)
    manifest = ckpt.read_manifest(storage)
    return sum(ckpt.plan_load(st, manifest).nbytes for st in states)


# ---------------------------------------------------------------------------------------------
# Driver


class Recorder:
    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}
        self.extra: dict[str, list[float]] = {}

    def add(self, name: str, seconds: float) -> None:
        self.times.setdefault(name, []).append(seconds)

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])


def timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def du(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(root, f)).st_size
    return total


def run_repeat(src: dict[str, torch.Tensor], base: str, drop: bool, rec: Recorder, rep: int, log: Callable) -> None:
    def phase_dir(name: str) -> str:
        d = os.path.join(base, f"{name}-{rep}")
        shutil.rmtree(d, ignore_errors=True)
        return d

    # torch.save/torch.load first: torch.load allocates its own copy, so no destination yet.
    d = phase_dir("torch")
    settle(drop)
    t, _ = timed(torch_save, src, d)
    rec.add("torch.save", t)
    settle(drop)
    t, loaded = timed(torch_load, d)
    rec.add("torch.load", t)
    check_loaded(loaded, src, "torch.load")
    del loaded
    shutil.rmtree(d)
    log(f"  torch  save {rec.times['torch.save'][-1]:6.2f}s  load {rec.times['torch.load'][-1]:6.2f}s")

    dest = Dest(src)
    simple: list[tuple[str, str, Callable, Callable]] = [
        ("raw", "raw", raw_write, raw_read),
        ("dcp", "DCP", dcp_save, dcp_load),
        ("ckpt", "ckpt", ckpt_save, ckpt_load),
    ]
    for key, label, save_fn, load_fn in simple:
        d = phase_dir(key)
        settle(drop)
        t, _ = timed(save_fn, src, d)
        rec.add(f"{label} save", t)
        rec.extra.setdefault(f"{label} stored bytes", []).append(du(d))
        dest.clear()
        settle(drop)
        t, _ = timed(load_fn, dest.full, d)
        rec.add(f"{label} load", t)
        dest.check(src, f"{label} load")
        shutil.rmtree(d)
        log(f"  {key:6s} save {rec.times[f'{label} save'][-1]:6.2f}s  load {rec.times[f'{label} load'][-1]:6.2f}s")

    d = phase_dir("reshard")
    settle(drop)
    t, _ = timed(reshard_save, src, d)
    rec.add(f"ckpt save {RESHARD_SAVE} writers", t)
    for world in (RESHARD_SAVE, RESHARD_LOAD):
        states = reader_states(dest, world)
        if rep == 0:
            rec.extra[f"read bytes {RESHARD_SAVE}->{world}"] = [planned_read_bytes(states, d)]
        dest.clear()
        per: list[float] = []
        settle(drop)
        t, _ = timed(load_readers, states, d, per)
        rec.add(f"ckpt load {RESHARD_SAVE}->{world} readers", t)
        rec.extra.setdefault(f"max reader {RESHARD_SAVE}->{world}", []).append(max(per))
        dest.check(src, f"load {RESHARD_SAVE}->{world}")
        del states
    shutil.rmtree(d)
    log(
        f"  reshard save x{RESHARD_SAVE} {rec.times[f'ckpt save {RESHARD_SAVE} writers'][-1]:6.2f}s  "
        f"load {RESHARD_SAVE}->{RESHARD_SAVE} {rec.times[f'ckpt load {RESHARD_SAVE}->{RESHARD_SAVE} readers'][-1]:6.2f}s  "
        f"load {RESHARD_SAVE}->{RESHARD_LOAD} {rec.times[f'ckpt load {RESHARD_SAVE}->{RESHARD_LOAD} readers'][-1]:6.2f}s"
    )
    del dest


_FIRST_CALL = r"""
import os, sys, time, tempfile, warnings
import torch
which, root = sys.argv[1], sys.argv[2]
sys.path.insert(0, root)
import ckpt
state = {"w": torch.zeros(16, 16)}
d = tempfile.mkdtemp(dir=sys.argv[3])
t0 = time.perf_counter()
if which == "ckpt":
    ckpt.save(state, d, step=0)
elif which == "torch":
    torch.save(state, os.path.join(d, "s.pt"))
else:
    warnings.simplefilter("ignore")
    import torch.distributed.checkpoint as dcp
    dcp.save(state, storage_writer=dcp.FileSystemWriter(d), no_dist=True)
print(time.perf_counter() - t0)
"""


def first_call_seconds(base: str) -> dict[str, float]:
    """Seconds of the first save of a tiny state in a fresh process (after ``import torch, ckpt``).

    What a job pays once per process on top of the steady state measured in the table (lazy
    imports); the timed phases of the table run after every system has been used once.
    """
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = {}
    for which in ("torch", "dcp", "ckpt"):
        r = subprocess.run(
            [sys.executable, "-c", _FIRST_CALL, which, root, base], capture_output=True, text=True, check=False
        )
        try:
            out[which] = float(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            out[which] = float("nan")
    return out


def warm_up(base: str) -> None:
    """Use every system once on a tiny state so no timed phase pays a lazy import."""
    tiny = {"w": torch.zeros(8, 8), "b": torch.zeros(8)}
    dest = {"w": torch.empty(8, 8), "b": torch.empty(8)}
    d = os.path.join(base, "warmup")
    for save_fn, load_fn in ((torch_save, None), (dcp_save, dcp_load), (ckpt_save, ckpt_load)):
        shutil.rmtree(d, ignore_errors=True)
        save_fn(tiny, d)
        if load_fn is None:
            torch_load(d)
        else:
            load_fn(dest, d)
    shutil.rmtree(d, ignore_errors=True)


def disk_description(path: str) -> str:
    try:
        st = os.stat(path)
        sys_dev = os.path.realpath(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
        name = os.path.basename(sys_dev)
        queue = os.path.join(sys_dev, "queue")
        if not os.path.isdir(queue):  # a partition: the queue is the parent's
            queue = os.path.join(os.path.dirname(sys_dev), "queue")
        with open(os.path.join(queue, "rotational")) as f:
            rot = f.read().strip()
        kind = "virtio" if name.startswith("vd") else "nvme" if name.startswith("nvme") else "block"
        fs = "?"
        with open("/proc/mounts") as f:
            best = ""
            for line in f:
                parts = line.split()
                if path.startswith(parts[1]) and len(parts[1]) > len(best):
                    best, fs = parts[1], parts[2]
        return f"/dev/{name} ({kind}, {fs}, rotational={rot})"
    except OSError:
        return "unknown"


def machine(base: str) -> dict[str, Any]:
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(mem / (1 << 30), 1),
        "disk": disk_description(base),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ckpt": ckpt.__version__,
    }


RATIOS = [
    # (name, numerator, denominator, kind, target) ; kind "speed": den_time / num_time
    ("ckpt save / raw write (throughput)", "ckpt save", "raw save", "speed", (">=", 0.9)),
    ("ckpt load / raw read (throughput)", "ckpt load", "raw load", "speed", (">=", 0.9)),
    ("ckpt load speedup vs DCP load", "ckpt load", "DCP load", "speed", (">=", 1.5)),
    ("ckpt save speedup vs DCP save", "ckpt save", "DCP save", "speed", None),
    ("ckpt save speedup vs torch.save", "ckpt save", "torch.save", "speed", None),
    ("ckpt load speedup vs torch.load", "ckpt load", "torch.load", "speed", None),
    (
        f"resharded {RESHARD_SAVE}->{RESHARD_LOAD} / same-layout {RESHARD_SAVE}->{RESHARD_SAVE} load (time)",
        f"ckpt load {RESHARD_SAVE}->{RESHARD_LOAD} readers",
        f"ckpt load {RESHARD_SAVE}->{RESHARD_SAVE} readers",
        "time",
        ("<=", 1.2),
    ),
]


def report(rec: Recorder, nbytes: int, info: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    rows = []
    order = [
        "raw save",
        "raw load",
        "torch.save",
        "torch.load",
        "DCP save",
        "DCP load",
        "ckpt save",
        "ckpt load",
        f"ckpt save {RESHARD_SAVE} writers",
        f"ckpt load {RESHARD_SAVE}->{RESHARD_SAVE} readers",
        f"ckpt load {RESHARD_SAVE}->{RESHARD_LOAD} readers",
    ]
    results: dict[str, Any] = {}
    for name in order:
        ts = rec.times[name]
        med = statistics.median(ts)
        results[name] = {"seconds": ts, "median_s": med, "gb_per_s": nbytes / med / GB}
        rows.append(f"| {name:<28} | {med:8.3f} | {nbytes / med / GB:6.2f} | {min(ts):7.3f} | {max(ts):7.3f} |")
    ratios: dict[str, Any] = {}
    rlines = []
    for name, num, den, kind, target in RATIOS:
        a, b = rec.median(num), rec.median(den)
        value = b / a if kind == "speed" else a / b
        a_min, b_min = min(rec.times[num]), min(rec.times[den])
        best = b_min / a_min if kind == "speed" else a_min / b_min
        ok = None
        if target:
            ok = value >= target[1] if target[0] == ">=" else value <= target[1]
        ratios[name] = {
            "value": value,
            "best_of": best,
            "target": f"{target[0]} {target[1]}" if target else None,
            "met": ok,
        }
        tgt = f"{target[0]} {target[1]}" if target else ""
        verdict = "" if ok is None else ("met" if ok else "MISSED")
        rlines.append(f"| {name:<66} | {value:6.2f} | {best:7.2f} | {tgt:>6} | {verdict:7} |")
    extras = {k: statistics.median(v) for k, v in rec.extra.items()}
    same, other = f"{RESHARD_SAVE}->{RESHARD_SAVE}", f"{RESHARD_SAVE}->{RESHARD_LOAD}"
    stored = ", ".join(f"{k.split()[0]} {extras[k] / nbytes:.4f}x" for k in rec.extra if k.endswith("stored bytes"))
    first = ", ".join(f"{k} {v:.2f}s" for k, v in info["first_call_s"].items())
    peak, base = info["peak_rss_bytes"], info["baseline_rss_bytes"]
    lines = [
        (
            f"state: {info['tensors']} tensors, {nbytes / (1 << 20):.0f} MiB ({nbytes / GB:.3f} GB), "
            f"d={info['d']}, {info['layers']} blocks (float32/bfloat16); repeats: {info['repeat']}; "
            f"ckpt max_chunk_bytes: {info['max_chunk_bytes'] or 'default'}; reads: {info['cache']}; GB = 1e9 bytes"
        ),
        "",
        "| measurement                  | median s |   GB/s |   min s |   max s |",
        "|------------------------------|---------:|-------:|--------:|--------:|",
        *rows,
        "",
        "| ratio (of medians; best-of = same ratio of the fastest runs)       | median | best-of | target | verdict |",
        "|--------------------------------------------------------------------|-------:|--------:|-------:|---------|",
        *rlines,
        "",
        f"stored bytes / state bytes: {stored}",
        (
            f"resharded loads: chunk bytes the readers' plans read / state bytes: "
            f"{same} {extras[f'read bytes {same}'] / nbytes:.3f}x, {other} {extras[f'read bytes {other}'] / nbytes:.3f}x; "
            f"slowest single reader (median): {same} {extras[f'max reader {same}']:.3f}s, "
            f"{other} {extras[f'max reader {other}']:.3f}s"
        ),
        f"first save of a tiny state in a fresh process (lazy imports; once per process; not in the table): {first}",
        (
            f"peak RSS {peak / (1 << 30):.2f} GiB = {base / (1 << 30):.2f} GiB interpreter+torch "
            f"+ {(peak - base) / nbytes:.2f}x the state"
        ),
    ]
    text = "\n".join(lines)
    return text, {"results": results, "ratios": ratios, "extra": extras}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size-mb", type=float, default=1024, help="tensor bytes of the state, MiB (default 1024)")
    p.add_argument("--repeat", type=int, default=3, help="repeats of every measurement; medians reported (default 3)")
    p.add_argument("--dir", default=None, help="storage directory (default: a new temp dir under /tmp)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the figures as JSON to OUT")
    p.add_argument("--warm", action="store_true", help="do not drop the page cache (reads warm)")
    p.add_argument(
        "--max-chunk-mb",
        type=float,
        default=None,
        help="max_chunk_bytes (MiB) of the ckpt saves (default: the library's default)",
    )
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    global MAX_CHUNK_BYTES
    if args.max_chunk_mb is not None:
        MAX_CHUNK_BYTES = max(1, int(args.max_chunk_mb * (1 << 20)))
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))

    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # interpreter + torch
    d, layers = plan_state(args.size_mb)
    src = build_state(d, layers)
    nbytes = state_nbytes(src)
    drop = not args.warm and can_drop_caches()
    if not args.warm and not drop:
        log("note: cannot drop the page cache (needs root); every read is WARM")
    cache = "cold (page cache dropped before every load)" if drop else "warm (page cache not dropped)"

    made = args.dir is None
    base = tempfile.mkdtemp(prefix="ckpt-bench-", dir="/tmp") if made else os.path.abspath(args.dir)
    os.makedirs(base, exist_ok=True)
    log(f"state {nbytes / (1 << 20):.0f} MiB in {len(src)} tensors (d={d}, {layers} blocks); dir {base}; {cache}")
    host = machine(base)
    rec = Recorder()
    try:
        first_call = first_call_seconds(base)
        warm_up(base)
        for rep in range(args.repeat):
            log(f"repeat {rep + 1}/{args.repeat}")
            run_repeat(src, base, drop, rec, rep, log)
    finally:
        if made:
            shutil.rmtree(base, ignore_errors=True)

    info = {
        "tensors": len(src),
        "d": d,
        "layers": layers,
        "repeat": args.repeat,
        "cache": cache,
        "cold": drop,
        "dir": base,
        "state_bytes": nbytes,
        "max_chunk_bytes": MAX_CHUNK_BYTES,
        "first_call_s": first_call,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "baseline_rss_bytes": baseline_rss,
        "machine": host,
        "argv": sys.argv,
    }
    text, figures = report(rec, nbytes, info)
    m = info["machine"]
    print(
        f"machine: {m['cpus']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM, disk {m['disk']}, "
        f"kernel {m['kernel']}, python {m['python']}, torch {m['torch']}, ckpt {m['ckpt']}"
    )
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, **figures}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
