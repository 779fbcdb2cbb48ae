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

from . import format as fmt
from .format import META, chunk_key, step_dir
from .layouts import CHUNKS, PACKS, Run, encode_runs, linear_index
from .manifest import ArraySpec, Fragment
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
    """The fragments of one save, validated as they arrive (any order, duplicates ignored)."""

    def __init__(self, step: int, writers: Sequence[str], save_id: str | None = None) -> None:
        self.step = step
        self.save_id = save_id
        self.writers = tuple(writers)
        self._index = {w: i for i, w in enumerate(self.writers)}
        self.arrays: dict[str, ArraySpec] = {}
        self._declared_by: dict[str, str] = {}
        self._owners: dict[str, np.ndarray] = {}  # path -> writer index per chunk, -1: not written
        self._counts: dict[str, int] = {}
        self._seen_arrays: list[dict[str, ArraySpec]] = []  # declarations already checked, compared whole
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
        problems += self._cover(frag)
        if frag.packs:
            self._packed = True
            ends: dict[str, int] = {}
            for recs in frag.chunks.values():
                for r in recs:
                    if r.pack is not None and r.pack < len(frag.packs):
                        name = frag.packs[r.pack]
                        ends[name] = max(ends.get(name, 0), (r.offset or 0) + r.nbytes)
            self.pack_ends[frag.writer] = ends
        elif any(frag.chunks.values()):
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
        for path, spec in frag.arrays.items():
            have = self.arrays.get(path)
            if have is None:
                self.arrays[path] = spec
                self._declared_by[path] = frag.writer
                self._owners[path] = np.full(spec.num_chunks, -1, dtype=np.int32)
                self._counts[path] = 0
            elif (have.shape, have.dtype, have.chunk_shape) != (spec.shape, spec.dtype, spec.chunk_shape):
                problems.append(
                    f"{path!r}: writer {self._declared_by[path]} declares shape {list(have.shape)} {have.dtype} "
                    f"chunks {list(have.chunk_shape)}, writer {frag.writer} declares shape "
                    f"{list(spec.shape)} {spec.dtype} chunks {list(spec.chunk_shape)} (if ranks hold "
                    "different slices of this tensor, declare its layout with ckpt.Sharded or a DTensor)"
                )
        return problems

    def _cover(self, frag: Fragment) -> list[str]:
        problems = []
        w = self._index[frag.writer]
        for path, records in frag.chunks.items():
            spec = self.arrays.get(path)
            if spec is None:
                problems.append(f"writer {frag.writer} wrote chunks of undeclared array {path!r}")
                continue
            grid = spec.grid_shape
            ndim = len(grid)
            owners = self._owners[path]
            added = 0
            for rec in records:
                index = rec.index
                if len(index) != ndim:
                    at = -1
                elif ndim == 2:  # the common case, without a loop
                    i, j = index
                    at = i * grid[1] + j if 0 <= i < grid[0] and 0 <= j < grid[1] else -1
                elif ndim == 1:
                    at = index[0] if 0 <= index[0] < grid[0] else -1
                else:
                    at = linear_index(spec, index) if all(0 <= i < g for i, g in zip(index, grid)) else -1
                if at < 0:
                    problems.append(f"{path!r}: chunk {list(index)} outside the grid {list(grid)}")
                    continue
                held = int(owners[at])
                if held >= 0:
                    problems.append(f"{path!r}: chunk {list(index)} written by both {self.writers[held]} and "
                                    f"{frag.writer}")
                    continue
                owners[at] = w
                added += 1
            self._counts[path] += added
        return problems

    def finish(self) -> Outcome:
        """The save as a whole (call once every writer is added): coverage, layout, runs."""
        problems = list(self.problems)
        for path, spec in self.arrays.items():
            have = self._counts[path]
            if have != spec.num_chunks:
                problems.append(f"{path!r}: {spec.num_chunks - have} of {spec.num_chunks} chunks not written by "
                                "any writer")
        if self._packed and self._unpacked:
            problems.append("some writers wrote packs, others one file per chunk: one save, one layout")
        layout = PACKS if self._packed or not self._unpacked else CHUNKS
        clash = [g for g in intermediate_groups(self.arrays) if g in self.arrays]
        if clash:
            problems.append(f"{clash[0]!r} is both a tensor and a group of tensors")
        runs = ({p: encode_runs(o) for p, o in self._owners.items() if len(o)}
                if layout == PACKS and not problems else {})
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
        for path, records in frag.chunks.items():
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
