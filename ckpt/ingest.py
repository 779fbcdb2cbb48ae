"""Writing a committed step from tensors that arrive a piece at a time: what the imports of
DCP and Hugging Face checkpoints write through.

The caller gives the arrays (global shape, dtype, and a chunk grid in which every piece it hands
over is a union of whole chunks), the pieces (a box of one array, and a reader of boxes inside
it), the non-tensor values and the containers. :func:`write_step` then, as one writer
(``rank00000``):

1. plans, before any byte is written: every chunk of every array covered exactly once (bad
   input is refused here and nothing is written), the blocks each piece is read in (whole
   chunks, at most ``buffer_bytes`` or one chunk, contiguous in row-major order where the grid
   allows), and where each chunk goes in the writer's pack (offsets fixed up front, as a saving
   writer fixes them, so the pack is one sequential stream);
2. streams the pack: each block read, its chunks encoded (bytes and crc32c) as they go out;
3. writes its fragment and commits through :func:`ckpt.commit.commit` (coverage validated
   again, the commit point written last);
4. consolidates the step into zarr shards (layout ``shards``, the default: any zarr v3 reader
   opens it) or leaves it as packs (``layout="packs"``: half the I/O, read by ckpt).

Memory: one block, or one piece for a reader that loads its piece whole (a DCP item is one
``torch.save`` blob). A failure at any point removes the step: nothing is left behind.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import chunks
from . import format as fmt
from .commit import commit
from .consolidate import consolidate
from .dtypes import info_by_name
from .errors import CheckpointExistsError, FormatError
from .layout import Box
from .layouts import pack_name, pack_path
from .manifest import ArraySpec, ChunkRecord, Fragment, Manifest
from .plan import PACK_ALIGN, PACK_ALIGN_MIN
from .planning import chunk_box, chunks_overlapping
from .retention import delete_step
from .storage import Storage
from .version import library_versions

DEFAULT_BUFFER_BYTES = 256 << 20
LAYOUTS = ("shards", "packs")


@dataclass(frozen=True, slots=True)
class SourcePiece:
    """A box of one array that the source holds, and how to read boxes inside it: ``read(box)``
    returns a CPU tensor of the array's dtype shaped like ``box``. ``blockwise=False``: the
    piece is read whole, once (its reader cannot read less)."""

    path: str
    box: Box
    read: Callable[[Box], torch.Tensor]
    blockwise: bool = True


@dataclass(frozen=True, slots=True)
class _Block:
    piece: SourcePiece
    box: Box
    chunks: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]  # where each chunk starts in the pack


def piece_blocks(spec: ArraySpec, box: Box, itemsize: int, budget: int) -> Iterator[Box]:
    """Boxes of whole chunks tiling ``box`` (itself whole chunks), each at most ``budget`` bytes
    or one chunk; whole trailing dimensions first, so a block is contiguous where it can be."""
    c = spec.chunk_shape
    lo = [o // s for o, s in zip(box.offsets, c)]
    hi = [-(-(o + n) // s) for o, n, s in zip(box.offsets, box.sizes, c)]
    if any(h <= l for l, h in zip(lo, hi)):
        return
    counts = [1] * len(c)
    block_bytes = itemsize
    for s in c:
        block_bytes *= s
    for d in reversed(range(len(c))):
        extent = hi[d] - lo[d]
        if block_bytes * extent <= budget:
            counts[d] = extent
            block_bytes *= extent
            continue
        counts[d] = max(1, budget // block_bytes)
        break
    ends = box.ends
    for start in itertools.product(*(range(l, h, k) for l, h, k in zip(lo, hi, counts))):
        offsets = tuple(i * s for i, s in zip(start, c))
        sizes = tuple(min(k * s, e - o) for k, s, e, o in zip(counts, c, ends, offsets))
        yield Box(offsets, sizes)


def _plan(arrays: Mapping[str, ArraySpec], pieces: Sequence[SourcePiece], budget: int) -> tuple[list[_Block], int]:
    """Pure: the blocks in pack order with their chunks' offsets, and the pack's size. Raises
    :class:`FormatError` unless every chunk of every array is covered exactly once."""
    seen: set[tuple[str, tuple[int, ...]]] = set()
    blocks: list[_Block] = []
    pos = 0
    problems: list[str] = []
    for piece in pieces:
        spec = arrays.get(piece.path)
        if spec is None:
            raise FormatError(f"a piece of {piece.path!r}, which is not among the arrays")
        itemsize = info_by_name(spec.dtype).itemsize
        boxes = piece_blocks(spec, piece.box, itemsize, budget) if piece.blockwise else [piece.box]
        for box in boxes:
            idx, offs = [], []
            for index in chunks_overlapping(spec, box):
                cbox = chunk_box(spec, index)
                if cbox.intersect(box) != cbox:
                    problems.append(f"{piece.path!r}: piece {list(box.offsets)}+{list(box.sizes)} is not whole chunks "
                                    f"of the grid {list(spec.chunk_shape)}")
                    break
                key = (piece.path, tuple(index))
                if key in seen:
                    problems.append(f"{piece.path!r}: chunk {list(index)} is held by two pieces")
                seen.add(key)
                n = chunks.stored_nbytes(spec.chunk_shape, itemsize)
                if n >= PACK_ALIGN_MIN and pos % PACK_ALIGN:
                    pos += PACK_ALIGN - pos % PACK_ALIGN
                idx.append(tuple(index))
                offs.append(pos)
                pos += n + chunks.CRC_BYTES
            if idx:
                blocks.append(_Block(piece, box, tuple(idx), tuple(offs)))
    for path, spec in arrays.items():
        have = sum(1 for p, _i in seen if p == path) if spec.num_chunks else 0
        if have != spec.num_chunks:
            problems.append(f"{path!r}: {spec.num_chunks - have} of {spec.num_chunks} chunks held by no piece")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise FormatError("the source does not cover every tensor exactly once: " + "; ".join(problems[:5]) + more)
    return blocks, pos


class _PackStream:
    """The pack's bytes, produced block by block as the source is read (re-iterable: a retried
    write reads again); fills ``records`` as chunks go out."""

    def __init__(self, arrays: Mapping[str, ArraySpec], blocks: list[_Block],
                 progress: Callable[[int], None] | None) -> None:
        self.arrays, self.blocks, self.progress = arrays, blocks, progress
        self.records: dict[str, list[ChunkRecord]] = {}

    def __iter__(self) -> Iterator[Any]:
        self.records = {}
        pos = 0
        for block in self.blocks:
            spec = self.arrays[block.piece.path]
            dtype = info_by_name(spec.dtype).torch_dtype
            t = block.piece.read(block.box)
            if tuple(t.shape) != block.box.sizes or t.dtype != dtype:
                raise FormatError(f"{spec.path!r}: the source gave {t.dtype} {list(t.shape)} for a box of "
                                  f"{dtype} {list(block.box.sizes)}")
            for index, offset in zip(block.chunks, block.offsets):
                cbox = chunk_box(spec, index)
                slices = tuple(slice(o - b, o - b + s) for o, b, s in zip(cbox.offsets, block.box.offsets, cbox.sizes))
                ragged = cbox.sizes != spec.chunk_shape
                data, _keep = chunks.payload(t, slices, spec.chunk_shape, ragged=ragged)
                if offset > pos:
                    yield bytes(offset - pos)
                parts, crc = chunks.encode(data)
                yield from parts
                pos = offset + data.nbytes + chunks.CRC_BYTES
                self.records.setdefault(spec.path, []).append(
                    ChunkRecord(index=index, nbytes=data.nbytes + chunks.CRC_BYTES, crc32c=crc, pack=0, offset=offset))
                if self.progress is not None:
                    self.progress(data.nbytes)


def write_step(
    storage: Storage,
    step: int,
    arrays: Mapping[str, ArraySpec],
    pieces: Sequence[SourcePiece],
    *,
    values: Mapping[str, Any] | None = None,
    containers: Mapping[str, Any] | None = None,
    user_metadata: Mapping[str, Any] | None = None,
    layout: str = "shards",
    overwrite: bool = False,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    threads: int = 8,
    durable: bool = True,
    progress: Callable[[int], None] | None = None,
) -> Manifest:
    """Write ``pieces`` of ``arrays`` and ``values`` (encoded JSON) as committed step ``step``
    of ``storage``; returns its manifest. An existing committed step is replaced only with
    ``overwrite``. On failure nothing of the step is left."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if buffer_bytes < 1 or threads < 1:
        raise ValueError("buffer_bytes and threads must be >= 1")
    blocks, _size = _plan(arrays, pieces, buffer_bytes)
    existing = {s.step: s for s in fmt.list_steps(storage)}
    if step in existing and existing[step].committed and not overwrite:
        raise CheckpointExistsError(f"step {step} is already committed in {storage.url}; pass --overwrite "
                                    "(overwrite=True) to replace it, or choose another --step")
    if step in existing:
        delete_step(storage, step)
    writer = fmt.writer_name(0)
    save_id = uuid.uuid4().hex
    try:
        stream = _PackStream(arrays, blocks, progress)
        packs: tuple[str, ...] = ()
        if blocks:
            packs = (pack_name(writer, 0),)
            storage.write(pack_path(step, packs[0]), stream, durable=durable)
        fmt.write_fragment(storage, Fragment(
            step=step, save_id=save_id, writer=writer, created_at=time.time(), arrays=dict(arrays),
            chunks={p: tuple(r) for p, r in stream.records.items()}, values=dict(values or {}), packs=packs,
            containers=dict(containers or {}),
        ))
        manifest = commit(storage, step, [writer], save_id=save_id, library_versions=library_versions(),
                          user_metadata=dict(user_metadata or {}))
        if layout == "shards":
            manifest = consolidate(storage, step, threads=threads, durable=durable)
        return manifest
    except BaseException:
        delete_step(storage, step)
        raise
