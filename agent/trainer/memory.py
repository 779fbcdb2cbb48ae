"""The agent's memory as the top tiers of a restore: :class:`AgentMemoryStorage` serves the
chunks of committed snapshots the node's agent holds (its own: agent memory; replicas and
snapshots fetched from the ring's other agents: peer) straight from shared memory, and hands
every other read to the tier below (storage). :meth:`agent.trainer.sink.AgentSink.restore_source`
builds it from the agent's listing.

Never silently: every chunk read below is charged to a :class:`ckpt.restore.Fallback` (the
agent unreachable or its listing failed, a held snapshot unusable, a fetch from a peer failed,
or nothing held), which the restore's report returns with the bytes then read from storage.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from itertools import repeat
from typing import Any

import crc32c
import grpc
import torch

from ckpt import format as fmt
from ckpt.chunks import CRC_BYTES, ChunkRead, stored_nbytes
from ckpt.chunks import payload as chunk_payload
from ckpt.planning import WriteRequest
from ckpt.restore import FallbackReason, RestoreSource, Tier, Where
from ckpt.storage import Storage

from ..pb import pb
from .held import CommitPoints, HeldSnapshot, ReadDocument, RemoteSnapshot, inline_only
from .spans import Span, close_fds, memory_threads, open_segment, pread_crc, pread_many, read_whole

log = logging.getLogger(__name__)

Why = tuple[Tier, FallbackReason, str]


def _payload(req: WriteRequest) -> tuple[memoryview, torch.Tensor]:
    return chunk_payload(req.tensor, req.slices, req.chunk_shape, ragged=req.ragged)


def _error(e: BaseException) -> str:
    return f"{e.code()}: {e.details()}" if isinstance(e, grpc.Call) else f"{type(e).__name__}: {e}"


class AgentMemoryStorage(RestoreSource):
    """Reads committed snapshots the agent holds straight from its shared memory; everything
    else from ``inner``. Read-only use (restore): writes go to ``inner``.

    A chunk served from memory is still checked against the crc32c its writer recorded, so
    memory that changed since the snapshot was persisted is caught as corruption.

    Snapshots that another agent of the ring holds (``peer_address`` set, listed with
    ``include_peers``) are fetched into the local agent's memory by ``fetch`` the first time one
    of their chunks is read, whole, once; only snapshots the restore actually reads cross the
    network. If the fetch fails, those chunks are read from ``inner``. With ``list_peers``, the
    ring is asked what it holds only when a chunk is read that no snapshot given here holds: a
    restore on a node that holds its own snapshot never dials a peer (nor waits on a lost one).
    ``document`` reads back what a listing left out by reference; ``unavailable`` (a reason and
    a detail) says why there is no listing at all (every read then goes below, charged to it).
    """

    tier = Tier.AGENT_MEMORY

    def __init__(self, inner: Storage, snapshots: Sequence[pb.SnapshotInfo], shm_dir: str, *,
                 fetch: Callable[[pb.SnapshotInfo], pb.SnapshotInfo] | None = None,
                 list_peers: Callable[[set[str] | None], Sequence[pb.SnapshotInfo]] | None = None,
                 document: ReadDocument | None = None,
                 unavailable: tuple[FallbackReason, str] | None = None) -> None:
        super().__init__(inner)
        self.shm_dir = shm_dir
        self._fetch_fn = fetch
        self._list_peers_fn = list_peers if fetch is not None else None
        self._document = document or inline_only
        self._commits = CommitPoints(inner)
        self._list_lock = threading.Lock()
        self._roots: dict[str, bytes] = {}
        # key -> (bytes, crc32c, tier serving it, its request: None for a span, read with pread alone)
        self._chunks: dict[str, tuple[int, int, Tier, WriteRequest | None]] = {}
        self._remote: dict[str, RemoteSnapshot] = {}  # chunk key -> the peer-held snapshot serving it
        # path -> chunks stored contiguously in a segment (spans.Span): read with pread, which
        # copies in the kernel (a fresh mapping would fault a page per few pages first, ~0.06 s
        # per GiB, a third of the copy); small ones copied out of the mapping (spans.read_whole).
        self._spans: dict[str, Span] = {}
        self._maps: list[Any] = []
        self._fds: list[int] = []
        weakref.finalize(self, close_fds, self._fds)
        self.fetched_bytes = 0
        self.served_by = {Tier.AGENT_MEMORY: 0, Tier.PEER: 0}  # both tiers are reported, also when 0
        # Why a chunk is read below: by its key where known, else the first reason of _why_any.
        self._why: dict[str, Why] = {}
        self._why_any: list[Why] = [(Tier.AGENT_MEMORY, *unavailable)] if unavailable else []
        self._peers_listed = False
        self._local: set[tuple[int, str]] = set()  # (step, writer) of the snapshots read here
        self._wanted: set[str] | None = None  # will_read: writers read and not held here (None: unknown)
        # Local snapshots first: a chunk the local agent holds is never fetched from a peer.
        self._take(sorted(snapshots, key=lambda s: bool(s.peer_address)))

    def _take(self, infos: Sequence[pb.SnapshotInfo]) -> None:
        for s in infos:
            if not s.key.run_url:  # an agent of the ring that could not be listed
                self._why_any.append((Tier.PEER, FallbackReason.LISTING_FAILED,
                                      s.error or f"peer agent {s.peer_address} could not be listed"))
                continue
            held = HeldSnapshot(s, self._document, self._commits)
            tier = Tier.PEER if s.peer_address or s.replica else Tier.AGENT_MEMORY
            try:
                if s.peer_address:
                    self._add_remote(held)
                else:
                    self._add(held, tier)
            except Exception as e:  # noqa: BLE001 - that snapshot is then read from storage
                self._unusable(held, tier, f"{held.describe()} is unusable here: {_error(e)}")

    def _unusable(self, held: HeldSnapshot, tier: Tier, detail: str,
                  reason: FallbackReason = FallbackReason.UNUSABLE) -> None:
        """Reads of ``held``'s chunks go below, for ``reason``."""
        log.info("%s", detail)
        try:
            keys = held.chunk_keys()
        except Exception:  # noqa: BLE001 - its chunks are not known: charge any read below to it
            self._why_any.append((tier, reason, detail))
            return
        for key in keys:
            if key not in self._chunks:
                self._why.setdefault(key, (tier, reason, detail))

    def _list_peers(self) -> None:
        """Once: add what the ring's other agents hold (after a chunk no local snapshot holds)."""
        with self._list_lock:
            if self._list_peers_fn is None:
                return
            wanted, self._peers_listed = self._wanted, True
            if wanted is not None and not wanted:  # every writer read is held here
                self._list_peers_fn = None
                return
            try:
                infos = [s for s in self._list_peers_fn(wanted) if s.peer_address]
            except Exception as e:  # noqa: BLE001 - storage then
                infos = []
                self._why_any.append((Tier.PEER, FallbackReason.LISTING_FAILED,
                                      f"the agent could not list what the ring's agents hold: {_error(e)}"))
            self._list_peers_fn = None
            self._take(infos)

    def will_read(self, step: int, writers: set[str]) -> None:
        """The ring is asked (if at all) only for the snapshots of ``writers`` this node does not hold."""
        with self._list_lock:
            self._wanted = {w for w in writers if (step, w) not in self._local}
        super().will_read(step, writers)

    def _add_remote(self, held: HeldSnapshot) -> None:
        if self._fetch_fn is None:
            return
        commit_point, why = held.commit_point()
        if commit_point is None:
            if why:
                self._unusable(held, Tier.PEER, why)
            return
        remote = RemoteSnapshot(held, [k for k in held.chunk_keys() if k not in self._chunks and k not in self._remote])
        for key in remote.keys:
            self._remote[key] = remote

    def _fetch(self, remote: RemoteSnapshot) -> None:
        """Bring a peer-held snapshot into the local agent's memory (once; other readers wait)."""
        with remote.lock:
            if remote.done:
                return
            s = remote.held.info
            try:
                held = self._fetch_fn(s)  # type: ignore[misc]
                self._add(HeldSnapshot(held, self._document, self._commits), Tier.PEER)
                with self._count_lock:
                    self.fetched_bytes += held.nbytes
                log.info("fetched step %d of %s (%.1f MB) from peer agent %s", s.key.step, s.key.writer,
                         held.nbytes / 1e6, s.peer_address)
            except Exception as e:  # noqa: BLE001 - read from storage instead
                detail = f"cannot fetch {remote.held.describe()}: {_error(e)}"
                log.warning("%s: reading it from storage", detail)
                for key in remote.keys:
                    if key not in self._chunks:
                        self._why[key] = (Tier.PEER, FallbackReason.FETCH_FAILED, detail)
            finally:
                remote.done = True  # its keys stay: a failed snapshot is neither listed nor fetched again

    def _add(self, held: HeldSnapshot, tier: Tier) -> None:
        s = held.info
        if not s.segment:
            return
        commit_point, why = held.commit_point()
        if commit_point is None:
            if why:
                self._unusable(held, tier, why)
            return
        sdir = fmt.step_dir(s.key.step)
        fd, view, tensor = open_segment(f"{self.shm_dir}/{s.segment}", s.nbytes, self._maps, self._fds)
        base = tensor.data_ptr()
        index = held.index(tensor)
        requests, crcs = index.plan.plan.requests, index.crcs
        if not index.spans and any(c is None for c in crcs):  # an older agent's plan: the fragment's crc32c
            known = held.fragment_crcs(self.inner)
            if known is None:
                self._unusable(held, tier, f"{held.describe()}: its writer's fragment is of another save")
                return
            crcs = [known.get((r.path, tuple(r.index))) for r in requests]
        missing = []
        prefix, chunks, spans, why = f"{sdir}/", self._chunks, self._spans, self._why
        if index.spans:  # thousands: column by column, in C loops
            rels, offsets, sizes, span_crcs = zip(*index.spans)
            if None in span_crcs:  # (rare) chunks the agent knows no crc32c of: read below
                missing += [prefix + r for r, c in zip(rels, span_crcs) if c is None]
                kept = [sp for sp in index.spans if sp[3] is not None]
                rels, offsets, sizes, span_crcs = zip(*kept) if kept else ((), (), (), ())
            keys = list(map(prefix.__add__, rels))
            n = len(keys)
            chunks.update(zip(keys, zip(sizes, span_crcs, repeat(tier, n), repeat(None, n))))
            spans.update(zip(keys, zip(repeat(fd, n), offsets, repeat(view, n), repeat(base, n), sizes, span_crcs,
                                       repeat(tier, n))))
            if why:
                deque(map(why.pop, keys, repeat(None, n)), maxlen=0)
        for req, crc in zip(requests, crcs):
            key = f"{sdir}/{req.key}"
            if crc is None:
                missing.append(key)
                continue
            nbytes = stored_nbytes(req.chunk_shape, req.tensor.element_size())
            chunks[key] = (nbytes, crc, tier, req)
            why.pop(key, None)
            region = req.tensor.detach()[req.slices]
            if not req.ragged and region.is_contiguous() and region.device.type == "cpu":
                spans[key] = (fd, region.data_ptr() - base, view, base, nbytes, crc, tier)
            else:
                spans.pop(key, None)
        for key in missing:
            self._why.setdefault(key, (tier, FallbackReason.UNUSABLE,
                                       f"{held.describe()}: the agent knows no crc32c of some of its chunks"))
        self._roots[f"{sdir}/{fmt.META}"] = commit_point
        self._local.add((s.key.step, s.key.writer))

    @property
    def steps_in_memory(self) -> list[int]:
        return sorted(int(k.split("/")[0]) for k in self._roots)

    def holds_step(self, step: int) -> bool:
        return f"{fmt.step_dir(step)}/{fmt.META}" in self._roots

    def read_whole(self, items: Sequence[tuple[str, torch.Tensor]]) -> int | None:
        served = read_whole(self._spans, items, self._bring)
        if served is None:
            return None
        for tier, (nbytes, count) in served.items():
            self.count(nbytes, tier, chunks=count)
        return sum(nbytes for nbytes, _ in served.values())

    def read_threads(self, step: int, default: int) -> int:
        if self.holds_step(step):
            return memory_threads(default)
        return super().read_threads(step, default)

    def _below(self, key: str, data: memoryview, location: Where) -> ChunkRead:
        """Read ``key`` from the tier below, charged to the reason it is not served here."""
        read = super().read_chunk(key, data, location)
        why = self._why.get(key) or (self._why_any[0] if self._why_any else None)
        if why is None:
            ring = " nor do the ring's agents" if self._peers_listed else ""
            step = key.split("/", 1)[0].lstrip("0") or "0"
            why = (Tier.AGENT_MEMORY, FallbackReason.NOT_HELD,
                   f"the agent holds no committed snapshot of step {step} with chunks the restore reads{ring}")
        self.read_below(self.fall_back(*why), read.total)
        return read

    def _bring(self, key: str) -> None:
        """Make ``key`` local if a peer holds it: the ring listed (once), its snapshot fetched."""
        remote = self._remote.get(key)
        if remote is None and self._list_peers_fn is not None and key not in self._chunks:
            self._list_peers()
            remote = self._remote.get(key)
        if remote is not None and not remote.done:
            self._fetch(remote)

    def read_chunk_batch(self, items: Sequence[tuple[str, memoryview, Where]]) -> list[ChunkRead | Exception]:
        """Chunks held side by side in a segment are read together (``spans.pread_many``);
        any other item as ``read_chunk`` reads it."""
        out: list[ChunkRead | Exception | None] = [None] * len(items)
        by_fd: dict[int, list[tuple[int, int]]] = {}
        rest: list[int] = []
        for i, (key, data, _where) in enumerate(items):
            self._bring(key)
            hit, span = self._chunks.get(key), self._spans.get(key)
            if hit is None or span is None or hit[0] != data.nbytes:
                rest.append(i)
            else:
                by_fd.setdefault(span[0], []).append((span[1], i))
        served: dict[Tier, list[int]] = {}
        for fd, spans in by_fd.items():
            for (_offset, i), actual in zip(spans, pread_many(fd, [(off, items[i][1]) for off, i in spans])):
                if actual is None:  # the segment is shorter than its index says: as read_chunk finds it
                    rest.append(i)
                    continue
                nbytes, crc, tier, _req = self._chunks[items[i][0]]
                out[i] = ChunkRead(nbytes + CRC_BYTES, crc, actual)
                total = served.setdefault(tier, [0, 0])
                total[0] += nbytes
                total[1] += 1
        for tier, (nbytes, n) in served.items():
            self.count(nbytes, tier, chunks=n)
        for i, read in zip(rest, super().read_chunk_batch([items[i] for i in rest])):
            out[i] = read
        return out  # type: ignore[return-value]

    def read_chunk(self, key: str, data: memoryview, location: Where = None) -> ChunkRead:
        self._bring(key)
        hit = self._chunks.get(key)
        if hit is None:
            return self._below(key, data, location)
        nbytes, crc, tier, req = hit
        if nbytes != data.nbytes:
            self._why.setdefault(key, (tier, FallbackReason.UNUSABLE,
                                       f"chunk {key} is held as {nbytes} bytes, the restore reads {data.nbytes}"))
            return self._below(key, data, location)
        span = self._spans.get(key)
        if span is not None:
            actual = pread_crc(span[0], span[1], data.cast("B"))
            if actual is not None:
                self.count(nbytes, tier)
                return ChunkRead(nbytes + CRC_BYTES, crc, actual)
        if req is None:  # the segment is shorter than its index says
            self._why.setdefault(key, (tier, FallbackReason.UNUSABLE, f"chunk {key} lies beyond its segment's end"))
            return self._below(key, data, location)
        payload_bytes, _keep = _payload(req)
        # torch copies without the GIL, so the reader's threads copy in parallel.
        torch.frombuffer(data, dtype=torch.uint8).copy_(torch.frombuffer(payload_bytes, dtype=torch.uint8))
        self.count(nbytes, tier)
        return ChunkRead(nbytes + CRC_BYTES, crc, crc32c.crc32c(data))

    def _held_bytes(self, path: str) -> bytes | None:
        """A chunk held here as stored (data, then crc32c), or None."""
        hit = self._chunks.get(path)
        if hit is None:
            return None
        nbytes, crc, _tier, req = hit
        span = self._spans.get(path)
        if span is not None:
            data = bytearray(nbytes)
            if os.preadv(span[0], [data], span[1]) == nbytes:
                return bytes(data) + crc.to_bytes(CRC_BYTES, "little")
        if req is None:
            return None
        payload_bytes, _keep = _payload(req)
        return bytes(payload_bytes) + crc.to_bytes(CRC_BYTES, "little")

    def read(self, path: str) -> bytes:
        if path in self._roots:
            return self._roots[path]
        held = self._held_bytes(path)
        return held if held is not None else self.inner.read(path)

    def size(self, path: str) -> int | None:
        if path in self._roots:
            return len(self._roots[path])
        hit = self._chunks.get(path)
        if hit is not None:
            return hit[0] + CRC_BYTES
        return self.inner.size(path)

    def list_dir(self, path: str) -> list[str]:
        names = self.inner.list_dir(path)
        if path == "":
            names = sorted(set(names) | {k.split("/")[0] for k in self._roots})
        return names

    def delete(self, path: str, *, recursive: bool = False) -> None:
        self.inner.delete(path, recursive=recursive)
