"""Random corruption of a committed checkpoint: byte flips, truncations and deletions of
chunks, fragments and metadata; then what ``ckpt verify`` and ``ckpt.load`` make of it.

For every mutation, on a fresh copy of a pristine two-writer checkpoint, in any of the
layouts (``packs``, format 3's default: the chunks in each writer's pack; ``shards``: the same
step consolidated, one zarr shard per tensor; ``chunks``: one file per chunk):

- ``ckpt verify`` (the library call, and the command line for some) reports a problem; for
  a chunk, the problem names the tensor and the chunk index;
- ``ckpt.load`` either raises a ``ckpt`` error (for a chunk: naming the tensor and the chunk)
  or returns exactly the saved state: it never returns anything else.

    python -m tests.fault.corruption --trials 2000 --seed 0 --layout packs
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

import ckpt
from ckpt.verify import verify_step

from ..helpers import bits_equal, random_bits, save_as_writers

STEP = 7
MUTATIONS = ("flip", "truncate", "delete")
LAYOUTS = ("packs", "shards", "chunks")
CLASSES = {"chunks": {"chunk", "fragment", "array/group metadata", "commit point"},
           "packs": {"pack", "fragment", "commit point"},
           "shards": {"shard", "fragment", "array/group metadata", "commit point"}}


def pristine_states() -> list[dict[str, Any]]:
    full = {
        "w": random_bits((24, 16), torch.float32, 1),
        "h": random_bits((10, 6), torch.bfloat16, 2),
        "i": random_bits((33,), torch.int64, 3),
        "flags": random_bits((5, 5), torch.bool, 4),
    }
    states = []
    for r in range(2):
        states.append({
            "model": {
                "w": ckpt.Sharded(full["w"].chunk(2)[r].clone(), dim=0, rank=r, world=2),
                "h": ckpt.Sharded(full["h"].chunk(2, dim=1)[r].clone(), dim=1, rank=r, world=2),
                "i": full["i"].clone(),
                "flags": full["flags"].clone(),
            },
            "meta": {"step": STEP, "lr": 0.125, "name": "corrupt-me"},
        })
    return states


def empty_full() -> dict[str, Any]:
    return {"model": {"w": torch.zeros(24, 16), "h": torch.zeros(10, 6, dtype=torch.bfloat16),
                      "i": torch.zeros(33, dtype=torch.int64), "flags": torch.zeros(5, 5, dtype=torch.bool)},
            "meta": {}}


def expected_full() -> dict[str, Any]:
    return {"model": {"w": random_bits((24, 16), torch.float32, 1), "h": random_bits((10, 6), torch.bfloat16, 2),
                      "i": random_bits((33,), torch.int64, 3), "flags": random_bits((5, 5), torch.bool, 4)},
            "meta": {"step": STEP, "lr": 0.125, "name": "corrupt-me"}}


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(bits_equal(a["model"][k], b["model"][k]) for k in b["model"]) and a["meta"] == b["meta"]


def make_pristine(root: Path, layout: str = "packs") -> None:
    save_as_writers(pristine_states(), str(root), step=STEP, max_chunk_bytes=128, layout=layout)


def classify(rel: str, layout: str = "chunks") -> str:
    name = rel.rsplit("/", 1)[-1]
    if rel == "zarr.json":
        return "commit point"
    if rel.startswith(".fragments/"):
        return "fragment"
    if rel.startswith(".packs/"):
        return "pack"
    if name == "zarr.json":
        return "array/group metadata"
    return "shard" if layout == "shards" else "chunk"


def chunk_of(rel: str) -> tuple[str, tuple[int, ...]] | None:
    """``model/w/c.1.0`` -> ("model/w", (1, 0))."""
    tensor, _, name = rel.rpartition("/")
    if not name.startswith("c."):
        return None
    return tensor, tuple(int(x) for x in name[2:].split("."))


class ChunkMap:
    """Which chunk a byte of a pack or a shard belongs to (from the pristine step)."""

    def __init__(self, pristine: Path) -> None:
        from ckpt.layouts import grid_index, shard_chunk_nbytes, shard_key

        storage = ckpt.open_storage(str(pristine))
        manifest = ckpt.read_manifest(storage, STEP)
        self.spans: dict[str, list[tuple[int, int, str, tuple[int, ...]]]] = {}
        for w in manifest.writers:
            frag = ckpt.format.read_fragment(storage, STEP, w)
            for path, recs in frag.chunks.items():
                for r in recs:
                    if r.pack is not None:
                        self.spans.setdefault(f".packs/{frag.packs[r.pack]}", []).append(
                            (r.offset or 0, (r.offset or 0) + r.nbytes, path, r.index))
        from ckpt.dtypes import info_by_name

        for path, spec in manifest.arrays.items():
            stride = shard_chunk_nbytes(spec, info_by_name(spec.dtype).itemsize)
            key = shard_key(spec)
            self.spans[key] = [(i * stride, (i + 1) * stride, path, grid_index(spec, i)) for i in range(spec.num_chunks)]

    def chunks(self, rel: str, what: str) -> list[tuple[str, tuple[int, ...]]]:
        """The chunks a mutation of ``rel`` damaged (a flip: the one holding the byte; a
        truncation or deletion: every chunk past the cut)."""
        spans = self.spans.get(rel, [])
        if what.startswith("flipped"):
            pos = int(what.split("of byte ")[1].split("/")[0])
            return [(p, i) for a, b, p, i in spans if a <= pos < b]
        cut = int(what.split("-> ")[1].split()[0]) if what.startswith("truncated") else 0
        return [(p, i) for a, b, p, i in spans if b > cut]


def mutate(path: Path, kind: str, rng: random.Random) -> str:
    data = path.read_bytes()
    if kind == "delete" or (kind == "truncate" and not data):
        path.unlink()
        return "deleted"
    if kind == "truncate":
        n = rng.randrange(len(data))
        path.write_bytes(data[:n])
        return f"truncated {len(data)} -> {n} bytes"
    pos = rng.randrange(len(data))
    bit = 1 << rng.randrange(8)
    path.write_bytes(data[:pos] + bytes([data[pos] ^ bit]) + data[pos + 1:])
    return f"flipped bit {bit:#04x} of byte {pos}/{len(data)}"


def one_trial(pristine: Path, work: Path, rng: random.Random, *, cli: bool, layout: str = "chunks",
              chunk_map: ChunkMap | None = None) -> dict[str, Any]:
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(pristine, work)
    sdir = work / ckpt.format.step_dir(STEP)
    files = sorted(str(p.relative_to(sdir)) for p in sdir.rglob("*") if p.is_file())
    # Weighted so that every class of file is hit often, not only the many chunks.
    by_class: dict[str, list[str]] = {}
    for f in files:
        by_class.setdefault(classify(f, layout), []).append(f)
    cls = rng.choice(sorted(by_class))
    rel = rng.choice(by_class[cls])
    kind = rng.choice(MUTATIONS)
    what = mutate(sdir / rel, kind, rng)
    rec: dict[str, Any] = {"file": rel, "class": cls, "mutation": kind, "what": what}
    storage = ckpt.open_storage(str(work))
    chunk = chunk_of(rel) if cls == "chunk" else None
    # In a pack or a shard: the chunks the mutation hit (none: the shard index, or padding).
    hit = chunk_map.chunks(rel, what) if chunk_map is not None and cls in ("pack", "shard") else []

    # verify
    try:
        report = verify_step(storage, STEP)
        problems = report.problems
        rec["verify"] = "problems" if problems else "ok"
    except ckpt.CheckpointNotFoundError:  # the commit point is gone: the step is not committed any more
        problems = []
        rec["verify"] = "uncommitted"
    if chunk is not None and problems:
        tensor, index = chunk
        rec["verify_names_chunk"] = any(p.path == tensor and p.index == index and f"tensor {tensor!r}" in p.message
                                        for p in problems)
    if hit and problems:
        rec["verify_names_chunk"] = any((p.path, p.index) in hit for p in problems)
    if cli:
        from ckpt.cli import main as ckpt_main

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = ckpt_main(["verify", str(work), "--step", str(STEP)])
        rec["cli_exit"] = code
        if chunk is not None:
            rec["cli_names_chunk"] = f"tensor {chunk[0]!r} chunk {'.'.join(map(str, chunk[1]))}" in out.getvalue()
        elif hit:
            rec["cli_names_chunk"] = any(f"tensor {t!r} chunk {'.'.join(map(str, i))}" in out.getvalue() for t, i in hit)

    # load
    dest = empty_full()
    try:
        ckpt.load(dest, storage, step=STEP)
        rec["load"] = "exact" if same(dest, expected_full()) else "WRONG"
    except ckpt.CkptError as e:
        rec["load"] = type(e).__name__
        if chunk is not None:
            tensor, index = chunk
            rec["load_names_chunk"] = f"tensor {tensor!r} chunk {'.'.join(map(str, index))}" in str(e)
        elif hit and isinstance(e, ckpt.CorruptCheckpointError):
            rec["load_names_chunk"] = any(f"tensor {t!r} chunk {'.'.join(map(str, i))}" in str(e) for t, i in hit)
    return rec


def run(trials: int, seed: int, *, cli_every: int = 10, workdir: str | None = None,
        layout: str = "packs") -> dict[str, Any]:
    rng = random.Random(seed)
    recs = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        pristine = Path(tmp) / "pristine"
        make_pristine(pristine, layout)
        chunk_map = ChunkMap(pristine) if layout != "chunks" else None
        for t in range(trials):
            recs.append(one_trial(pristine, Path(tmp) / "work", rng, cli=t % cli_every == 0, layout=layout,
                                  chunk_map=chunk_map))
    undetected = [r for r in recs if r["verify"] == "ok"]
    wrong = [r for r in recs if r["load"] == "WRONG"]
    unnamed = [r for r in recs if r.get("verify_names_chunk") is False or r.get("load_names_chunk") is False
               or r.get("cli_names_chunk") is False]
    cli_missed = [r for r in recs if "cli_exit" in r and r["verify"] == "problems" and r["cli_exit"] != 1]
    return {
        "layout": layout,
        "trials": len(recs),
        "by_class": dict(sorted(Counter(r["class"] for r in recs).items())),
        "by_mutation": dict(sorted(Counter(r["mutation"] for r in recs).items())),
        "verify": dict(sorted(Counter(r["verify"] for r in recs).items())),
        "load": dict(sorted(Counter(r["load"] for r in recs).items())),
        "cli_runs": sum(1 for r in recs if "cli_exit" in r),
        "undetected_by_verify": undetected,
        "load_wrong": wrong,
        "chunk_not_named": unnamed,
        "cli_missed": cli_missed,
        "seconds": round(time.monotonic() - t0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layout", choices=LAYOUTS, default="packs")
    args = ap.parse_args(argv)
    out = run(args.trials, args.seed, layout=args.layout)
    bad = {k: out[k] for k in ("undetected_by_verify", "load_wrong", "chunk_not_named", "cli_missed")}
    print(json.dumps({k: (len(v) if isinstance(v, list) else v) for k, v in out.items()}))
    for k, v in bad.items():
        for r in v[:20]:
            print(k, json.dumps(r))
    return 1 if any(bad.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
