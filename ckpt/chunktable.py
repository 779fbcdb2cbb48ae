"""A writer's chunk records as columns (format 4's ``chunk_table``), read with numpy.

A fragment of format 3 holds one JSON record per chunk (``{path: [[index, nbytes, crc32c, pack,
offset], ...]}``); the committer turned each into an object and checked it field by field:
about 20 µs per record, 46 ms per fragment at 2,000 arrays, so 460 s of one core to validate a
checkpoint of 10,000 writers. Format 4 writes the same records as six columns of integers::

    "chunk_table": {"array": [...], "index": [...], "nbytes": [...], "crc32c": [...],
                    "pack": [...], "offset": [...]}

``array`` is the record's array as its position in the fragment's ``arrays`` list, ``index`` the
chunk's linear index in that array's chunk grid (row-major: the last grid dimension varies
fastest), ``pack`` and ``offset`` are present for the ``packs`` layout only. A column is parsed
by the JSON decoder and checked as a whole (types, ranges) with numpy, so a committer's cost
per record is a few tens of nanoseconds, and a chunk of an undeclared array cannot be recorded.

Imports nothing of the package but :mod:`ckpt.jsonfields`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .jsonfields import ManifestError

KEY = "chunk_table"
COLUMNS = ("array", "index", "nbytes", "crc32c")
PACK_COLUMNS = ("pack", "offset")


@dataclass(frozen=True, slots=True, eq=False)
class ChunkTable:
    """One writer's chunk records, a numpy column per field (int64, records in written order)."""

    array: np.ndarray  # position of the record's array in the fragment's declarations
    index: np.ndarray  # linear index of the chunk in its array's grid
    nbytes: np.ndarray  # stored size: data + checksum
    crc32c: np.ndarray
    pack: np.ndarray | None = None  # layout "packs": which of the writer's packs ...
    offset: np.ndarray | None = None  # ... and at which byte; None: one file per chunk

    def __len__(self) -> int:
        return len(self.array)

    def pack_ends(self, packs: int) -> np.ndarray:
        """Per pack, the byte its chunks need it to reach (0: a pack no record names)."""
        ends = np.zeros(packs, dtype=np.int64)
        if self.pack is not None and self.offset is not None and len(self):
            ok = (self.pack >= 0) & (self.pack < packs)
            np.maximum.at(ends, self.pack[ok], (self.offset + self.nbytes)[ok])
        return ends

    def records(self, grids: Sequence[tuple[int, ...]]) -> Iterator[tuple[int, tuple[int, ...], int, int, int | None,
                                                                          int | None]]:
        """(array position, grid index, nbytes, crc32c, pack, offset) of each record, in order."""
        pack = self.pack.tolist() if self.pack is not None else [None] * len(self)
        offset = self.offset.tolist() if self.offset is not None else [None] * len(self)
        for a, lin, nb, crc, p, off in zip(self.array.tolist(), self.index.tolist(), self.nbytes.tolist(),
                                           self.crc32c.tolist(), pack, offset):
            yield a, grid_index(grids[a], lin), nb, crc, p, off


def grid_index(grid: tuple[int, ...], linear: int) -> tuple[int, ...]:
    """The grid index at row-major position ``linear``."""
    if len(grid) == 2:  # the common case
        i, j = divmod(linear, grid[1])
        return (i, j)
    if len(grid) <= 1:
        return (linear,) if grid else ()
    out = []
    for g in reversed(grid[1:]):
        linear, i = divmod(linear, g)
        out.append(i)
    return (linear, *reversed(out))  # beyond the grid: the excess stays in the first


def linear_index(grid: Sequence[int], index: Sequence[int]) -> int:
    """The row-major position of ``index`` in ``grid``; -1 when it lies outside."""
    if len(index) != len(grid):
        return -1
    out = 0
    for i, g in zip(index, grid):
        if not 0 <= i < g:
            return -1
        out = out * g + i
    return out


def encode(chunks: Mapping[str, Sequence[Any]], order: Mapping[str, int], grids: Sequence[tuple[int, ...]]
           ) -> dict[str, list[int]]:
    """The JSON columns of ``chunks`` ({path: records with index, nbytes, crc32c, pack, offset});
    ``order``: each declared array's position, ``grids``: their chunk grids by position. A record
    a fragment cannot hold (see :func:`of_records`) is a writer's bug: ``ValueError``."""
    table, problems = of_records(chunks, order, grids)
    if problems:
        raise ValueError(f"{problems[0]}: not written")
    if table.pack is not None and (table.pack < 0).any():
        raise ValueError("some chunks of the writer have a pack, others none")
    cols = {"array": table.array, "index": table.index, "nbytes": table.nbytes, "crc32c": table.crc32c}
    if table.pack is not None:
        cols.update(pack=table.pack, offset=table.offset)
    return {c: v.tolist() for c, v in cols.items()}


def _column(d: dict, name: str, where: str, n: int | None, upper: int | None = None) -> np.ndarray:
    v = d.get(name)
    if type(v) is not list:
        raise ManifestError(f"{where}.{name}: expected a list of integers")
    if n is not None and len(v) != n:
        raise ManifestError(f"{where}.{name}: {len(v)} values, {KEY}.array has {n}")
    if v and set(map(type, v)) != {int}:  # no floats, booleans, strings or nulls
        raise ManifestError(f"{where}.{name}: expected a list of integers")
    try:
        col = np.array(v, dtype=np.int64)
    except OverflowError:
        raise ManifestError(f"{where}.{name}: a value out of range") from None
    if len(col) and (col.min() < 0 or (upper is not None and col.max() >= upper)):
        bound = f" and < {upper}" if upper is not None else ""
        raise ManifestError(f"{where}.{name}: values must be >= 0{bound}")
    return col


def decode(d: Any, arrays: int, packs: int, where: str = "fragment") -> ChunkTable:
    """Check a fragment's ``chunk_table`` against its declarations (how many arrays) and its
    ``packs`` (how many); raises :class:`ManifestError` on anything a writer would not have written."""
    where = f"{where}.{KEY}"
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: expected an object")
    unknown = set(d) - set(COLUMNS) - set(PACK_COLUMNS)
    if unknown:
        raise ManifestError(f"{where}: unknown column(s) {sorted(unknown)}; upgrade the ckpt package to read it")
    array = _column(d, "array", where, None, arrays)
    n = len(array)
    index = _column(d, "index", where, n)  # within the grid: checked by the committer, as in format 3
    nbytes = _column(d, "nbytes", where, n)
    crc = _column(d, "crc32c", where, n, 1 << 32)
    has_pack = [c in d for c in PACK_COLUMNS]
    if any(has_pack) and not all(has_pack):
        raise ManifestError(f"{where}: pack and offset come together")
    pack = offset = None
    if all(has_pack):
        if n and not packs:
            raise ManifestError(f"{where}.pack: the fragment names no packs")
        pack = _column(d, "pack", where, n, packs)
        offset = _column(d, "offset", where, n)
    elif packs and n:
        raise ManifestError(f"{where}: the fragment names packs but its records have no pack column")
    return ChunkTable(array, index, nbytes, crc, pack, offset)


def of_records(chunks: Mapping[str, Sequence[Any]], order: Mapping[str, int], grids: Sequence[tuple[int, ...]]
               ) -> tuple[ChunkTable, list[str]]:
    """The table of records held as objects (a fragment of format 1 to 3, or made in this
    process), and what cannot be in one: chunks of undeclared arrays, outside their grid."""
    problems: list[str] = []
    cols: dict[str, list[int]] = {c: [] for c in (*COLUMNS, *PACK_COLUMNS)}
    packed = False
    for path, recs in chunks.items():
        at = order.get(path)
        if at is None:
            if recs:
                problems.append(f"chunks of undeclared array {path!r}")
            continue
        grid = grids[at]
        for r in recs:
            lin = linear_index(grid, r.index)
            if lin < 0:
                problems.append(f"{path!r}: chunk {list(r.index)} outside the grid {list(grid)}")
                continue
            cols["array"].append(at)
            cols["index"].append(lin)
            cols["nbytes"].append(r.nbytes)
            cols["crc32c"].append(r.crc32c)
            packed = packed or r.pack is not None
            cols["pack"].append(-1 if r.pack is None else r.pack)
            cols["offset"].append(r.offset or 0)
    arr = {c: np.array(v, dtype=np.int64) for c, v in cols.items()}
    return ChunkTable(arr["array"], arr["index"], arr["nbytes"], arr["crc32c"],
                      arr["pack"] if packed else None, arr["offset"] if packed else None), problems
