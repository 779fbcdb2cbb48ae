"""Rewriting a checkpoint with chunk grids aligned to another layout.

A checkpoint can be loaded under any layout (a loader reads the chunks that overlap its
shards), but when shard boundaries cut through chunks, every process reads bytes it throws
away. :func:`reshard` writes a new committed checkpoint whose grids are aligned to a target
layout, so loading under it reads whole chunks only.

Target layouts (:func:`parse_layout`):

``shard:DIM:N``
    every tensor with at least ``DIM+1`` dimensions sharded along ``DIM`` over ``N`` ranks
    with torch.chunk semantics (shards of ``ceil(size/N)``, a ragged last one); every shard
    boundary becomes a chunk boundary. Other tensors are replicated. Chunks are further split
    to at most ``max_chunk_bytes``.
``chunks:BYTES``
    no sharding: each tensor re-chunked with chunks of at most ``BYTES``.
``whole``
    one chunk per tensor where the tensor fits ``max_chunk_bytes`` (default 1 GiB for this
    layout), otherwise chunks of at most that size.

BYTES: an integer with an optional unit: ``K``/``KiB`` (1024), ``M``/``MiB``, ``G``/``GiB``,
``T``/``TiB``, or ``KB``/``MB``/``GB``/``TB`` (powers of 1000).

Memory: tensors are processed one at a time, in blocks of whole target chunks of at most
``buffer_bytes`` (or one target chunk, if larger). Each block is read from the source chunks
that overlap it, then written. Peak memory is about
``block + threads x (source chunk + target chunk)``: with ``threads=1``, one block plus two
chunks. Non-tensor values (per writer too) and user metadata are carried over; each array's
layout in the new manifest records the target layout, and the user metadata gains a
``ckpt.reshard`` entry naming the source.
"""

from __future__ import annotations

import itertools
import math
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from . import format as fmt
from .commit import commit
from .dtypes import info_by_name
from .errors import CheckpointExistsError, FormatError
from .format import CHUNK_SEPARATOR
from .io import write_chunks
from .layout import Box, chunk_range
from .layouts import ChunkLayout, Locator
from .manifest import ArraySpec, ChunkRecord, Fragment, Manifest
from .plan import DEFAULT_MAX_CHUNK_BYTES
from .planning import WriteRequest, choose_chunk_shape, chunk_box, chunks_overlapping
from .regions import read_region
from .retention import delete_step
from .storage import Storage

Progress = Callable[[int], None]

DEFAULT_WHOLE_MAX_BYTES = 1 << 30
DEFAULT_BUFFER_BYTES = 256 << 20

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "tib": 1 << 40, "tb": 10**12,
}


def parse_bytes(text: str) -> int:
    """``64MiB`` -> 67108864; K/M/G/T and KiB/MiB/... are powers of 1024, KB/MB/... of 1000."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"invalid size {text!r}: use e.g. 1048576, 64MiB, 512K, 2GB")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value < 1:
        raise ValueError(f"invalid size {text!r}: must be at least 1 byte")
    return value


@dataclass(frozen=True, slots=True)
class TargetLayout:
    """A parsed LAYOUT: ``kind`` is ``shard``, ``chunks`` or ``whole``."""

    kind: str
    dim: int | None = None
    world: int | None = None
    max_chunk_bytes: int | None = None  # None: the kind's default

    def __str__(self) -> str:
        if self.kind == "shard":
            return f"shard:{self.dim}:{self.world}"
        if self.kind == "chunks":
            return f"chunks:{self.max_chunk_bytes}"
        return "whole"

    def chunk_limit(self, override: int | None = None) -> int:
        if self.kind == "chunks":
            assert self.max_chunk_bytes is not None
            return self.max_chunk_bytes
        if override is not None:
            return override
        return DEFAULT_WHOLE_MAX_BYTES if self.kind == "whole" else DEFAULT_MAX_CHUNK_BYTES


LAYOUT_GRAMMAR = "shard:DIM:N | chunks:BYTES | whole"


def parse_layout(text: str) -> TargetLayout:
    """Parse ``shard:DIM:N``, ``chunks:BYTES`` or ``whole``."""
    parts = text.strip().split(":")
    kind = parts[0].lower()
    if kind == "shard" and len(parts) == 3:
        try:
            dim, world = int(parts[1]), int(parts[2])
        except ValueError:
            dim = world = -1
        if dim < 0 or world < 1:
            raise ValueError(f"invalid layout {text!r}: shard:DIM:N needs DIM >= 0 and N >= 1, e.g. shard:0:8")
        return TargetLayout("shard", dim=dim, world=world)
    if kind == "chunks" and len(parts) == 2:
        return TargetLayout("chunks", max_chunk_bytes=parse_bytes(parts[1]))
    if kind == "whole" and len(parts) == 1:
        return TargetLayout("whole")
    raise ValueError(f"invalid layout {text!r}: expected {LAYOUT_GRAMMAR} (e.g. shard:0:8, chunks:64MiB, whole)")


# ---------------------------------------------------------------------------------------------
# Planning the new arrays (pure)


def _shard_boxes(shape: tuple[int, ...], dim: int, world: int) -> list[Box]:
    boxes = []
    for r in range(world):
        start, length = chunk_range(shape[dim], world, r)
        if length == 0:
            continue
        boxes.append(Box(
            tuple(start if i == dim else 0 for i in range(len(shape))),
            tuple(length if i == dim else s for i, s in enumerate(shape)),
        ))
    return boxes


def target_spec(
    spec: ArraySpec, target: TargetLayout, *, source_step: int, max_chunk_bytes: int | None = None
) -> ArraySpec:
    """The array as it will be stored under ``target``: same shape and dtype, aligned grid."""
    itemsize = info_by_name(spec.dtype).itemsize
    shape = spec.shape
    layout: dict[str, Any] = {"kind": "resharded", "target": str(target)}
    whole_box = Box(tuple(0 for _ in shape), shape)
    if target.kind == "shard" and len(shape) > (target.dim or 0):
        assert target.dim is not None and target.world is not None
        boxes = _shard_boxes(shape, target.dim, target.world) or [whole_box]
        layout.update(dim=target.dim, world=target.world)
    else:
        boxes = [whole_box]
        if target.kind == "shard":
            layout["replicated"] = True
    limit = target.chunk_limit(max_chunk_bytes)
    layout["max_chunk_bytes"] = limit
    layout["source_step"] = source_step
    if spec.layout:
        layout["source_layout"] = spec.layout
    chunk = choose_chunk_shape(shape, boxes, itemsize, limit)
    return ArraySpec(path=spec.path, shape=shape, dtype=spec.dtype, chunk_shape=chunk, layout=layout,
                     chunk_separator=CHUNK_SEPARATOR)


def target_blocks(spec: ArraySpec, itemsize: int, budget: int) -> Iterator[Box]:
    """Boxes of whole chunks that tile the array, each at most ``budget`` bytes (or one chunk).

    Blocks take whole trailing dimensions first, so they are contiguous where they can be.
    """
    grid = spec.grid_shape
    if spec.num_chunks == 0:
        return
    counts = [1] * len(grid)
    block_bytes = math.prod(spec.chunk_shape) * itemsize
    for d in reversed(range(len(grid))):
        if block_bytes * grid[d] <= budget:
            counts[d] = grid[d]
            block_bytes *= grid[d]
            continue
        counts[d] = max(1, budget // block_bytes)
        break
    for start in itertools.product(*(range(0, g, c) for g, c in zip(grid, counts))):
        offsets = tuple(i * c for i, c in zip(start, spec.chunk_shape))
        sizes = tuple(
            min(n * c, s - o) for n, c, s, o in zip(counts, spec.chunk_shape, spec.shape, offsets)
        )
        yield Box(offsets, sizes)


# ---------------------------------------------------------------------------------------------
# Running


def _expected_crcs(storage: Storage, step: int, manifest: Manifest) -> dict[tuple[str, tuple[int, ...]], int]:
    """The crc each source writer recorded, so that reading checks chunks against it too."""
    out: dict[tuple[str, tuple[int, ...]], int] = {}
    for w in manifest.writers:
        try:
            frag = fmt.read_fragment(storage, step, w)
        except (FileNotFoundError, FormatError):
            continue  # the chunks' own checksums are still checked; `ckpt verify` names this
        for path, records in frag.chunks.items():
            for rec in records:
                out[(path, rec.index)] = rec.crc32c
    return out


def reshard(
    src: Storage,
    step: int,
    dst: Storage,
    target: TargetLayout,
    *,
    step_out: int | None = None,
    max_chunk_bytes: int | None = None,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    threads: int = 8,
    overwrite: bool = False,
    durable: bool = True,
    progress: Progress | None = None,
    on_start: Callable[[int], None] | None = None,
) -> Manifest:
    """Write committed step ``step`` of ``src`` as step ``step_out`` (default: the same) of ``dst``.

    Returns the new manifest. ``on_start`` gets the number of tensor bytes to copy.
    If it fails midway, the new step stays incomplete (invisible; ``ckpt gc`` removes it).
    """
    if buffer_bytes < 1 or threads < 1:
        raise ValueError("buffer_bytes and threads must be >= 1")
    if max_chunk_bytes is not None and max_chunk_bytes < 1:
        raise ValueError("max_chunk_bytes must be >= 1")
    step_out = step if step_out is None else step_out
    sdir_out = fmt.step_dir(step_out)
    manifest = fmt.read_manifest(src, step)
    if src.url == dst.url and step_out == step:
        raise ValueError(f"cannot reshard step {step} onto itself; give another OUT run or --step-out")
    existing = {s.step: s for s in fmt.list_steps(dst)}
    if step_out in existing:
        if existing[step_out].committed and not overwrite:
            raise CheckpointExistsError(
                f"step {step_out} is already committed in {dst.url}; pass --overwrite to replace it, or --step-out"
            )
        delete_step(dst, step_out)

    specs = {p: target_spec(s, target, source_step=step, max_chunk_bytes=max_chunk_bytes)
             for p, s in manifest.arrays.items()}
    if on_start is not None:
        on_start(sum(s.numel * info_by_name(s.dtype).itemsize for s in specs.values()))
    # Packs: the locator hands over each chunk's recorded crc as it finds the chunk.
    crcs = _expected_crcs(src, step, manifest) if manifest.layout == "chunks" else {}
    locator = Locator(src, step, ChunkLayout.of(manifest), manifest.arrays)
    records: dict[str, list[ChunkRecord]] = {}
    for path, new in specs.items():
        old = manifest.arrays[path]
        dtype = info_by_name(new.dtype).torch_dtype
        fmt.write_array_metadata(dst, step_out, new)
        records[path] = []
        for block in target_blocks(new, dtype.itemsize, buffer_bytes):
            buf = torch.empty(block.sizes, dtype=dtype)
            read_region(src, locator, old, block, buf, threads=threads, expected_crc=lambda p, i: crcs.get((p, i)))
            requests = []
            for index in chunks_overlapping(new, block):
                cbox = chunk_box(new, index)
                slices = tuple(slice(o - b, o - b + s) for o, b, s in zip(cbox.offsets, block.offsets, cbox.sizes))
                requests.append(WriteRequest(path, tuple(index), buf, slices, new.chunk_shape, new.chunk_separator))
            written = write_chunks(dst, sdir_out, requests, threads=threads, durable=durable)
            records[path].extend(written.get(path, []))
            if progress is not None:
                progress(buf.numel() * dtype.itemsize)
            del buf

    # One fragment per source writer keeps per-writer values; the first carries every chunk.
    writers = list(manifest.writers) or [fmt.writer_name(0)]
    save_id = uuid.uuid4().hex
    per_writer = fmt.values_by_writer(src, manifest)
    for i, w in enumerate(writers):
        values = manifest.values if i == 0 else {**manifest.values, **per_writer.get(w, {})}
        fmt.write_fragment(dst, Fragment(
            step=step_out, save_id=save_id, writer=w, created_at=time.time(),
            arrays=specs if i == 0 else {},
            chunks={p: tuple(r) for p, r in records.items() if r} if i == 0 else {},
            values=values, containers=manifest.containers,
        ))
    from .version import library_versions

    user = {**manifest.user_metadata,
            "ckpt.reshard": {"source": src.url, "source_step": step, "target": str(target)}}
    return commit(dst, step_out, writers, save_id=save_id, library_versions=library_versions(),
                      user_metadata=user)
