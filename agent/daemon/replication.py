"""Peer replication: each agent streams its staged snapshots to the next ``replicas`` agents of
the ring, tells them when a snapshot is persisted and committed, and watches the origins of
the replicas it holds. When an origin stays unreachable for ``peer_dead_after_s`` (times its
successor's rank in the ring, so the first successor acts first) while one of its snapshots is
not yet persisted or committed, this agent persists it (and commits it, if the origin's trainer
was the committer). Takeover is idempotent: a fragment or commit point already in storage from
the same save is kept, never rewritten.

Restore from a peer: a trainer whose agent does not hold what it reads (a replacement node, a
reshard) asks its agent what the ring's other agents hold of the writers it reads
(``peer_snapshots``: only their holders where a coordinator names them; documents over the inline
limit by reference, read with ``peer_document``); what it reads is copied once into this agent's
memory (``fetch``) and served from there. Only the ring's agents are dialled, with its token.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ckpt import SnapshotState
from ckpt import format as fmt
from ckpt.manifest import MANIFEST_KEY

from ..config import AgentConfig
from ..documents import (
    INFO_FIELDS,
    MAX_DOCUMENT_BYTES,
    assemble,
    inline_document,
    kind_name,
    pieces,
    set_document,
    writers_from_wire,
    writers_to_wire,
)
from ..errors import AgentError, AgentNotFoundError, AgentStateError, InvalidRequestError, PeerError
from ..pb import pb, rpc
from ..plan import decode_plan
from ..wire import STATE_TO_PB
from .core import Agent
from .metrics import PEER_DOCUMENT_FAILED, PEER_FETCH_FAILED, PEER_UNREACHABLE
from .segments import Segment
from .snapshot import PersistSettings, Snapshot

_CONNECT_TIMEOUT_S = 2.0  # a peer not reachable this fast is skipped from a listing (a lost node)

log = logging.getLogger(__name__)


def peer_channel(address: str, config: AgentConfig) -> grpc.Channel:
    options = [("grpc.max_send_message_length", config.max_message_bytes),
               ("grpc.max_receive_message_length", config.max_message_bytes)]
    if config.tls:
        root = open(config.tls_ca, "rb").read() if config.tls_ca else None
        creds = grpc.ssl_channel_credentials(root_certificates=root)
        return grpc.secure_channel(address, creds, options=options)
    return grpc.insecure_channel(address, options=options)


class Replicator:
    def __init__(self, config: AgentConfig, agent: Agent) -> None:
        self.config = config
        self.agent = agent
        self._auth = (("authorization", f"Bearer {config.token}"),)
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="agent-replicate")
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._monitor_loop, name="agent-peer-monitor", daemon=True)
        self._monitor.start()
        self._fetching: dict[tuple[str, str, int], threading.Lock] = {}
        self._listings: dict[tuple, tuple[float, Future]] = {}  # (run, kinds, peer) -> (when, its listing)

    def channel(self, address: str) -> grpc.Channel:
        with self._lock:
            ch = self._channels.get(address)
            if ch is None:
                ch = self._channels[address] = peer_channel(address, self.config)
            return ch

    # -- sending -------------------------------------------------------------------------------

    def replicate(self, snap: Snapshot) -> None:
        for rank, peer in enumerate(self.config.ring_successors(), start=1):
            self._pool.submit(self._send, snap, peer, rank)

    def _parts(self, snap: Snapshot, rank: int) -> Iterator[pb.ReplicaPart]:
        s = snap.settings
        names, count = writers_to_wire(snap.writers)
        in_pieces = len(snap.plan_json) > self.config.inline_document_bytes
        yield pb.ReplicaPart(header=pb.ReplicaHeader(
            key=pb.SnapshotKey(run_url=snap.run_url, writer=snap.writer, step=snap.step), save_id=snap.save_id,
            writers=names, writer_count=count, committer=snap.committer,
            plan_json="" if in_pieces else snap.plan_json, plan_bytes=len(snap.plan_json) if in_pieces else 0,
            nbytes=snap.nbytes, origin_agent=self.config.agent_id, origin_address=self.config.self_address or "",
            retention=pb.Retention(keep_last=s.keep_last, keep_every=s.keep_every), durable=s.durable,
            commit_timeout_s=s.commit_timeout_s, library_versions=dict(s.library_versions), rank_in_ring=rank))
        if in_pieces:
            for piece in pieces(pb.DOCUMENT_KIND_PLAN, snap.plan_json, self.config.stream_chunk_bytes):
                yield pb.ReplicaPart(plan=piece)
        buf = snap.segment.tensor
        step = self.config.stream_chunk_bytes
        for a in range(0, snap.nbytes, step):
            b = min(snap.nbytes, a + step)
            yield pb.ReplicaPart(data=pb.SnapshotData(offset=a, data=buf[a:b].numpy().tobytes()))

    def _send(self, snap: Snapshot, peer: str, rank: int) -> None:
        try:
            stub = rpc.PeerServiceStub(self.channel(peer))
            stub.Replicate(self._parts(snap, rank), metadata=self._auth, timeout=self.config.peer_timeout_s * 10)
        except grpc.RpcError as e:
            self.agent.metrics.failures.labels("replicate").inc()
            log.warning("replication failed", extra={"fields": {"peer": peer, "step": snap.step, "writer": snap.writer,
                                                                "code": str(e.code()), "error": e.details()}})
            return
        self.agent.metrics.bytes_replicated.inc(snap.nbytes)
        self.agent.mark_replicated(snap, peer)
        # it got there while the bytes were in flight
        if snap.state in (SnapshotState.PERSISTED, SnapshotState.COMMITTED):
            self._notify_one(snap, peer)

    def notify(self, snap: Snapshot) -> None:
        for peer in list(snap.replicated_to):
            self._pool.submit(self._notify_one, snap, peer)

    def _notify_one(self, snap: Snapshot, peer: str) -> None:
        try:
            rpc.PeerServiceStub(self.channel(peer)).NotifySnapshotState(
                pb.NotifySnapshotStateRequest(key=pb.SnapshotKey(run_url=snap.run_url, writer=snap.writer,
                                                                 step=snap.step),
                                              save_id=snap.save_id, state=STATE_TO_PB[snap.state]),
                metadata=self._auth, timeout=self.config.peer_timeout_s)
        except grpc.RpcError as e:
            log.debug("notify %s failed: %s", peer, e)

    # -- watching origins ----------------------------------------------------------------------

    def origin_alive(self, address: str) -> bool:
        if not address:
            return False
        try:
            resp = health_pb2_grpc.HealthStub(self.channel(address)).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=min(2.0, self.config.peer_dead_after_s))
            return resp.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    def _monitor_loop(self) -> None:
        while not self._stop.wait(self.config.peer_check_interval_s):
            try:
                self.check_origins()
            except Exception:  # noqa: BLE001 - keep watching
                log.warning("peer monitor error", exc_info=True)

    def check_origins(self) -> None:
        now = time.monotonic()
        waiting = [s for s in self.agent.snapshots() if s.replica and not s.taken_over
                   and (s.state == SnapshotState.STAGED or (s.state == SnapshotState.PERSISTED and s.committer))]
        alive: dict[str, bool] = {}
        for s in waiting:
            if s.origin_address not in alive:
                alive[s.origin_address] = self.origin_alive(s.origin_address)
            if alive[s.origin_address]:
                s.origin_lost_since = None
                continue
            if s.origin_lost_since is None:
                s.origin_lost_since = now
            if now - s.origin_lost_since >= self.config.peer_dead_after_s * s.rank_in_ring:
                self.agent.take_over(s)

    # -- restore from a peer ----------------------------------------------------------------------

    def _ring_peer(self, peer: str) -> str:
        if not peer or peer == self.config.self_address or peer not in self.config.peers:
            raise InvalidRequestError(f"peer_address: {peer!r} is not another agent of this agent's ring")
        return peer

    def peer_snapshots(self, run_url: str, held: set[tuple[str, str, int, str]], kinds: list[int], *,
                       peers: Sequence[str] = (), writers: Sequence[str] = (),
                       steps: Sequence[int] = ()) -> Iterator[pb.SnapshotInfo]:
        """What the ring's other agents hold of ``run_url`` (with the documents ``kinds``, those
        over the inline limit by reference) that is not in ``held`` (``(run, writer, step,
        save_id)`` of this agent's snapshots); one entry per snapshot, from the first agent of the
        ring that lists it. An agent that cannot be listed (not reachable within 2 s, or failing)
        is one entry with only ``peer_address`` and ``error`` set, and counted. ``peers``: ask
        only these agents (the holders a directory names); ``writers``, ``steps``: only their snapshots.
        Each agent's listing is shared for ``RING_LISTING_TTL_S`` by the trainers of this node
        that restore together (16 ranks, each reading other writers: one call per holder)."""
        seen = set(held)
        wanted, at = set(writers), set(steps)
        for peer, listed in self._ring_listing(run_url, tuple(kinds), set(peers)):
            if isinstance(listed, str):
                yield pb.SnapshotInfo(peer_address=peer, error=listed)
                continue
            for shared in listed:
                k = (shared.key.run_url, shared.key.writer, shared.key.step, shared.save_id)
                if (shared.state == pb.SNAPSHOT_STATE_FAILED or shared.key.run_url != run_url or k in seen
                        or (wanted and shared.key.writer not in wanted) or (at and shared.key.step not in at)):
                    continue
                seen.add(k)
                info = pb.SnapshotInfo()
                info.CopyFrom(shared)
                info.peer_address = peer
                info.segment = ""  # a name on the peer's node, meaningless here
                yield info

    RING_LISTING_TTL_S = 2.0

    def _ring_listing(self, run_url: str, kinds: tuple[int, ...], only: set[str],
                      ) -> list[tuple[str, list[pb.SnapshotInfo] | str]]:
        """The listing of ``run_url`` by each other agent of the ring (``only`` those, if given),
        or why it could not be listed; each fetched once per ``RING_LISTING_TTL_S`` whoever asks
        (callers that ask while it is fetched wait for it)."""
        me = self.config.self_address
        peers = [p for p in self.config.peers if p != me and (not only or p in only)]
        now = time.monotonic()
        mine: list[tuple[str, Future]] = []
        futures: dict[str, Future] = {}
        with self._lock:
            self._listings = {k: v for k, v in self._listings.items() if now - v[0] < self.RING_LISTING_TTL_S}
            for p in peers:
                cached = self._listings.get((run_url, kinds, p))
                if cached is None:
                    cached = self._listings[(run_url, kinds, p)] = (now, Future())
                    mine.append((p, cached[1]))
                futures[p] = cached[1]
        if mine:
            try:
                listed = dict(self._list_ring(run_url, list(kinds), [p for p, _ in mine]))
                for p, fut in mine:
                    fut.set_result(listed[p])
            except BaseException as e:  # noqa: BLE001 - every waiter gets it
                with self._lock:
                    for p, _ in mine:
                        self._listings.pop((run_url, kinds, p), None)
                for _, fut in mine:
                    if not fut.done():
                        fut.set_exception(e)
        return [(p, futures[p].result()) for p in peers]

    def _list_ring(self, run_url: str, kinds: list[int],
                   peers: list[str]) -> list[tuple[str, list[pb.SnapshotInfo] | str]]:
        ready = [(p, grpc.channel_ready_future(self.channel(p))) for p in peers]
        deadline = time.monotonic() + _CONNECT_TIMEOUT_S
        request = pb.ListSnapshotsRequest(run_url=run_url, with_plans=bool(kinds), documents=kinds, by_reference=True)
        calls: list[tuple[str, object]] = []
        for peer, fut in ready:
            try:
                fut.result(timeout=max(0.0, deadline - time.monotonic()))
                calls.append((peer, rpc.PeerServiceStub(self.channel(peer)).StreamSnapshots(
                    request, metadata=self._auth, timeout=self.config.peer_timeout_s)))
            except grpc.FutureTimeoutError:
                fut.cancel()
                calls.append((peer, f"not reachable within {_CONNECT_TIMEOUT_S:.0f} s"))
        out: list[tuple[str, list[pb.SnapshotInfo] | str]] = []
        for peer, call in calls:
            try:
                if isinstance(call, str):
                    raise PeerError(call)
                out.append((peer, list(call)))
            except (grpc.RpcError, PeerError) as e:
                why = f"{e.code()}: {e.details()}" if isinstance(e, grpc.Call) else str(e)
                self.agent.metrics.restore_fallbacks.labels(PEER_UNREACHABLE).inc()
                log.warning("peer did not list its snapshots", extra={"fields": {"peer": peer, "error": why}})
                out.append((peer, f"peer agent {peer} did not list its snapshots: {why}"))
        return out

    def peer_document(self, peer: str, key: tuple[str, str, int], save_id: str,
                      kind: int) -> Iterator[pb.DocumentPiece]:
        """The pieces of a document of a snapshot the ring's agent ``peer`` holds."""
        run_url, writer, step = key
        stream = rpc.PeerServiceStub(self.channel(self._ring_peer(peer))).ReadDocument(
            pb.ReadDocumentRequest(key=pb.SnapshotKey(run_url=run_url, writer=writer, step=step), save_id=save_id,
                                   kind=kind), metadata=self._auth, timeout=self.config.peer_timeout_s)
        try:
            yield from stream
        except grpc.RpcError as e:
            self.agent.metrics.restore_fallbacks.labels(PEER_DOCUMENT_FAILED).inc()
            raise PeerError(f"reading the {kind_name(kind)} of step {step} of {writer} from peer {peer} failed: "
                            f"{e.code()} {e.details()}") from None

    def resolve(self, info: pb.SnapshotInfo) -> None:
        """Read what a peer's listing ``info`` left out by reference into it."""
        key = (info.key.run_url, info.key.writer, info.key.step)
        for ref in list(info.by_reference):
            if ref.kind in INFO_FIELDS:
                data = assemble(self.peer_document(info.peer_address, key, info.save_id, ref.kind), ref.kind,
                                MAX_DOCUMENT_BYTES)
                set_document(info, ref.kind, data)
        del info.by_reference[:]
        if info.writer_count:
            info.writers[:] = writers_from_wire([], info.writer_count)
            info.writer_count = 0

    def fetch(self, run_url: str, writer: str, step: int, save_id: str, peer: str) -> Snapshot:
        """Copy the snapshot ``(run_url, writer, step)`` of save ``save_id`` from the ring's agent
        ``peer`` into this agent's memory; returns it (already held: at once). Only a snapshot
        whose step storage has committed from that very save is fetched: it is then final and
        is served like a committed replica, never persisted again from here."""
        self._ring_peer(peer)
        key = (run_url, writer, step)
        with self._lock:
            lock = self._fetching.setdefault(key, threading.Lock())
        try:
            return self._fetch_once(lock, key, save_id, peer)
        finally:
            with self._lock:
                if self._fetching.get(key) is lock and not lock.locked():
                    del self._fetching[key]

    def _fetch_once(self, lock: threading.Lock, key: tuple[str, str, int], save_id: str, peer: str) -> Snapshot:
        run_url, writer, step = key
        with lock:  # two trainers of this node restoring at once copy it once
            try:
                held = self.agent.find(*key)
                if held.save_id == save_id and held.state != SnapshotState.FAILED:
                    return held
            except AgentNotFoundError:
                pass
            storage = self.agent.storage(run_url)
            try:
                commit_point = storage.read(f"{fmt.step_dir(step)}/{fmt.META}")
                committed = json.loads(commit_point)["attributes"][MANIFEST_KEY]["save_id"]
            except FileNotFoundError:
                raise AgentNotFoundError(f"step {step} of {run_url} is not committed in storage") from None
            except (ValueError, KeyError, TypeError) as e:
                raise AgentStateError(f"the commit point of step {step} is unreadable: {e}") from None
            if committed != save_id:
                raise AgentStateError(f"step {step} is committed from save {committed}, not {save_id}")
            stub = rpc.PeerServiceStub(self.channel(peer))
            t0 = time.monotonic()
            try:
                listing = stub.StreamSnapshots(pb.ListSnapshotsRequest(
                    run_url=run_url, with_plans=True, by_reference=True,
                    documents=[pb.DOCUMENT_KIND_PLAN, pb.DOCUMENT_KIND_FRAGMENT]),
                    metadata=self._auth, timeout=self.config.peer_timeout_s)
                info = next((i for i in listing if (i.key.run_url, i.key.writer, i.key.step) == key
                             and i.save_id == save_id), None)
                listing.cancel()
            except grpc.RpcError as e:
                self.agent.metrics.restore_fallbacks.labels(PEER_FETCH_FAILED).inc()
                raise PeerError(f"peer {peer} did not list its snapshots: {e.code()} {e.details()}") from None
            if info is None:
                self.agent.metrics.restore_fallbacks.labels(PEER_FETCH_FAILED).inc()
                raise AgentNotFoundError(f"peer {peer} no longer holds step {step} of {writer} (save {save_id})")
            if not 0 < info.nbytes <= self.config.memory_budget_bytes:
                raise PeerError(f"peer {peer} lists a snapshot of {info.nbytes} bytes")
            info.peer_address = peer
            self.resolve(info)
            if inline_document(info, pb.DOCUMENT_KIND_PLAN) is None:
                raise PeerError(f"peer {peer} lists step {step} of {writer} without its plan")

            def fill(seg: Segment) -> Snapshot:
                buf = seg.tensor.numpy()
                pos = 0
                stream = stub.ReadSnapshot(pb.ReadSnapshotRequest(key=info.key, save_id=save_id),
                                           metadata=self._auth, timeout=self.config.peer_timeout_s * 10)
                try:
                    for d in stream:
                        if d.offset != pos or pos + len(d.data) > info.nbytes:
                            raise PeerError(f"peer {peer} sent bytes at {d.offset} (+{len(d.data)}), "
                                            f"expected {pos} of {info.nbytes}")
                        buf[pos: pos + len(d.data)] = memoryview(d.data)
                        pos += len(d.data)
                except grpc.RpcError as e:
                    raise PeerError(f"reading from peer {peer} failed: {e.code()} {e.details()}") from None
                if pos != info.nbytes:
                    raise PeerError(f"peer {peer} sent {pos} of {info.nbytes} bytes")
                return Snapshot(run_url, writer, step, save_id, tuple(info.writers), info.committer, info.plan_json,
                                decode_plan(info.plan_json, seg.tensor), seg, PersistSettings(), replica=True,
                                origin_agent=info.origin_agent or peer, origin_address=peer,
                                state=SnapshotState.COMMITTED, fragment_json=info.fragment_json,
                                commit_point=commit_point)

            try:
                snap = self.agent.receive_replica(info.nbytes, fill)
            except AgentError:
                self.agent.metrics.restore_fallbacks.labels(PEER_FETCH_FAILED).inc()
                raise
        self.agent.metrics.bytes_fetched.inc(info.nbytes)
        log.info("snapshot fetched from a peer", extra={"fields": {
            "run": run_url, "writer": writer, "step": step, "peer": peer, "bytes": info.nbytes,
            "seconds": round(time.monotonic() - t0, 3)}})
        return snap

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()
