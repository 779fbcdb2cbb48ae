"""What a committer checks of the fragments of a save before it writes the commit point, and
what it derives from them, fragment by fragment as they arrive: :class:`CommitBuilder`.

Each fragment is validated once, when it is added, in time proportional to its own chunks:

- every writer agrees on each array's shape, dtype and chunk grid (writers that declare the same
  arrays, every writer of an FSDP job, are compared as a whole, not array by array);
- every chunk of every array is written exactly once, nothing outside the grid (one int32 per
  chunk: which writer holds it);
- which writer holds which chunk, as the runs the commit point records for a packs step;
- the values that differ between writers.

Nothing here does I/O; :mod:`ckpt.commit` reads the fragments and writes the commit point, and
the coordinator's registry feeds fragments as writers announce them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import chunktable
from . import format as fmt
from .format import META, chunk_key, step_dir
from .layouts import CHUNKS, PACKS, Run, encode_runs
from .manifest import ArraySpec, Fragment, table_records
from .storage import Storage

_MISSING = object()


def intermediate_groups(paths: Iterable[str]) -> list[str]:
    groups = set()
    for p in paths:
        parts = p.split("/")
        for i in range(1, len(parts)):
            groups.add("/".join(parts[:i]))
    return sorted(groups)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the fragments of a save amount to, once all are in."""

    arrays: dict[str, ArraySpec]
    problems: list[str]
    layout: str
    writer_runs: dict[str, tuple[Run, ...]]
    values: dict[str, Any]
    varying_values: tuple[str, ...]
    containers: dict[str, Any] = field(default_factory=dict)  # the first fragment's (see Manifest.containers)


class CommitBuilder:
    """The fragments of one save, validated as they arrive (any order, duplicates ignored).

    Coverage is one int32 per chunk of the save (all arrays end to end: which writer holds it),
    updated with numpy from each fragment's records as columns (:class:`ckpt.chunktable.ChunkTable`):
    a fragment of format 4 is checked without an object per record."""

    def __init__(self, step: int, writers: Sequence[str], save_id: str | None = None) -> None:
        self.step = step
        self.save_id = save_id
        self.writers = tuple(writers)
        self._index = {w: i for i, w in enumerate(self.writers)}
        self.arrays: dict[str, ArraySpec] = {}
        self._declared_by: dict[str, str] = {}
        self._base: dict[str, int] = {}  # path -> its first chunk in _owners
        self._owners = np.zeros(0, dtype=np.int32)  # writer index per chunk, -1: not written
        self._seen_arrays: list[dict[str, ArraySpec]] = []  # declarations already checked, compared whole
        self._positions: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = {}  # declared order -> bases, sizes
        self.added: set[str] = set()
        self.problems: list[str] = []
        self._values: dict[str, Any] | None = None
        self._containers: dict[str, Any] = {}
        self._varying: set[str] = set()
        self._packed = self._unpacked = False
        # writer -> {pack name: the byte its chunks need the pack to reach}: checked against storage
        self.pack_ends: dict[str, dict[str, int]] = {}

    @property
    def complete(self) -> bool:
        return len(self.added) == len(self.writers)

    def missing(self) -> list[str]:
        return [w for w in self.writers if w not in self.added]

    def add(self, frag: Fragment) -> list[str]:
        """Check one fragment against the ones before it; returns (and keeps) its problems."""
        if frag.writer in self.added:
            return []
        problems: list[str] = []
        if frag.writer not in self._index:
            problems.append(f"writer {frag.writer} is not a writer of step {self.step}")
        elif frag.step != self.step:
            problems.append(f"writer {frag.writer}'s fragment records step {frag.step}")
        elif self.save_id is not None and frag.save_id != self.save_id:
            problems.append(f"fragments come from different saves ({frag.save_id} from {frag.writer}, expected "
                            f"{self.save_id}); a stale attempt left fragments behind, save the step again")
        if problems:
            self.problems += problems
            return problems
        if self.save_id is None:
            self.save_id = frag.save_id
        self.added.add(frag.writer)
        problems += self._declare(frag)
        order = tuple(frag.arrays)
        table = frag.table
        if table is None:  # records as objects: a fragment of format 1 to 3, or made here
            specs = list(frag.arrays.values())
            table, found = chunktable.of_records(frag.chunks, {p: i for i, p in enumerate(order)},
                                                 [a.grid_shape for a in specs])
            problems += [f"writer {frag.writer} wrote {p}" if p.startswith("chunks of") else p for p in found]
        problems += self._cover(frag.writer, order, table)
        if table.pack is not None:
            self._packed = True
            ends = table.pack_ends(len(frag.packs)).tolist()
            self.pack_ends[frag.writer] = {name: end for name, end in zip(frag.packs, ends) if end}
        elif len(table):
            self._unpacked = True
        if self._values is None:
            self._values = frag.values
            self._containers = frag.containers
        else:
            self._varying.update(k for k, v in frag.values.items() if self._values.get(k, _MISSING) != v)
            self._varying.update(k for k in self._values if k not in frag.values)
        self.problems += problems
        return problems

    def _declare(self, frag: Fragment) -> list[str]:
        if any(frag.arrays == seen for seen in self._seen_arrays):
            return []  # the same declarations as a writer before it: already checked
        self._seen_arrays.append(frag.arrays)
        problems = []
        end = len(self._owners)
        for path, spec in frag.arrays.items():
            have = self.arrays.get(path)
            if have is None:
                self.arrays[path] = spec
                self._declared_by[path] = frag.writer
                self._base[path] = end
                end += spec.num_chunks
            elif (have.shape, have.dtype, have.chunk_shape) != (spec.shape, spec.dtype, spec.chunk_shape):
                problems.append(
                    f"{path!r}: writer {self._declared_by[path]} declares shape {list(have.shape)} {have.dtype} "
                    f"chunks {list(have.chunk_shape)}, writer {frag.writer} declares shape "
                    f"{list(spec.shape)} {spec.dtype} chunks {list(spec.chunk_shape)} (if ranks hold "
                    "different slices of this tensor, declare its layout with ckpt.Sharded or a DTensor)"
                )
        if end > len(self._owners):
            self._owners = np.concatenate([self._owners, np.full(end - len(self._owners), -1, dtype=np.int32)])
        return problems

    def _cover(self, writer: str, order: tuple[str, ...], table: chunktable.ChunkTable) -> list[str]:
        if not len(table):
            return []
        at = self._positions.get(order)
        if at is None:
            at = (np.array([self._base[p] for p in order], dtype=np.int64),
                  np.array([self.arrays[p].num_chunks for p in order], dtype=np.int64))
            self._positions[order] = at
        bases, sizes = at
        # Within the save's grid (a writer that declares an array otherwise is reported by _declare)
        ok = table.index < sizes[table.array]
        problems = []
        pos = bases[table.array] + table.index
        if not ok.all():
            for a, lin in zip(table.array[~ok].tolist()[:10], table.index[~ok].tolist()):
                grid = self.arrays[order[a]].grid_shape
                problems.append(f"{order[a]!r}: chunk {list(chunktable.grid_index(grid, lin))} outside the grid "
                                f"{list(grid)}")
            pos = pos[ok]
        held = self._owners[pos]
        first = np.zeros(len(pos), dtype=bool)
        first[np.unique(pos, return_index=True)[1]] = True  # a chunk twice in one fragment: once here
        clash = (held >= 0) | ~first
        if clash.any():
            paths = list(self._base)
            starts = np.array([self._base[p] for p in paths], dtype=np.int64)
            for p in pos[clash].tolist()[:10]:
                k = int(np.searchsorted(starts, p, side="right")) - 1
                spec = self.arrays[paths[k]]
                p -= int(starts[k])
                held_by = int(self._owners[p + int(starts[k])])
                other = self.writers[held_by] if held_by >= 0 else writer
                problems.append(f"{spec.path!r}: chunk {list(chunktable.grid_index(spec.grid_shape, p))} "
                                f"written by both {other} and {writer}")
            if clash.sum() > 10:
                problems.append(f"and {int(clash.sum()) - 10} more chunks written twice")
        self._owners[pos[~clash]] = self._index[writer]
        return problems

    def finish(self) -> Outcome:
        """The save as a whole (call once every writer is added): coverage, layout, runs."""
        problems = list(self.problems)
        paths = list(self._base)
        if len(self._owners):
            sizes = np.array([self.arrays[p].num_chunks for p in paths], dtype=np.int64)
            starts = np.array([self._base[p] for p in paths], dtype=np.int64)
            lost = np.flatnonzero(self._owners < 0)  # none, but for a broken save
            unwritten = np.bincount(np.searchsorted(starts, lost, side="right") - 1, minlength=len(paths))
            for k in np.flatnonzero(unwritten).tolist():
                problems.append(f"{paths[k]!r}: {int(unwritten[k])} of {int(sizes[k])} chunks not written by any "
                                "writer")
        if self._packed and self._unpacked:
            problems.append("some writers wrote packs, others one file per chunk: one save, one layout")
        layout = PACKS if self._packed or not self._unpacked else CHUNKS
        clash = [g for g in intermediate_groups(self.arrays) if g in self.arrays]
        if clash:
            problems.append(f"{clash[0]!r} is both a tensor and a group of tensors")
        runs = {}
        if layout == PACKS and not problems:
            for p in paths:
                n = self.arrays[p].num_chunks
                if n:
                    runs[p] = encode_runs(self._owners[self._base[p]:self._base[p] + n])
        return Outcome(dict(sorted(self.arrays.items())), problems, layout, runs, self._values or {},
                       tuple(sorted(self._varying)), self._containers)


def check_packs(storage: Storage, step: int, pack_ends: Mapping[str, Mapping[str, int]]) -> list[str]:
    """Every pack the fragments name (``CommitBuilder.pack_ends``: writer -> pack -> the byte
    its chunks need) is in storage, long enough: one listing of the step's packs for many
    writers, one size query per pack for a few."""
    prefix = f"{step_dir(step)}/{fmt.PACKS}"
    sizes = storage.walk(prefix) if len(pack_ends) > 2 else None
    problems = []
    for writer, ends in pack_ends.items():
        for name, end in sorted(ends.items()):
            size = sizes.get(name) if sizes is not None else storage.size(f"{prefix}/{name}")
            if size is None or size < end:
                what = "missing" if size is None else f"{size} bytes, its chunks need {end}"
                problems.append(f"pack {name} of writer {writer} is {what}")
    return problems


def check_listing(storage: Storage, step: int, arrays: dict[str, ArraySpec], fragments: Sequence[Fragment]) -> list[str]:
    files = storage.walk(step_dir(step))
    problems = []
    for frag in fragments:
        chunks = frag.chunks if frag.table is None else table_records(frag.table, list(frag.arrays.values()))
        for path, records in chunks.items():
            for rec in records:
                key = chunk_key(path, rec.index, arrays[path].chunk_separator)
                size = files.get(key)
                if size != rec.nbytes:
                    what = "missing" if size is None else f"{size} bytes, recorded {rec.nbytes}"
                    problems.append(f"{path!r}: chunk {list(rec.index)} written by {frag.writer} is {what}")
    for path, spec in arrays.items():
        if spec.num_chunks and f"{path}/{META}" not in files:
            problems.append(f"{path!r}: array metadata missing")
    return problems
