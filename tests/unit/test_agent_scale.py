"""The agent at real shapes, in process: no message outgrows the gRPC limit whatever the arrays
and snapshots (listings stream, documents over the inline limit go by reference or in pieces:
announce, replication, session events, fetch), a trainer that goes away while its announce is
being decoded leaves its snapshot held, and a tier that falls back says so (the restore's record
on the trainer side, a counter on the agent side).

The agents run with a 1 MiB message limit and a 64 KiB inline limit, so that a few thousand
arrays make plans larger than a message.
"""

from __future__ import annotations

import json
import threading
import time
from unittest import mock

import grpc
import pytest
import torch

import ckpt
from agent.config import AgentConfig
from agent.pb import pb
from agent.trainer.client import AgentClient
from ckpt.restore import FallbackReason, Tier
from tests.helpers import local_agent

LIMIT, INLINE = 1 << 20, 64 << 10
SMALL = {"max_message_bytes": LIMIT, "inline_document_bytes": INLINE, "stream_chunk_bytes": 256 << 10}
ALL_DOCUMENTS = [pb.DOCUMENT_KIND_PLAN, pb.DOCUMENT_KIND_FRAGMENT, pb.DOCUMENT_KIND_COMMIT_POINT,
                 pb.DOCUMENT_KIND_CHUNK_INDEX]


def _state(arrays: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.attention.wq.weight": torch.randn(2, 3, generator=g) for i in range(arrays)}


def _save(address: str, run, state, step: int = 1) -> None:
    with ckpt.Checkpointer(str(run), agent=address, keep_last=None) as c:
        c.save(step, state, force=True).result(300)


def _restore(address: str, run, state) -> tuple[dict[str, torch.Tensor], ckpt.restore.RestoreReport]:
    dest = {k: torch.zeros_like(v) for k, v in state.items()}
    with ckpt.Checkpointer(str(run), agent=address, keep_last=None) as c:
        assert c.restore(dest) is not None
        report = c.last_restore
    assert all(torch.equal(dest[k], v) for k, v in state.items())
    return dest, report


def _counter(daemon, reason: str) -> float:
    return daemon.agent.metrics.restore_fallbacks.labels(reason)._value.get()


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code()


def test_listings_stream_and_documents_over_the_inline_limit_go_by_reference(tmp_path):
    with local_agent(tmp_path, "scalelist", memory_budget_bytes=256 << 20, **SMALL) as (daemon, _):
        addr = f"unix://{tmp_path / 'a.sock'}"
        runs = {f"r{i}": _state(1500, seed=i) for i in range(4)}
        runs["big"] = _state(7000, seed=9)  # its plan alone is larger than a message
        for name, state in runs.items():
            _save(addr, tmp_path / name, state)  # the plan goes in pieces, the commit's manifest too
        with AgentClient(addr) as c:
            infos = list(c.stream_snapshots("", documents=ALL_DOCUMENTS))
            assert sorted(i.key.run_url.rsplit("/", 1)[1] for i in infos) == sorted(runs)
            assert all(i.ByteSize() < LIMIT for i in infos)
            documents = {(i.key.run_url, r.kind): r.nbytes for i in infos for r in i.by_reference}
            assert sum(documents.values()) > 4 * LIMIT  # what one listing would have carried
            big_url = next(i.key.run_url for i in infos if i.key.run_url.endswith("/big"))
            assert documents[(big_url, pb.DOCUMENT_KIND_PLAN)] > LIMIT
            assert all(i.writer_count == 1 and not i.writers for i in infos)
            # read back whole, every document is the one the agent holds
            whole = {i.key.run_url: i for i in c.list_snapshots("", with_plans=True)}
            big = whole[big_url]
            assert len(json.loads(big.plan_json)["arrays"]) == 7000 and list(big.writers) == ["rank00000"]
            held = daemon.agent.find(big_url, "rank00000", 1)
            assert big.plan_json == held.plan_json and big.commit_point == held.commit_point
            info = next(i for i in infos if i.key.run_url == big_url)
            index = c.read_document(info, pb.DOCUMENT_KIND_CHUNK_INDEX)
            assert len(json.loads(index)["spans"]) == 7000 and len(index) < len(big.plan_json) / 4
            # the unary answers that cannot fit are refused, visibly, never cut short
            asked = pb.ListSnapshotsRequest(with_plans=True)
            assert _code(lambda: c.trainer.ListSnapshots(asked, timeout=30)) == grpc.StatusCode.RESOURCE_EXHAUSTED
            key = pb.GetSnapshotRequest(key=info.key)
            assert _code(lambda: c.trainer.GetSnapshot(key, timeout=30)) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert _counter(daemon, "answer_too_large") == 2
            assert len(c.trainer.ListSnapshots(pb.ListSnapshotsRequest(), timeout=30).snapshots) == 5
            assert c.get_snapshot(big_url, "rank00000", 1).plan_json == held.plan_json
        # the largest restores from agent memory, nothing from storage, nothing fell back
        _dest, report = _restore(addr, tmp_path / "big", runs["big"])
        assert report.served[Tier.STORAGE] == 0 and report.served[Tier.AGENT_MEMORY] == 7000 * 6 * 4
        assert report.fallbacks == ()


def test_replicas_and_peer_fetches_carry_large_plans_in_pieces(tmp_path):
    from agent.daemon import AgentDaemon

    shm = tmp_path / "shm"
    shm.mkdir()

    def daemon(name: str) -> AgentDaemon:
        d = AgentDaemon(AgentConfig(socket_path=str(tmp_path / f"{name}.sock"), memory_budget_bytes=128 << 20,
                                    shm_dir=str(shm), shm_prefix=f"scale{name}", log_format="text", token="t",
                                    peer_listen="127.0.0.1:0", peer_dead_after_s=60, **SMALL))
        d.start()
        return d

    a, b, c = daemon("a"), daemon("b"), daemon("c")
    try:
        ring = [d.config.self_address for d in (a, b, c)]
        a.set_ring(ring, 1)
        b.set_ring(ring, 1)
        c.set_ring(ring, 1)
        state = _state(3000)  # a plan of ~0.7 MB: 11 times the inline limit
        run = tmp_path / "run"
        _save(f"unix://{tmp_path / 'a.sock'}", run, state)
        deadline = time.monotonic() + 60
        while not [s for s in b.agent.snapshots() if s.replica and s.state == ckpt.SnapshotState.COMMITTED]:
            assert time.monotonic() < deadline, "the replica did not arrive"
            time.sleep(0.05)
        (replica,) = b.agent.snapshots()
        assert replica.plan_json == a.agent.snapshots()[0].plan_json and len(replica.plan_json) > 8 * INLINE
        # b restores from its replica (the peer tier); c, holding nothing, fetches from the ring
        _dest, report = _restore(f"unix://{tmp_path / 'b.sock'}", run, state)
        assert report.served[Tier.PEER] == 3000 * 6 * 4 and report.served[Tier.STORAGE] == 0, report
        _dest, report = _restore(f"unix://{tmp_path / 'c.sock'}", run, state)
        assert report.served[Tier.PEER] == 3000 * 6 * 4 and report.served[Tier.STORAGE] == 0, report
        assert report.fallbacks == () and c.metrics.bytes_fetched._value.get() > 0
        assert not any(_counter(d, r) for d in (a, b, c) for r in ("peer_unreachable", "peer_fetch_failed"))
    finally:
        for d in (a, b, c):
            d.stop()


def test_a_peer_that_cannot_be_listed_is_a_fallback_with_a_counter_and_a_record(tmp_path):
    from agent.daemon import AgentDaemon

    shm = tmp_path / "shm"
    shm.mkdir()
    daemons = {}
    for name in ("a", "b"):
        daemons[name] = AgentDaemon(AgentConfig(
            socket_path=str(tmp_path / f"{name}.sock"), memory_budget_bytes=64 << 20, shm_dir=str(shm),
            shm_prefix=f"lost{name}", log_format="text", token="t", peer_listen="127.0.0.1:0", **SMALL))
        daemons[name].start()
    a, b = daemons["a"], daemons["b"]
    try:
        ring = [a.config.self_address, b.config.self_address]
        a.set_ring(ring, 0)
        b.set_ring(ring, 0)
        state = _state(200)
        run = tmp_path / "run"
        _save(f"unix://{tmp_path / 'a.sock'}", run, state)
        a.stop()  # the node holding the snapshot is lost
        _dest, report = _restore(f"unix://{tmp_path / 'b.sock'}", run, state)
        (fb,) = report.fallbacks
        assert (fb.tier, fb.reason) == (Tier.PEER, FallbackReason.LISTING_FAILED) and a.config.self_address in fb.detail
        assert fb.chunks == 200 and fb.read_instead == {Tier.STORAGE: report.served[Tier.STORAGE]} and fb.chunks
        assert report.served[Tier.AGENT_MEMORY] == report.served[Tier.PEER] == 0
        assert _counter(b, "peer_unreachable") == 1
    finally:
        for d in (a, b):
            d.stop()


def test_an_agent_unreachable_or_holding_nothing_is_a_fallback_logged_as_a_warning(tmp_path, caplog):
    state = _state(50)
    run = tmp_path / "run"
    ckpt.save(state, str(run), step=3)  # saved without the agent: it holds nothing of the run
    with local_agent(tmp_path, "scalenothing") as (daemon, _):
        addr = f"unix://{tmp_path / 'a.sock'}"
        with caplog.at_level("WARNING", logger="ckpt.restore"):
            _dest, report = _restore(addr, run, state)
        (fb,) = report.fallbacks
        assert (fb.tier, fb.reason, fb.chunks) == (Tier.AGENT_MEMORY, FallbackReason.NOT_HELD, 50)
        assert fb.read_instead == {Tier.STORAGE: report.served[Tier.STORAGE]} and report.served[Tier.STORAGE] > 0
        assert any("fell back (not held" in r.getMessage() for r in caplog.records)
        assert report.to_dict()["fallbacks"][0]["reason"] == "not held"
        dest = {k: torch.zeros_like(v) for k, v in state.items()}
        with ckpt.Checkpointer(str(run), agent=addr, keep_last=None) as c:
            daemon.stop()  # the agent goes away after the trainer opened it
            assert c.restore(dest) == 4
            (fb,) = c.last_restore.fallbacks
    assert (fb.tier, fb.reason) == (Tier.AGENT_MEMORY, FallbackReason.UNREACHABLE) and fb.chunks == 50
    assert all(torch.equal(dest[k], v) for k, v in state.items())


def test_a_trainer_gone_while_its_announce_is_decoded_leaves_its_snapshot_held(tmp_path):
    """The agent decodes a plan outside its lock (at real shapes that takes a while); a trainer
    killed meanwhile must not take the segment from under the snapshot it staged (the agent
    would persist from unmapped memory)."""
    from agent.daemon import holding
    from agent.daemon.core import Agent
    from agent.daemon.snapshot import PersistSettings
    from agent.plan import encode_plan
    from agent.shm import map_file

    cfg = AgentConfig(socket_path=str(tmp_path / "s"), memory_budget_bytes=1 << 20, shm_dir=str(tmp_path / "shm"),
                      shm_prefix="race", log_format="text")
    (tmp_path / "shm").mkdir()
    agent = Agent(cfg)
    run = f"file://{tmp_path / 'run'}"
    try:
        sess = agent.register(run, "rank00000", 1, PersistSettings(io_threads=1))
        seg = agent.lease(sess.id, 4096)
        mm, slab = map_file(f"{cfg.shm_dir}/{seg.name}", 4096, writable=True)
        slab[:64].copy_(torch.arange(16, dtype=torch.float32).view(torch.uint8))
        plan = ckpt.plan_save({"w": slab[:64].view(torch.float32)})
        text = encode_plan(plan, slab)
        decoding, resume = threading.Event(), threading.Event()
        real = holding.decode_plan

        def slow_decode(plan_json, buffer):
            decoding.set()
            assert resume.wait(30)
            return real(plan_json, buffer)

        with mock.patch.object(holding, "decode_plan", slow_decode):
            announced = []
            t = threading.Thread(target=lambda: announced.append(
                agent.announce(sess.id, seg.name, 1, "s1", ("rank00000",), True, text)))
            t.start()
            assert decoding.wait(30)
            agent.end_session(sess.id)  # the trainer is killed while its announce is decoded
            assert seg.tensor is not None and (tmp_path / "shm" / seg.name).exists()
            resume.set()
            t.join(30)
        (snap,) = announced
        assert snap.session is None and agent.find(run, "rank00000", 1) is snap
        deadline = time.monotonic() + 30
        while snap.state != ckpt.SnapshotState.COMMITTED:
            assert snap.state != ckpt.SnapshotState.FAILED and time.monotonic() < deadline, (snap.state, snap.error)
            time.sleep(0.02)
        out = {"w": torch.zeros(16)}
        ckpt.load(out, run)
        assert torch.equal(out["w"], torch.arange(16, dtype=torch.float32))
        del slab
        mm.close()
    finally:
        agent.close()
