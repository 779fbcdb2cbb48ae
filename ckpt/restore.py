"""The restore-source plug point: which tier serves each read of a restore.

A :class:`RestoreSource` is a read view of a run. It serves the chunks (and the small documents:
commit points, fragments) that its tier holds, and hands every other read to the source below
it, down to storage. Tiers, freshest first: the node agent's memory, a peer agent (replicas, or
snapshots fetched over the ring), storage. The engine reads through whatever chain the sink
gives it (``Sink.restore_source``) and reads back how many bytes each tier served, so that a
restore that fell back is visible, never silent.

Implementations: :class:`StorageSource` (the bottom: storage itself) here; the agent's memory
and peer tiers in ``agent``. ``ckpt.testing.restore_source`` is their conformance suite.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable

from . import chunks
from .layouts import Location
from .storage import Storage, StorageWrapper


class Tier(str, enum.Enum):
    """Where a restore's bytes came from. One home for the names: events, metrics and
    ``RunResult`` use these values."""

    AGENT_MEMORY = "agent memory"
    PEER = "peer"
    STORAGE = "storage"


class RestoreSource(StorageWrapper):
    """A tier of a restore over ``inner`` (the next tier, or storage).

    Order of calls in a restore: ``list_dir``/``read`` (steps, commit point, fragments), then
    ``read_threads`` once, then ``read_chunk`` from many threads at once. ``served_bytes``
    counts the chunk bytes this source served itself, ``served_by`` the same per tier (a memory
    tier that also holds replicas counts those as ``Tier.PEER``); both thread-safe."""

    tier: Tier = Tier.STORAGE

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner)
        self.served_bytes = 0
        self.served_chunks = 0
        self.served_by: dict[Tier, int] = {}
        self._count_lock = threading.Lock()

    def read_chunk(self, key: str, data: memoryview, location: Where = None) -> chunks.ChunkRead:
        """Fill ``data`` with the bytes of the chunk whose logical (zarr) key is ``key``; in
        storage it is at ``location`` (None: the object ``key`` itself), given as a Location or
        as a function that finds it (called only by the tier that reads storage: a chunk held in
        memory is served without reading the fragment that locates it). The default reads the
        next tier."""
        return read_chunk(self.inner, key, data, location)

    def read_threads(self, step: int, default: int) -> int:
        """How many threads should read ``step``'s chunks: ``default`` (the I/O threads asked
        for) unless a tier knows better (copies out of memory are bound by the cores)."""
        return self.inner.read_threads(step, default) if isinstance(self.inner, RestoreSource) else default

    def count(self, nbytes: int, tier: Tier | None = None) -> None:
        tier = tier or self.tier
        with self._count_lock:
            self.served_bytes += nbytes
            self.served_chunks += 1
            self.served_by[tier] = self.served_by.get(tier, 0) + nbytes

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

    def read_chunk(self, key: str, data: memoryview, location: Where = None) -> chunks.ChunkRead:
        read = read_chunk(self.inner, key, data, location)
        self.count(read.total)
        return read


Where = Location | Callable[[], Location | None] | None


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
