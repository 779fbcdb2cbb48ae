"""The restore-source plug point: which tier serves each read of a restore.

A :class:`RestoreSource` is a read view of a run. It serves the chunks (and the small documents:
commit points, fragments) that its tier holds, and hands every other read to the source below
it, down to storage. Tiers, freshest first: the node agent's memory, a peer agent (replicas, or
snapshots fetched over the ring), storage. The engine reads through whatever chain the sink
gives it (``Sink.restore_source``) and reads back how many bytes each tier served, so that a
restore that fell back is visible, never silent: a tier that could not serve what it was asked
for (its service unreachable, its listing failed, a copy unusable, a fetch failed, nothing held)
notes a :class:`Fallback` with the reason and the bytes then read from the tiers below, and the
engine returns them in its :class:`RestoreReport` (``Checkpointer.last_restore``).

Implementations: :class:`StorageSource` (the bottom: storage itself) here; the agent's memory
and peer tiers in ``agent``. ``ckpt.testing.restore_source`` is their conformance suite.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import chunks
from .errors import FormatError
from .layouts import Location
from .readahead import ReadAhead
from .storage import Storage, StorageWrapper

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class Tier(str, enum.Enum):
    """Where a restore's bytes came from. One home for the names: events, metrics and
    ``RunResult`` use these values."""

    AGENT_MEMORY = "agent memory"
    PEER = "peer"
    STORAGE = "storage"


class FallbackReason(str, enum.Enum):
    """Why a tier did not serve reads it was asked for."""

    UNREACHABLE = "unreachable"  # its service did not answer (the node agent is down)
    LISTING_FAILED = "listing failed"  # it answered, but could not say what it holds
    UNUSABLE = "unusable"  # a copy was held but could not be used (another save, its documents, its memory)
    FETCH_FAILED = "fetch failed"  # a copy held elsewhere could not be brought here
    NOT_HELD = "not held"  # no copy of what the restore read was held


@dataclass(slots=True)
class Fallback:
    """A tier that sent reads below it, why, and what was read instead (chunk bytes per tier)."""

    tier: Tier
    reason: FallbackReason
    detail: str  # the first cause seen, for people
    chunks: int = 0  # chunks then read from the tiers below
    read_instead: dict[Tier, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"tier": self.tier.value, "reason": self.reason.value, "detail": self.detail, "chunks": self.chunks,
                "bytes": {t.value: n for t, n in self.read_instead.items()}}


@dataclass(frozen=True, slots=True)
class RestoreReport:
    """One restore: the step loaded, its time, the chunk bytes each tier served, the fallbacks."""

    step: int | None
    seconds: float
    served: dict[Tier, int]
    fallbacks: tuple[Fallback, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seconds": self.seconds, "bytes": {t.value: n for t, n in self.served.items()},
                "fallbacks": [f.to_dict() for f in self.fallbacks]}


@dataclass(frozen=True, slots=True)
class HeldStep:
    """A committed step that a memory tier holds whole: every array in one chunk in memory, with
    what a restore checks before copying (:mod:`ckpt.direct`). ``manifest``: the commit point's
    manifest without its arrays and writer runs; ``paths`` sorted, with each array's ``shapes``
    and ``dtypes``; ``fill(tensors)``: each tensor (contiguous, on the CPU, in the order of
    ``paths``) filled from its chunk and checked against its crc32c; the bytes read, or None if a
    chunk is not held so or does not match (then some tensors may have been written)."""

    manifest: dict[str, Any]
    paths: list[str]
    shapes: list[tuple[int, ...]]
    dtypes: list[torch.dtype]
    fill: Callable[[Sequence[torch.Tensor]], int | None]


class RestoreSource(StorageWrapper):
    """A tier of a restore over ``inner`` (the next tier, or storage).

    Order of calls in a restore: ``list_dir``/``read`` (steps, commit point, fragments), then
    ``read_threads`` once, then ``read_chunk`` from many threads at once. ``served_bytes``
    counts the chunk bytes this source served itself, ``served_by`` the same per tier (a memory
    tier that also holds replicas counts those as ``Tier.PEER``); ``fall_back`` notes why reads
    went below and ``read_below`` what they cost; ``fallbacks`` gathers the chain's. All
    thread-safe."""

    tier: Tier = Tier.STORAGE

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner)
        self.served_bytes = 0
        self.served_chunks = 0
        self.served_by: dict[Tier, int] = {}
        self._count_lock = threading.Lock()
        self._fallbacks: dict[tuple[Tier, FallbackReason], Fallback] = {}

    def read_chunk(self, key: str, data: memoryview, location: Where = None) -> chunks.ChunkRead:
        """Fill ``data`` with the bytes of the chunk whose logical (zarr) key is ``key``; in
        storage it is at ``location`` (None: the object ``key`` itself), given as a Location or
        as a function that finds it (called only by the tier that reads storage: a chunk held in
        memory is served without reading the fragment that locates it). The default reads the
        next tier."""
        return read_chunk(self.inner, key, data, location)

    def read_chunk_batch(self, items: Sequence[tuple[str, memoryview, Where]]) -> list[chunks.ChunkRead | Exception]:
        """Many chunks at once (a reader's batch of ``(key, data, location)``, as ``read_chunk``
        takes them): per item, what ``read_chunk`` returns, or the ``FileNotFoundError``,
        ``EOFError`` or ``FormatError`` it raises. One by one here; a tier that holds chunks side
        by side reads them with a few large reads instead."""
        out: list[chunks.ChunkRead | Exception] = []
        for key, data, location in items:
            try:
                out.append(self.read_chunk(key, data, location))
            except (FileNotFoundError, EOFError, FormatError) as e:
                out.append(e)
        return out

    def holds_step(self, step: int) -> bool:
        """Whether a memory tier of this chain holds committed ``step`` (its commit point)."""
        return isinstance(self.inner, RestoreSource) and self.inner.holds_step(step)

    def read_whole(self, items: Sequence[tuple[str, torch.Tensor]]) -> int | None:
        """Fill each ``(logical key, tensor)`` (a contiguous CPU tensor of the chunk's bytes) from
        one memory tier of this chain that holds every one of those chunks whole, each checked
        against its crc32c (see :mod:`ckpt.direct`): the bytes read, or None if one is not held
        so or does not match (then some tensors may have been written; the caller reads them
        again the planned way)."""
        return self.inner.read_whole(items) if isinstance(self.inner, RestoreSource) else None

    def held_step(self, step: int) -> HeldStep | None:
        """Committed ``step`` as a memory tier of this chain holds it whole, if one does (one
        table for the step, no listing of what it holds): see :class:`HeldStep`."""
        return self.inner.held_step(step) if isinstance(self.inner, RestoreSource) else None

    def will_read(self, step: int, writers: set[str]) -> None:
        """A restore is about to read chunks of ``step`` that ``writers`` wrote (format 3's packs
        say whose they are): a tier that fetches from elsewhere asks only for those."""
        if isinstance(self.inner, RestoreSource):
            self.inner.will_read(step, writers)

    def read_threads(self, step: int, default: int) -> int:
        """How many threads should read ``step``'s chunks: ``default`` (the I/O threads asked
        for) unless a tier knows better (copies out of memory are bound by the cores)."""
        return self.inner.read_threads(step, default) if isinstance(self.inner, RestoreSource) else default

    def count(self, nbytes: int, tier: Tier | None = None, *, chunks: int = 1) -> None:
        tier = tier or self.tier
        with self._count_lock:
            self.served_bytes += nbytes
            self.served_chunks += chunks
            self.served_by[tier] = self.served_by.get(tier, 0) + nbytes

    def fall_back(self, tier: Tier, reason: FallbackReason, detail: str) -> Fallback:
        """Note that ``tier`` sends reads below for ``reason`` (one record per tier and reason,
        with the first detail)."""
        with self._count_lock:
            fb = self._fallbacks.get((tier, reason))
            if fb is None:
                fb = self._fallbacks[(tier, reason)] = Fallback(tier, reason, detail)
                log.info("restore: the %s tier falls back (%s): %s", tier.value, reason.value, detail)
            return fb

    def read_below(self, fallback: Fallback, nbytes: int) -> None:
        """A chunk of ``nbytes`` was read from the tiers below for ``fallback``'s reason."""
        tier = self.inner.tier if isinstance(self.inner, RestoreSource) else Tier.STORAGE
        with self._count_lock:
            fallback.chunks += 1
            fallback.read_instead[tier] = fallback.read_instead.get(tier, 0) + nbytes

    def fallbacks(self) -> list[Fallback]:
        """Every fallback of this chain, top tier first."""
        out: list[Fallback] = []
        for source in self.tiers():
            with source._count_lock:
                out.extend(Fallback(f.tier, f.reason, f.detail, f.chunks, dict(f.read_instead))
                           for f in source._fallbacks.values())
        return out

    def tiers(self) -> list[RestoreSource]:
        """This source and every source below it, top first."""
        below = self.inner.tiers() if isinstance(self.inner, RestoreSource) else []
        return [self, *below]

    def served(self) -> dict[Tier, int]:
        """Chunk bytes served per tier by this chain (every tier of the chain listed, 0 if it
        served nothing)."""
        out: dict[Tier, int] = {}
        for source in self.tiers():
            out.setdefault(source.tier, 0)
            with source._count_lock:
                for tier, n in source.served_by.items():
                    out[tier] = out.get(tier, 0) + n
        return out


class StorageSource(RestoreSource):
    """The bottom tier: chunks read from storage with the chunk codec, counted."""

    tier = Tier.STORAGE

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner)
        self.chunk_reader = ReadAhead(inner)  # small chunks side by side in a pack: a few large reads

    def read_chunk(self, key: str, data: memoryview, location: Where = None) -> chunks.ChunkRead:
        read = read_chunk(self.chunk_reader, key, data, location)
        self.count(read.total)
        return read


Where = Location | Callable[[], Location | None] | None


def restore_report(source: Storage, step: int | None, seconds: float) -> RestoreReport:
    """What a restore through ``source`` read from where, with its fallbacks (each logged as a
    warning: a restore that fell back is never silent)."""
    if not isinstance(source, RestoreSource):
        return RestoreReport(step, seconds, {})
    fallbacks = tuple(source.fallbacks())
    for f in fallbacks:
        instead = ", ".join(f"{n / 1e6:.1f} MB from {t.value}" for t, n in f.read_instead.items()) or "nothing"
        log.warning("restore of step %s: the %s tier fell back (%s: %s); read instead: %s in %d chunk(s)",
                    step, f.tier.value, f.reason.value, f.detail, instead, f.chunks)
    return RestoreReport(step, seconds, source.served(), fallbacks)


def read_chunk(storage: Storage, key: str, data: memoryview, location: Where = None) -> chunks.ChunkRead:
    """Read one chunk through ``storage``: its tiers when it is a :class:`RestoreSource`."""
    if isinstance(storage, RestoreSource):
        return storage.read_chunk(key, data, location)
    if callable(location):
        location = location()
    if location is None:
        return chunks.read_chunk(storage, key, data)
    return chunks.read_chunk(storage, location.path, data, offset=location.offset)


def read_threads(storage: Storage, step: int, default: int) -> int:
    return storage.read_threads(step, default) if isinstance(storage, RestoreSource) else default
