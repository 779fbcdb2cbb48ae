"""Pure planning: chunk grids, write requests and read requests. No I/O here.

The chunk grid of an array follows its save-time shards so that every chunk lies inside one
shard, hence has exactly one writer: along each dimension the chunk size divides every
interior shard boundary (the gcd of them; with torch.chunk's ragged last shard this is the
shard size itself). Chunks are then split further, along the leading dimensions first (so
they stay contiguous in memory), until each is at most ``max_chunk_bytes`` and each shard has
a few chunks (``MIN_CHUNKS_PER_SHARD``, down to ``MIN_CHUNK_BYTES``): smaller chunks give
parallel I/O within one tensor and let a resharded load read little beyond what overlaps.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .format import chunk_key
from .layout import Box, Piece, TensorLayout
from .manifest import ArraySpec

log = logging.getLogger(__name__)

# Above this many chunks in one array, the grid is too fine to be efficient: say so.
_MANY_CHUNKS = 100_000
# Each shard is split into at least this many chunks (down to MIN_CHUNK_BYTES), so that a
# reader whose shard straddles a save-time shard boundary over-reads at most about an eighth
# of a shard there, rather than a whole one (4 -> 3 resharding read 1.5x the bytes without it).
MIN_CHUNKS_PER_SHARD = 8
MIN_CHUNK_BYTES = 1 << 20


def _divisors_desc(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]), reverse=True)


def boundaries_gcd(shape: Sequence[int], boxes: Sequence[Box]) -> tuple[int, ...]:
    """Per dimension, the gcd of every interior boundary of ``boxes`` (0: none)."""
    out = []
    for d, n in enumerate(shape):
        g = 0
        for b in boxes:
            for edge in (b.offsets[d], b.offsets[d] + b.sizes[d]):
                if 0 < edge < n:
                    g = math.gcd(g, edge)
        out.append(g)
    return tuple(out)


def choose_chunk_shape(
    shape: Sequence[int], boxes: Sequence[Box], itemsize: int, max_chunk_bytes: int
) -> tuple[int, ...]:
    """A regular chunk grid that divides every interior boundary of ``boxes``, chunks bounded."""
    return chunk_shape_for(shape, boundaries_gcd(shape, boxes), itemsize, max_chunk_bytes)


def chunk_shape_for(
    shape: Sequence[int], edges_gcd: Sequence[int], itemsize: int, max_chunk_bytes: int
) -> tuple[int, ...]:
    """A regular chunk grid dividing, per dimension, the gcd of the shard boundaries there (0:
    no interior boundary), chunks bounded: every chunk then has exactly one writer."""
    return _chunk_shape(tuple(shape), tuple(edges_gcd), itemsize, max_chunk_bytes)


@functools.lru_cache(maxsize=4096)  # pure, and a model's shapes recur
def _chunk_shape(shape: tuple[int, ...], edges_gcd: tuple[int, ...], itemsize: int,
                 max_chunk_bytes: int) -> tuple[int, ...]:
    chunk = [max(1, g if g else n) for g, n in zip(edges_gcd, shape)]
    shard_bytes = math.prod(chunk) * itemsize
    target = min(max_chunk_bytes, max(MIN_CHUNK_BYTES, shard_bytes // MIN_CHUNKS_PER_SHARD))
    budget = max(1, target // max(1, itemsize))
    for d in range(len(chunk)):
        rest = math.prod(chunk[d + 1 :])
        if chunk[d] * rest <= budget:
            break
        # The largest divisor of this dim's size that fits the budget with the inner dims whole.
        fit = next((c for c in _divisors_desc(chunk[d]) if c * rest <= budget), 1)
        chunk[d] = fit
    grid = math.prod(-(-n // c) for n, c in zip(shape, chunk)) if shape else 1
    if grid > _MANY_CHUNKS:
        log.warning(
            "array of shape %s gets %d chunks (chunk %s): its shard boundaries share no larger "
            "divisor; loads and saves of it will be slow",
            tuple(shape), grid, tuple(chunk),
        )
    return tuple(chunk)


def chunk_box(spec: ArraySpec, index: Sequence[int]) -> Box:
    """The part of the array that chunk ``index`` holds (clipped at the array's ragged edge)."""
    offsets = tuple(i * c for i, c in zip(index, spec.chunk_shape))
    sizes = tuple(min(c, s - o) for c, s, o in zip(spec.chunk_shape, spec.shape, offsets))
    return Box(offsets, sizes)


def chunks_overlapping(spec: ArraySpec, box: Box) -> Iterator[tuple[int, ...]]:
    if box.empty and box.offsets:
        return iter(())
    ranges = [
        range(o // c, -(-(o + s) // c)) for o, s, c in zip(box.offsets, box.sizes, spec.chunk_shape)
    ]
    return itertools.product(*ranges)


# ---------------------------------------------------------------------------------------------
# Write plans


@dataclass(frozen=True, slots=True)
class WriteRequest:
    """Write one chunk: the region ``slices`` of ``tensor``, padded to the full chunk shape."""

    path: str
    index: tuple[int, ...]
    tensor: torch.Tensor
    slices: tuple[slice, ...]
    chunk_shape: tuple[int, ...]
    separator: str = "/"
    # The stored bytes and their owner where they were found once for many saves (a host slab's
    # views: ``ckpt.capture``), so that a save makes no tensor view per chunk.
    stored: tuple[memoryview, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    # Whether the region is smaller than the chunk (an edge chunk, padded when stored); known
    # at planning, not found again by every save of the plan.
    ragged: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ragged", any(s.stop - s.start != c for s, c in zip(self.slices, self.chunk_shape)))

    @property
    def key(self) -> str:
        return chunk_key(self.path, self.index, self.separator)


def plan_array_writes(path: str, spec: ArraySpec, tensor: torch.Tensor, layout: TensorLayout) -> list[WriteRequest]:
    """The chunks this process writes for one array: those inside the pieces it is writer of."""
    out = []
    for piece in layout.pieces:
        if not layout.writes(path, piece):
            continue
        out.extend(_piece_writes(path, spec, tensor, piece))
    return out


def _piece_writes(path: str, spec: ArraySpec, tensor: torch.Tensor, piece: Piece) -> Iterator[WriteRequest]:
    for index in chunks_overlapping(spec, piece.box):
        cbox = chunk_box(spec, index)
        inside = cbox.intersect(piece.box)
        if inside != cbox:
            # The grid divides every shard boundary, so this is a bug, never a user error.
            raise AssertionError(f"{path}: chunk {index} {cbox} straddles shard {piece.box}")
        yield WriteRequest(path, tuple(index), tensor, piece.local_slices(cbox), spec.chunk_shape, spec.chunk_separator)


# ---------------------------------------------------------------------------------------------
# Read plans


@dataclass(frozen=True, slots=True)
class ReadTarget:
    """Copy ``src`` (slices of the chunk) into ``dst`` (slices of ``tensor``)."""

    tensor: torch.Tensor
    dst: tuple[slice, ...]
    src: tuple[slice, ...]


@dataclass(frozen=True, slots=True)
class ReadRequest:
    path: str
    index: tuple[int, ...]
    chunk_shape: tuple[int, ...]
    targets: tuple[ReadTarget, ...]
    separator: str = "/"

    @property
    def key(self) -> str:
        return chunk_key(self.path, self.index, self.separator)


def plan_array_reads(path: str, spec: ArraySpec, tensor: torch.Tensor, pieces: Sequence[Piece]) -> list[ReadRequest]:
    """Every chunk that overlaps the destination pieces, each read once, with its copies."""
    shape = spec.shape
    if (len(pieces) == 1 and shape and all(shape) and spec.chunk_shape == shape and pieces[0].box.sizes == shape
            and not any(pieces[0].box.offsets)):
        # The common case at thousands of arrays: the whole array, one chunk (what the loop below
        # computes, without the box arithmetic).
        whole = tuple(slice(0, n) for n in shape)
        target = ReadTarget(tensor, pieces[0].local_slices(), whole)
        return [ReadRequest(path, (0,) * len(shape), spec.chunk_shape, (target,), spec.chunk_separator)]
    targets: dict[tuple[int, ...], list[ReadTarget]] = {}
    for piece in pieces:
        for index in chunks_overlapping(spec, piece.box):
            cbox = chunk_box(spec, index)
            sub = cbox.intersect(piece.box)
            if sub is None or (sub.empty and sub.offsets):
                continue
            src = tuple(
                slice(so - co, so - co + s) for so, co, s in zip(sub.offsets, cbox.offsets, sub.sizes)
            )
            targets.setdefault(tuple(index), []).append(ReadTarget(tensor, piece.local_slices(sub), src))
    return [ReadRequest(path, i, spec.chunk_shape, tuple(t), spec.chunk_separator) for i, t in sorted(targets.items())]
