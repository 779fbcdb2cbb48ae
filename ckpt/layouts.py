"""Where a chunk's bytes are, by the step's physical layout (``Manifest.layout``).

``chunks`` (formats 1 and 2, and what ``layout="chunks"`` writes): one object per chunk, at its
zarr key; any zarr v3 reader reads it as it is.

``packs`` (format 3's default): every writer puts all its chunks, each its bytes followed by
their crc32c, into a few *pack* objects of its own (``<step>/.packs/<writer>.<n>``), at offsets
fixed when it plans: 2 x writers + 1 objects per step whatever the number of arrays, like DCP's
one file per rank. A reader finds a chunk's writer in the commit point (``writer_runs``, a few
integers per array) and its pack and offset in that writer's fragment, which it reads only if it
needs one of that writer's chunks.

``shards`` (a consolidated step): one zarr v3 array per tensor whose single shard (zarr's
``sharding_indexed`` codec) holds every chunk in row-major order, each its bytes and crc32c, then
the shard index: any zarr v3 reader (tensorstore, zarr-python) reads it; ours computes the
offsets.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from . import chunktable
from . import format as fmt
from .chunks import CRC_BYTES
from .errors import FormatError
from .manifest import ArraySpec, Manifest
from .storage import Storage

CHUNKS, PACKS, SHARDS = "chunks", "packs", "shards"
Run = tuple[int, int, int, int, int]
SHARD_INDEX_ENTRY = 16  # (offset, nbytes), two little-endian uint64, per inner chunk


def pack_name(writer: str, n: int) -> str:
    return f"{writer}.{n}"


def pack_path(step: int, name: str) -> str:
    return f"{fmt.step_dir(step)}/{fmt.PACKS}/{name}"


def linear_index(spec: ArraySpec, index: Sequence[int]) -> int:
    out = 0
    for i, g in zip(index, spec.grid_shape):
        out = out * g + i
    return out


def grid_index(spec: ArraySpec, linear: int) -> tuple[int, ...]:
    return chunktable.grid_index(spec.grid_shape, linear)


# ---------------------------------------------------------------------------------------------
# Which writer holds which chunk: runs


def encode_runs(owners: Sequence[int]) -> tuple[Run, ...]:
    """Runs for ``owners`` (the writer index of every chunk, in linear order): greedy, each run
    the longest arithmetic pattern ``w0 + stride * (k // per)`` from where the last ended. The
    common case, one pattern over the whole array, is checked at once (millions of chunks at
    thousands of writers)."""
    if len(owners) == 1:  # an array in one chunk (most of a model's): no numpy per array
        return ((0, 1, int(owners[0]), 0, 1),)
    import numpy as np

    arr = np.asarray(owners, dtype=np.int64)
    n = len(arr)
    if n:
        change = np.flatnonzero(arr != arr[0])
        per = int(change[0]) if len(change) else n
        stride = int(arr[per] - arr[0]) if per < n else 0
        if stride >= 0 and np.array_equal(arr, arr[0] + stride * (np.arange(n) // per)):
            return ((0, n, int(arr[0]), stride, per),)
    owners = arr.tolist()
    runs: list[Run] = []
    n, i = len(owners), 0
    while i < n:
        w0 = owners[i]
        per = 1
        while i + per < n and owners[i + per] == w0:
            per += 1
        if i + per >= n:
            runs.append((i, per, w0, 0, per))
            break
        stride = owners[i + per] - w0
        k = per
        while i + k < n and owners[i + k] == w0 + stride * (k // per):
            k += 1
        if stride < 0 or k == per:  # no pattern beyond the first group: one group, one run
            runs.append((i, per, w0, 0, per))
            i += per
            continue
        k -= k % per if (i + k < n) else 0
        runs.append((i, k, w0, stride, per))
        i += k
    return tuple(runs)


def run_owner(runs: Sequence[Run], linear: int) -> int | None:
    for first, count, w0, stride, per in runs:
        if first <= linear < first + count:
            return w0 + stride * ((linear - first) // per)
    return None


# ---------------------------------------------------------------------------------------------
# Shards


def shard_key(spec: ArraySpec) -> str:
    """The key of an array's single shard (index 0 in every dimension, ``/`` separated)."""
    return fmt.chunk_key(spec.path, (0,) * len(spec.shape), "/")


def shard_chunk_nbytes(spec: ArraySpec, itemsize: int) -> int:
    """Stored bytes of one inner chunk of a shard: the data and its checksum."""
    return math.prod(spec.chunk_shape) * itemsize + CRC_BYTES


def shard_index_nbytes(spec: ArraySpec) -> int:
    return spec.num_chunks * SHARD_INDEX_ENTRY + CRC_BYTES


# ---------------------------------------------------------------------------------------------
# Locating chunks


@dataclass(frozen=True, slots=True)
class ChunkLayout:
    """What a reader needs of the commit point to find chunks (pure data)."""

    kind: str = CHUNKS
    writers: tuple[str, ...] = ()
    writer_runs: dict[str, tuple[Run, ...]] | None = None

    @classmethod
    def of(cls, manifest: Manifest) -> ChunkLayout:
        return cls(manifest.layout, manifest.writers, manifest.writer_runs)


@dataclass(frozen=True, slots=True)
class Location:
    """A chunk's bytes (data then checksum): ``offset`` into ``path``; offset None: the whole
    object at ``path``."""

    path: str
    offset: int | None = None
    recorded_crc: int | None = None  # what its writer recorded, when the reader has it


class Locator:
    """Finds chunks of one step. Thread-safe; reads a writer's fragment at most once, and only
    when a chunk of that writer is asked for (layout ``packs``)."""

    def __init__(self, storage: Storage, step: int, layout: ChunkLayout, arrays: dict[str, ArraySpec]) -> None:
        self.storage = storage
        self.step = step
        self.layout = layout
        self.arrays = arrays
        self.prefix = fmt.step_dir(step)
        self._records: dict[str, dict[tuple[str, tuple[int, ...]], Location]] = {}
        self._lock = threading.Lock()
        self._writer_locks: dict[str, threading.Lock] = {}

    def key(self, path: str, index: Sequence[int]) -> str:
        """The chunk's logical key (its zarr key): what memory tiers hold it by."""
        spec = self.arrays[path]
        return f"{self.prefix}/{fmt.chunk_key(path, index, spec.chunk_separator)}"

    def locate(self, path: str, index: tuple[int, ...]) -> Location:
        kind = self.layout.kind
        if kind == CHUNKS:
            return Location(self.key(path, index))
        spec = self.arrays[path]
        if kind == SHARDS:
            itemsize = _itemsize(spec)
            return Location(f"{self.prefix}/{shard_key(spec)}", linear_index(spec, index) * shard_chunk_nbytes(spec, itemsize))
        runs = (self.layout.writer_runs or {}).get(path)
        owner = None if runs is None else run_owner(runs, linear_index(spec, index))
        if owner is None:
            raise FormatError(f"step {self.step}: no writer recorded for chunk {list(index)} of {path!r}")
        writer = self.layout.writers[owner]
        records = self._writer_records(writer)
        loc = records.get((path, tuple(index)))
        if loc is None:
            raise FormatError(f"step {self.step}: writer {writer}'s fragment does not record chunk {list(index)} of "
                              f"{path!r}; run `ckpt verify`")
        return loc

    def writers_of(self, chunks: Iterable[tuple[str, tuple[int, ...]]]) -> set[str]:
        """The writers holding ``chunks`` (layout ``packs``), to read their fragments up front."""
        out = set()
        for path, index in chunks:
            runs = (self.layout.writer_runs or {}).get(path)
            owner = None if runs is None else run_owner(runs, linear_index(self.arrays[path], index))
            if owner is not None:
                out.add(self.layout.writers[owner])
        return out

    def _writer_records(self, writer: str) -> dict[tuple[str, tuple[int, ...]], Location]:
        records = self._records.get(writer)
        if records is not None:
            return records
        with self._lock:
            lock = self._writer_locks.setdefault(writer, threading.Lock())
        with lock:  # one reader thread reads the fragment; the others wait for it
            records = self._records.get(writer)
            if records is None:
                try:
                    _save, packs, chunks = fmt.read_fragment_locations(self.storage, self.step, writer)
                except FileNotFoundError:
                    raise FormatError(f"the fragment of {writer}, which locates its chunks, is missing") from None
                paths = [pack_path(self.step, name) for name in packs]
                records = {}
                for path, recs in chunks.items():
                    for r in recs:
                        if r.pack is None or r.offset is None:
                            raise FormatError(f"step {self.step}: fragment of {writer} has a chunk without a pack")
                        records[(path, r.index)] = Location(paths[r.pack], r.offset, r.crc32c)
                self._records[writer] = records
        return records

def _itemsize(spec: ArraySpec) -> int:
    from .dtypes import info_by_name

    return info_by_name(spec.dtype).itemsize
