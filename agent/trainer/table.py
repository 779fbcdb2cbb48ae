"""A restore of one known step from the agent's table of it (``GetStepTable``, built once per step
for the whole node by :mod:`agent.daemon.steptable`).

:class:`TableSource` is the agent-memory tier of such a restore. It answers
:meth:`ckpt.restore.RestoreSource.held_step` from the table: the arrays' paths, shapes and dtypes
for :mod:`ckpt.direct` to compare with the state, and a ``fill`` that copies every chunk out of
the segments' mappings, checked against crc32c: the runs of small chunks the agent checked chunk
by chunk when it built the table (:func:`agent.trainer.spans.fill_runs`), else each chunk
(:func:`agent.trainer.spans.fill`). The
table is a handful of columns of fixed-width integers: a rank takes in 2,000 arrays with a few C
loops, where listing the snapshots meant a message per writer, a JSON chunk index per writer and
two dictionaries of every chunk.

Anything else a restore asks of this tier (another step, a chunk read the planned way, a
document) goes to the full tier, :class:`agent.trainer.memory.AgentMemoryStorage`, which lists
the snapshots the first time it is needed: a restore that does not take the table's path costs
what it cost before, plus the one call that fetched the table.
"""

from __future__ import annotations

import json
import threading
import weakref
from array import array
from collections.abc import Callable, Sequence
from operator import add, le
from typing import Any

import torch

from ckpt.dtypes import info_by_name
from ckpt.gcpause import without_gc
from ckpt.restore import HeldStep, RestoreSource, Tier

from ..pb import pb
from .spans import close_fds, fill, fill_runs, memory_threads, open_segment


class TableError(ValueError):
    """A step table that does not hold together (then the snapshots are listed instead)."""


def _column(data: bytes, code: str, n: int, what: str) -> list[int]:
    col = array(code)
    if len(data) != n * col.itemsize:
        raise TableError(f"step table: {what} has {len(data)} bytes, expected {n} entries of {col.itemsize}")
    col.frombytes(data)
    return col.tolist()


class StepColumns:
    """A step table decoded and checked (every index in range, every chunk inside its segment)."""

    @without_gc  # (thousands of ints and strings: a collection would walk the training process's heap)
    def __init__(self, table: pb.StepTable) -> None:
        self.table = table
        self.paths = table.paths.decode().split("\n") if table.paths else []
        n = len(self.paths)
        kinds = json.loads(table.kinds)
        if type(kinds) is not list or not all(type(k) is list and len(k) == 2 for k in kinds):
            raise TableError("step table: kinds is not a list of [shape, dtype]")
        shapes = [tuple(shape) for shape, _ in kinds]
        dtypes = [info_by_name(name).torch_dtype for _, name in kinds]
        kind_of = _column(table.kind_of, "I", n, "kind_of")
        self.segment_of = _column(table.segment_of, "I", n, "segment_of")
        self.offsets = _column(table.offsets, "Q", n, "offsets")
        self.sizes = _column(table.sizes, "Q", n, "sizes")
        self.crcs = _column(table.crc32c, "I", n, "crc32c")
        segments = [s.nbytes for s in table.segments]
        if n and (max(kind_of) >= len(kinds) or max(self.segment_of) >= len(segments)
                  or not all(map(le, map(add, self.offsets, self.sizes), map(segments.__getitem__, self.segment_of)))):
            raise TableError("step table: an index out of range, or a chunk beyond its segment's end")
        runs = len(table.run_segment) // 4
        self.run_segment = _column(table.run_segment, "I", runs, "run_segment")
        self.run_start = _column(table.run_start, "Q", runs, "run_start")
        self.run_end = _column(table.run_end, "Q", runs, "run_end")
        self.run_crcs = _column(table.run_crc32c, "I", runs, "run_crc32c")
        if runs and (max(self.run_segment) >= len(segments) or not all(map(le, self.run_start, self.run_end))
                     or not all(map(le, self.run_end, map(segments.__getitem__, self.run_segment)))):
            raise TableError("step table: a run out of range, or beyond its segment's end")
        self.shapes = list(map(shapes.__getitem__, kind_of))
        self.dtypes = list(map(dtypes.__getitem__, kind_of))
        self.manifest = json.loads(table.manifest)
        if type(self.manifest) is not dict:
            raise TableError("step table: manifest is not an object")


class TableSource(RestoreSource):
    """The agent-memory tier of a restore of ``table.step`` (see the module). ``full()`` builds the
    tier that lists the snapshots, the first time anything but the table is asked of this one;
    ``bottom`` is the tier below until then."""

    tier = Tier.AGENT_MEMORY

    def __init__(self, bottom: RestoreSource, table: pb.StepTable, shm_dir: str,
                 full: Callable[[], RestoreSource]) -> None:
        self._bottom, self._full_fn, self._full = bottom, full, None
        self._full_lock = threading.Lock()
        super().__init__(bottom)
        self.served_by = {Tier.AGENT_MEMORY: 0, Tier.PEER: 0}  # both tiers are reported, also when 0
        self.step = table.step
        self.shm_dir = shm_dir
        self._columns = StepColumns(table)
        self._maps: list[Any] = []
        self._fds: list[int] = []
        weakref.finalize(self, close_fds, self._fds)

    @property  # type: ignore[override]
    def inner(self) -> Any:
        """The full tier (built on first use): every read but the table's goes there."""
        if self._full is None:
            with self._full_lock:
                if self._full is None:
                    self._full = self._full_fn()
        return self._full

    @inner.setter
    def inner(self, value: Any) -> None:  # RestoreSource.__init__ sets the bottom: kept as _bottom
        pass

    def __getattr__(self, name: str) -> Any:  # what the full tier offers beyond a RestoreSource
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def tiers(self) -> list[RestoreSource]:
        below = self._full if self._full is not None else self._bottom
        return [self, *below.tiers()]

    def holds_step(self, step: int) -> bool:
        return step == self.step or self.inner.holds_step(step)

    def read_threads(self, step: int, default: int) -> int:
        if step == self.step:
            return memory_threads(default)
        return self.inner.read_threads(step, default)

    def held_step(self, step: int) -> HeldStep | None:
        if step != self.step:
            return self.inner.held_step(step)
        c = self._columns
        return HeldStep(c.manifest, c.paths, c.shapes, c.dtypes, self._fill)

    def _fill(self, tensors: Sequence[torch.Tensor]) -> int | None:
        c = self._columns
        segments = c.table.segments
        try:
            fds, views, bases = self._map(segments)
        except (OSError, ValueError):  # evicted since the table was built: the planned load reads
            return None
        chunk_bases = list(map(bases.__getitem__, c.segment_of))
        # Runs (thousands of small chunks): a few checks of runs the agent checked chunk by chunk;
        # if one differs, chunk by chunk here too (which finds the one that changed).
        by_runs = bool(c.run_crcs) and fill_runs(tensors, chunk_bases, c.offsets, c.sizes,
                                                 list(map(views.__getitem__, c.run_segment)), c.run_start, c.run_end,
                                                 c.run_crcs)
        if not by_runs and not fill(tensors, list(map(fds.__getitem__, c.segment_of)), c.offsets,
                                    list(map(views.__getitem__, c.segment_of)), chunk_bases, c.sizes, c.crcs):
            return None
        replica = [s.replica for s in segments]
        if not any(replica):
            self.count(sum(c.sizes), Tier.AGENT_MEMORY, chunks=len(c.sizes))
        else:
            for tier, flag in ((Tier.AGENT_MEMORY, False), (Tier.PEER, True)):
                sizes = [n for n, i in zip(c.sizes, c.segment_of) if replica[i] is flag]
                self.count(sum(sizes), tier, chunks=len(sizes))
        return sum(c.sizes)

    def _map(self, segments: Sequence[pb.TableSegment]) -> tuple[list[int], list[memoryview], list[int]]:
        """Each segment's fd (for pread), mapping and the mapping's address."""
        fds, views, bases = [], [], []
        for s in segments:
            fd, view, tensor = open_segment(f"{self.shm_dir}/{s.segment}", s.nbytes, self._maps, self._fds)
            fds.append(fd)
            views.append(view)
            bases.append(tensor.data_ptr())
        return fds, views, bases
