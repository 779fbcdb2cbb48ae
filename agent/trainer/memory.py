"""The agent's memory as the top tiers of a restore: :class:`AgentMemoryStorage` serves the
chunks of committed snapshots the node's agent holds (its own: agent memory; replicas and
snapshots fetched from the ring's other agents: peer) straight from shared memory, and hands
every other read to the tier below (storage). :meth:`agent.trainer.sink.AgentSink.restore_source`
builds it from the agent's listing.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import crc32c
import grpc
import torch

from ckpt import format as fmt
from ckpt.chunks import CRC_BYTES, ChunkRead, stored_nbytes
from ckpt.chunks import payload as chunk_payload
from ckpt.manifest import MANIFEST_KEY, Fragment
from ckpt.planning import WriteRequest
from ckpt.restore import RestoreSource, Tier, Where
from ckpt.storage import Storage

from ..pb import pb
from ..plan import decode_plan
from ..shm import map_file

log = logging.getLogger(__name__)

_BLOCK = 1 << 20  # pread + crc32c per block: the crc reads the block while it is in cache


def _pread_crc(fd: int, offset: int, dest: memoryview) -> int | None:
    """Fill ``dest`` from ``fd`` at ``offset``; the crc32c of what was read, or None if the
    segment is shorter than expected."""
    crc = 0
    pos = 0
    n = dest.nbytes
    while pos < n:
        block = dest[pos: min(n, pos + _BLOCK)]
        got = os.preadv(fd, [block], offset + pos)
        if got <= 0:
            return None
        crc = crc32c.crc32c(block[:got], crc)
        pos += got
    return crc


def _payload(req: WriteRequest) -> tuple[memoryview, torch.Tensor]:
    return chunk_payload(req.tensor, req.slices, req.chunk_shape, ragged=req.ragged)


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


class _Remote:
    """A snapshot held by a peer agent, fetched on first use."""

    def __init__(self, info: pb.SnapshotInfo) -> None:
        self.info = info
        self.lock = threading.Lock()
        self.done = False  # fetched (its chunks are then local), or failed (read from storage)


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
    """

    tier = Tier.AGENT_MEMORY

    def __init__(self, inner: Storage, snapshots: Sequence[pb.SnapshotInfo], shm_dir: str, *,
                 fetch: Callable[[pb.SnapshotInfo], pb.SnapshotInfo] | None = None,
                 list_peers: Callable[[], Sequence[pb.SnapshotInfo]] | None = None) -> None:
        super().__init__(inner)
        self.shm_dir = shm_dir
        self._fetch_fn = fetch
        self._list_peers_fn = list_peers if fetch is not None else None
        self._list_lock = threading.Lock()
        self._roots: dict[str, bytes] = {}
        self._chunks: dict[str, tuple[WriteRequest, int, Tier]] = {}  # key -> (request, crc, tier serving it)
        self._remote: dict[str, _Remote] = {}  # chunk key -> the peer-held snapshot serving it
        # path -> (segment fd, offset) of chunks stored contiguously in a segment: read with
        # pread, which copies in the kernel; a fresh mapping of the segment would take a page
        # fault per few pages first (~0.06 s per GiB, a third of the whole copy).
        self._spans: dict[str, tuple[int, int]] = {}
        self._maps: list[Any] = []
        self._fds: list[int] = []
        weakref.finalize(self, _close_fds, self._fds)
        self.fetched_bytes = 0
        self.served_by = {Tier.AGENT_MEMORY: 0, Tier.PEER: 0}  # both tiers are reported, also when 0
        # Local snapshots first: a chunk the local agent holds is never fetched from a peer.
        for s in sorted(snapshots, key=lambda s: bool(s.peer_address)):
            try:
                if s.peer_address:
                    self._add_remote(s)
                else:
                    self._add(s, Tier.PEER if s.replica else Tier.AGENT_MEMORY)
            except Exception as e:  # noqa: BLE001 - that snapshot is then read from storage
                log.warning("snapshot of step %d (%s) held by %s is unusable here: %s", s.key.step,
                            s.key.writer, f"peer agent {s.peer_address}" if s.peer_address else "the agent", e)

    def _committed(self, s: pb.SnapshotInfo) -> tuple[bytes, Fragment] | None:
        """The step's commit point and the writer's fragment, if storage committed the step from
        the very save ``s`` holds (else None: another save, or retention removed it)."""
        if s.state == pb.SNAPSHOT_STATE_FAILED:
            return None
        sdir = fmt.step_dir(s.key.step)
        # Storage's commit point first (a small read): it is the truth once a step was
        # consolidated or saved again. The agent's copy serves when storage has none (retention
        # removed the step) or cannot be read (an outage); a replica's or a peer's holder may have
        # none (it learnt of the commit from the origin, or not yet).
        try:
            commit_point = self.inner.read(f"{sdir}/{fmt.META}")
        except FileNotFoundError:
            commit_point = s.commit_point
        except Exception as e:  # noqa: BLE001 - storage failing: the agent's copy
            log.warning("cannot read the commit point of step %d (%s): using the agent's copy", s.key.step, e)
            commit_point = s.commit_point
        if not commit_point:
            return None
        root = json.loads(commit_point)
        if root["attributes"][MANIFEST_KEY]["save_id"] != s.save_id:
            return None
        if s.fragment_json:
            frag = Fragment.from_dict(json.loads(s.fragment_json))
        else:
            frag = fmt.read_fragment(self.inner, s.key.step, s.key.writer)
            if frag.save_id != s.save_id:
                return None
        return commit_point, frag

    def _list_peers(self) -> None:
        """Once: add what the ring's other agents hold (after a chunk no local snapshot holds)."""
        with self._list_lock:
            if self._list_peers_fn is None:
                return
            try:
                infos = [s for s in self._list_peers_fn() if s.peer_address]
            except Exception as e:  # noqa: BLE001 - storage then
                log.warning("cannot list what the peer agents hold (%s): reading from storage", e)
                infos = []
            self._list_peers_fn = None
            for s in infos:
                try:
                    self._add_remote(s)
                except Exception as e:  # noqa: BLE001
                    log.warning("snapshot of step %d (%s) held by peer agent %s is unusable here: %s",
                                s.key.step, s.key.writer, s.peer_address, e)

    def _add_remote(self, s: pb.SnapshotInfo) -> None:
        if self._fetch_fn is None or self._committed(s) is None:
            return
        # The chunk keys only: the plan's views are laid over a meta tensor (no bytes here yet).
        plan = decode_plan(s.plan_json, torch.empty(s.nbytes, dtype=torch.uint8, device="meta"))
        remote = _Remote(s)
        for key in plan.chunk_requests(fmt.step_dir(s.key.step)):
            if key not in self._chunks and key not in self._remote:
                self._remote[key] = remote

    def _fetch(self, remote: _Remote) -> None:
        """Bring a peer-held snapshot into the local agent's memory (once; other readers wait)."""
        with remote.lock:
            if remote.done:
                return
            s = remote.info
            try:
                held = self._fetch_fn(s)  # type: ignore[misc]
                self._add(held, Tier.PEER)
                with self._count_lock:
                    self.fetched_bytes += held.nbytes
                log.info("fetched step %d of %s (%.1f MB) from peer agent %s", s.key.step, s.key.writer,
                         held.nbytes / 1e6, s.peer_address)
            except Exception as e:  # noqa: BLE001 - read from storage instead
                log.warning("cannot fetch step %d of %s from peer agent %s (%s): reading it from storage",
                            s.key.step, s.key.writer, s.peer_address,
                            f"{e.code()}: {e.details()}" if isinstance(e, grpc.Call) else e)
            finally:
                remote.done = True  # its keys stay: a failed snapshot is neither listed nor fetched again

    def _add(self, s: pb.SnapshotInfo, tier: Tier) -> None:
        if not s.segment:
            return
        found = self._committed(s)
        if found is None:
            return
        commit_point, frag = found
        sdir = fmt.step_dir(s.key.step)
        shm_dir = self.shm_dir
        mm, tensor = map_file(f"{shm_dir}/{s.segment}", s.nbytes, writable=False)
        self._maps.append(mm)
        fd = os.open(f"{shm_dir}/{s.segment}", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._fds.append(fd)
        base = tensor.data_ptr()
        plan = decode_plan(s.plan_json, tensor)
        crcs = {(p, r.index): r.crc32c for p, recs in frag.chunks.items() for r in recs}
        for key, req in plan.chunk_requests(sdir).items():
            crc = crcs.get((req.path, req.index))
            if crc is not None:
                self._chunks[key] = (req, crc, tier)
                region = req.tensor.detach()[req.slices]
                if not req.ragged and region.is_contiguous() and region.device.type == "cpu":
                    self._spans[key] = (fd, region.data_ptr() - base)
        self._roots[f"{sdir}/{fmt.META}"] = commit_point

    @property
    def steps_in_memory(self) -> list[int]:
        return sorted(int(k.split("/")[0]) for k in self._roots)

    def read_threads(self, step: int, default: int) -> int:
        if f"{fmt.step_dir(step)}/{fmt.META}" in self._roots:
            # Copies out of memory: one thread per core (2x faster than 8 threads on 2 cores).
            return max(1, min(default, max(2, os.cpu_count() or 1)))
        return super().read_threads(step, default)

    def read_chunk(self, key: str, data: memoryview, location: Where = None) -> ChunkRead:
        remote = self._remote.get(key)
        if remote is None and self._list_peers_fn is not None and key not in self._chunks:
            self._list_peers()
            remote = self._remote.get(key)
        if remote is not None and not remote.done:
            self._fetch(remote)
        hit = self._chunks.get(key)
        if hit is None:
            return super().read_chunk(key, data, location)
        req, crc, tier = hit
        nbytes = stored_nbytes(req.chunk_shape, req.tensor.element_size())
        if nbytes != data.nbytes:
            return super().read_chunk(key, data, location)
        span = self._spans.get(key)
        if span is not None:
            actual = _pread_crc(span[0], span[1], data.cast("B"))
            if actual is not None:
                self.count(nbytes, tier)
                return ChunkRead(nbytes + CRC_BYTES, crc, actual)
        payload_bytes, _keep = _payload(req)
        # torch copies without the GIL, so the reader's threads copy in parallel.
        torch.frombuffer(data, dtype=torch.uint8).copy_(torch.frombuffer(payload_bytes, dtype=torch.uint8))
        self.count(nbytes, tier)
        return ChunkRead(nbytes + CRC_BYTES, crc, crc32c.crc32c(data))

    def read(self, path: str) -> bytes:
        if path in self._roots:
            return self._roots[path]
        hit = self._chunks.get(path)
        if hit is not None:
            data, _keep = _payload(hit[0])
            return bytes(data) + hit[1].to_bytes(CRC_BYTES, "little")
        return self.inner.read(path)

    def size(self, path: str) -> int | None:
        if path in self._roots:
            return len(self._roots[path])
        hit = self._chunks.get(path)
        if hit is not None:
            return stored_nbytes(hit[0].chunk_shape, hit[0].tensor.element_size()) + CRC_BYTES
        return self.inner.size(path)

    def list_dir(self, path: str) -> list[str]:
        names = self.inner.list_dir(path)
        if path == "":
            names = sorted(set(names) | {k.split("/")[0] for k in self._roots})
        return names

    def delete(self, path: str, *, recursive: bool = False) -> None:
        self.inner.delete(path, recursive=recursive)
