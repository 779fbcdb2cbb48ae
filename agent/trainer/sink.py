"""The agent as a trainer's sink: :class:`AgentSink` (the ``agent`` entry of ``ckpt.sinks``),
the allocator that stages snapshots into agent-owned shared memory, and the restore source
that serves what the agent holds (:mod:`agent.trainer.memory`).

``ckpt.Checkpointer(url, agent="unix:///run/ckpt-agent/agent.sock")`` opens it. Flow of one
checkpoint: the engine stages into a slab = a leased segment → ``submit`` announces it with
its plan (JSON) → the agent persists, commits, and reports each state on the session stream
→ the futures resolve. The slab goes back to the trainer's pool (``job.release()``) only
when the agent releases the segment: the agent keeps the newest committed snapshot of each
writer in memory for restore, so the trainer's host budget must allow two slabs (the
engine's default budget, twice the snapshot, does).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

import grpc
import torch

from ckpt import SnapshotState, pinning
from ckpt.errors import CkptError
from ckpt.hostpool import HostBufferPool
from ckpt.manifest import Fragment, Manifest
from ckpt.restore import FallbackReason, RestoreSource, StorageSource
from ckpt.retention import RetentionPolicy
from ckpt.signals import CommitSignals
from ckpt.sink import PersistJob, Sink, SinkConfig
from ckpt.storage import Storage

from ..documents import MAX_DOCUMENT_BYTES, Assembly
from ..errors import DocumentError
from ..pb import pb
from ..plan import encode_plan
from ..shm import map_file
from ..wire import PB_TO_STATE, error_from_rpc
from .client import AgentClient
from .memory import AgentMemoryStorage
from .relay import CommitRelay
from .table import TableError, TableSource

log = logging.getLogger(__name__)

_REGISTER_TIMEOUT_S = 30.0
_RESTORE_DOCUMENTS = (pb.DOCUMENT_KIND_CHUNK_INDEX,)


class ShmAllocator:
    """Slabs are agent-owned shared-memory segments, mapped here (and pinned on CUDA).

    Every mapping is registered with CUDA for as long as it is mapped, and unregistered before
    it is unmapped: by ``free`` for a slab the pool gives back, by ``close`` (or, failing that,
    when the allocator is collected) for the slabs the agent still held when the sink closed.
    """

    def __init__(self, sink: AgentSink) -> None:
        self.sink = sink
        self._maps: dict[str, tuple[Any, int]] = {}  # segment -> (mapping, pinned address or 0)
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, ShmAllocator._drop_all, self._maps, self._lock)

    def allocate(self, nbytes: int, *, pin_memory: bool) -> tuple[torch.Tensor, Any]:
        try:
            lease = self.sink.client.lease(self.sink.session_id, nbytes)
        except grpc.RpcError as e:
            raise error_from_rpc(e, f"leasing {nbytes / 2**20:.1f} MiB of agent memory") from None
        mm, tensor = map_file(f"{self.sink.shm_dir}/{lease.segment}", nbytes, writable=True)
        pinned = tensor.data_ptr() if pin_memory and pinning.register(tensor.data_ptr(), nbytes) else 0
        with self._lock:
            self._maps[lease.segment] = (mm, pinned)
        return tensor, lease.segment

    def segments(self) -> tuple[int, int]:
        """(segments mapped now, of which registered with CUDA as pinned memory)."""
        with self._lock:
            return len(self._maps), sum(1 for _, pinned in self._maps.values() if pinned)

    def free(self, buffer: torch.Tensor, handle: Any) -> None:
        with self._lock:
            mm, pinned = self._maps.pop(handle, (None, 0))
        if pinned:
            pinning.unregister(pinned)
        del buffer, mm  # unmapped now, or by the last view still alive (agent.shm.map_file)
        if not self.sink.closed:
            try:
                self.sink.client.release(self.sink.session_id, handle)
            except grpc.RpcError:
                log.debug("releasing segment %s failed", handle, exc_info=True)

    def close(self) -> None:
        """Unregister and unmap every segment still mapped (the agent frees or keeps its own)."""
        self._finalizer()

    @staticmethod
    def _drop_all(maps: dict[str, tuple[Any, int]], lock: threading.Lock) -> None:
        with lock:
            items = list(maps.values())
            maps.clear()
        for _mm, pinned in items:
            if pinned:
                pinning.unregister(pinned)
        items.clear()  # the mappings go now, or with the last tensor viewing them (agent.shm.map_file)


class AgentSink(Sink):
    def __init__(self, address: str, *, storage: Storage, config: SinkConfig, writer: str,
                 after_commit: Callable[[Manifest], None] | None = None,
                 retention: RetentionPolicy | None = None, signals: CommitSignals | None = None) -> None:
        self.storage = storage
        self.config = config
        self.writer = writer
        self.run_url = storage.url
        # With a retention policy the agent runs it after committing (the trainer may be gone);
        # otherwise the trainer runs after_commit when it learns of the commit.
        self.after_commit = None if retention is not None else after_commit
        self.client = AgentClient(address)
        self.client.wait_ready(_REGISTER_TIMEOUT_S)
        self.closed = False
        self._lock = threading.Lock()
        self._jobs: dict[tuple[int, str], PersistJob] = {}
        self._held: dict[str, PersistJob] = {}  # segment -> the job whose snapshot the agent holds in it
        ret = pb.Retention(keep_last=retention.keep_last, keep_every=retention.keep_every or 0) if retention else None
        self._call = self.client.register(pb.RegisterRequest(
            run_url=self.run_url, writer=writer, pid=os.getpid(), retention=ret, durable=config.durable,
            io_threads=config.io_threads, commit_timeout_s=config.commit_timeout_s,
            library_versions={k: str(v) for k, v in config.library_versions.items()}, document_pieces=True))
        first: Future = Future()
        self._events = threading.Thread(target=self._event_loop, args=(first,), name="ckpt-agent-events",
                                        daemon=True)
        self._events.start()
        registered = first.result(timeout=_REGISTER_TIMEOUT_S)
        self.session_id: str = registered.session_id
        self.agent_id: str = registered.agent_id
        self.shm_dir: str = registered.shm_dir or "/dev/shm"
        self.inline_limit: int = registered.inline_limit_bytes  # 0: an agent that takes every plan inline
        self.allocator = ShmAllocator(self)
        # A job that commits itself, on several nodes: commits are told through its store (relay).
        self.relay = CommitRelay(
            signals, lambda step, save, error="": self.client.notice_commit(self.run_url, step, save, error),
            tell_persisted=lambda step, save, error: self.client.notice_persisted(self.run_url, step, save, error),
            timeout_s=config.commit_timeout_s) if signals is not None else None

    # -- the Sink interface --------------------------------------------------------------------

    def host_pool(self, budget_bytes: int, *, pin_memory: bool) -> HostBufferPool:
        return HostBufferPool(budget_bytes, pin_memory=pin_memory, allocator=self.allocator)

    def submit(self, job: PersistJob) -> None:
        if self.closed:
            raise CkptError("the sink is closed")
        if job.slab is None or job.slab.handle is None:
            raise CkptError("an agent sink persists only snapshots staged into its own host pool")
        segment = job.slab.handle
        try:
            plan_json = encode_plan(job.plan, job.slab.buffer)
            with self._lock:
                self._jobs[(job.step, job.save_id)] = job
                self._held[segment] = job
            if self.relay is not None and len(job.writers) > 1:
                if job.committer:
                    self.relay.expect_persisted(job.step, job.save_id, job.writers)
                else:
                    self.relay.expect(job.step, job.save_id)
            self.client.announce(pb.AnnounceStagedRequest(
                session_id=self.session_id, segment=segment, step=job.step, save_id=job.save_id,
                writers=list(job.writers), committer=job.committer, plan_json=plan_json),
                inline_limit=self.inline_limit)
        except BaseException as e:  # noqa: BLE001 - reported through the futures
            err = error_from_rpc(e, f"announcing step {job.step}") if isinstance(e, grpc.RpcError) else e
            with self._lock:
                self._jobs.pop((job.step, job.save_id), None)
                self._held.pop(segment, None)
            self._tell_persisted(job, f"{type(err).__name__}: {err}")
            self._fail(job, err)
            job.release()

    def restore_source(self, storage: Storage, *, holders: Mapping[str, Sequence[str]] | None = None,
                       step: int | None = None) -> RestoreSource:
        """Agent memory (this node's snapshots; replicas and snapshots fetched from the ring's
        other agents count as the peer tier) above storage. The listing streams, with each
        snapshot's chunk index (what a restore reads of it; by reference if large); an agent
        that cannot be listed makes a restore from storage that says why. The ring is asked
        only for the writers the restore reads and this node does not hold; with ``holders``
        (writer -> the addresses of the agents holding its snapshot), only their holders.
        ``step``: only that step's snapshots are listed (a restore of a known step), and only when
        something is read that the agent's table of that step does not serve (the agent has one
        when it holds every array of the step whole: :mod:`agent.trainer.table`)."""
        bottom = StorageSource(storage)
        if step is not None:  # a known step: the agent's one table of it, if it holds it whole
            table = self.client.step_table(self.run_url, step)
            if table is not None:
                try:
                    return TableSource(bottom, table, self.shm_dir, lambda: self._listed(bottom, holders, step))
                except (TableError, ValueError) as e:
                    log.warning("the agent's table of step %d is unusable (%s): listing its snapshots", step, e)
        return self._listed(bottom, holders, step)

    def _listed(self, bottom: StorageSource, holders: Mapping[str, Sequence[str]] | None,
                step: int | None) -> RestoreSource:
        """The restore source from the agent's listing (of ``step``'s snapshots, if given)."""
        c = self.client
        steps = () if step is None else (step,)
        try:
            snaps = list(c.stream_snapshots(self.run_url, documents=_RESTORE_DOCUMENTS, steps=steps))
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                reason = (FallbackReason.UNREACHABLE if e.code() in (grpc.StatusCode.UNAVAILABLE,
                                                                     grpc.StatusCode.DEADLINE_EXCEEDED)
                          else FallbackReason.LISTING_FAILED)
                return AgentMemoryStorage(bottom, [], self.shm_dir, unavailable=(
                    reason, f"cannot list the node agent's snapshots: {e.code()}: {e.details()}"))
            snaps = c.list_snapshots(self.run_url, with_plans=True)  # an agent older than the stream
        return AgentMemoryStorage(
            bottom, snaps, self.shm_dir, document=c.document,
            fetch=lambda info: c.fetch_snapshot(info, documents=_RESTORE_DOCUMENTS),
            list_peers=lambda writers: self._list_peers(writers, holders, steps))

    def _list_peers(self, writers: set[str] | None, holders: Mapping[str, Sequence[str]] | None,
                    steps: Sequence[int] = ()) -> list[pb.SnapshotInfo]:
        """What the ring holds of ``writers`` (None: not known, every writer), asked of their
        holders where ``holders`` names them (none named: nobody is asked)."""
        peers: list[str] = []
        if holders is not None:
            peers = sorted({a for w in (holders if writers is None else writers) for a in holders.get(w, ())})
            if not peers:
                return []
        return list(self.client.stream_snapshots(self.run_url, documents=_RESTORE_DOCUMENTS, include_peers=True,
                                                 peers=peers, writers=sorted(writers or ()), steps=steps))

    def close(self, *, wait: bool = True) -> None:
        if self.closed:
            return
        if wait:
            with self._lock:
                futures = [j.committed for j in self._jobs.values()]
            for f in futures:
                try:
                    f.result()
                except BaseException:  # noqa: BLE001 - reported through the handle
                    pass
        self.closed = True
        if self.relay is not None:
            self.relay.close()
        self._call.cancel()  # ends the session: the agent frees the segments it holds nothing in
        self._events.join(timeout=10)
        with self._lock:
            jobs = list(self._jobs.values())
            self._jobs.clear()
        for j in jobs:
            self._fail(j, CkptError(f"step {j.step}: the sink was closed before the agent reported the commit"))
        with self._lock:
            held = list(self._held.values())
            self._held.clear()
        for j in held:  # the agent keeps its segment; this process's copy is no longer needed
            j.release()
        self.allocator.close()
        self.client.close()

    # -- events --------------------------------------------------------------------------------

    def _event_loop(self, first: Future) -> None:
        doc: Assembly | None = None  # a document arriving in pieces, for the next snapshot event
        try:
            for ev in self._call:
                kind = ev.WhichOneof("event")
                if kind == "registered":
                    first.set_result(ev.registered)
                elif kind == "piece":
                    try:
                        if doc is None or doc.done:
                            doc = Assembly(ev.piece.kind, MAX_DOCUMENT_BYTES)
                        doc.add(ev.piece)
                    except DocumentError as e:  # the event it belongs to fails its job
                        log.error("a document from the node agent is malformed: %s", e)
                        doc = None
                elif kind == "snapshot":
                    self._on_snapshot(ev.snapshot, doc)
                    doc = None
                elif kind == "released":
                    with self._lock:
                        job = self._held.pop(ev.released.segment, None)
                    if job is not None:
                        job.release()
        except grpc.RpcError as e:
            if not first.done():
                first.set_exception(error_from_rpc(e, "registering with the node agent"))
            if self.closed:
                return
            err = error_from_rpc(e, "the node agent's session ended")
            log.error("%s", err)
            with self._lock:
                jobs = list(self._jobs.values())
                self._jobs.clear()
                held = list(self._held.values())
                self._held.clear()
            for j in jobs:
                self._fail(j, err)
            # The agent that held these slabs is gone and will never release them: without
            # this, the next save would wait for host memory forever.
            for j in held:
                j.release()
        except BaseException as e:  # noqa: BLE001
            if not first.done():
                first.set_exception(e)
            log.exception("agent event loop failed")

    def _on_snapshot(self, ev: pb.SnapshotEvent, pieces: Assembly | None) -> None:
        with self._lock:
            job = self._jobs.get((ev.step, ev.save_id))
        if job is None:
            return
        state = PB_TO_STATE.get(ev.state)
        try:
            document = ev.document_json
            if ev.document_bytes:  # it came in the pieces before the event
                data = pieces.data() if pieces is not None and pieces.done else b""
                if len(data) != ev.document_bytes:
                    raise CkptError(f"step {ev.step}: the node agent's {state} event lacks its document")
                document = data.decode()
            if state == SnapshotState.PERSISTED:
                frag = Fragment.from_dict(json.loads(document)) if document else None
                if not job.persisted.done():
                    self._tell_persisted(job)
                    job.persisted.set_result(frag)
            elif state == SnapshotState.COMMITTED:
                manifest = Manifest.from_dict(json.loads(document))
                if not job.persisted.done():
                    job.persisted.set_result(None)
                with self._lock:
                    self._jobs.pop((ev.step, ev.save_id), None)
                if not job.committed.done():
                    job.committed.set_result(manifest)
                self._tell_writers(job)
                self._run_after_commit(job, manifest)
            elif state == SnapshotState.FAILED:
                with self._lock:
                    self._jobs.pop((ev.step, ev.save_id), None)
                if not job.persisted.done():
                    self._tell_persisted(job, ev.error or "failed")
                self._tell_writers(job, ev.error or "failed")
                self._fail(job, CkptError(f"step {ev.step}: the node agent reports: {ev.error}"))
        except Exception as e:  # noqa: BLE001 - a malformed document fails the job, not the loop
            self._fail(job, e)

    def _tell_persisted(self, job: PersistJob, error: str | None = None) -> None:
        """Every trainer: the committer's trainer hears that this writer persisted, or failed (relay)."""
        if self.relay is not None and len(job.writers) > 1:
            self.relay.persisted(job.save_id, error)

    def _tell_writers(self, job: PersistJob, error: str | None = None) -> None:
        """The committer's trainer: the other writers' trainers hear how the save ended (relay)."""
        if self.relay is not None and job.committer and len(job.writers) > 1:
            self.relay.ended(job.save_id, job.writers, error)

    @staticmethod
    def _fail(job: PersistJob, error: BaseException) -> None:
        for fut in (job.persisted, job.committed):
            if not fut.done():
                fut.set_exception(error)


def open_agent_sink(address: str, **kwargs: Any) -> AgentSink:
    """The ``agent`` entry point of the ``ckpt.sinks`` group."""
    return AgentSink(address, **kwargs)
