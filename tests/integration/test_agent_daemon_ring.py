"""Real ``ckpt-agent`` daemons of a ring (loopback TCP, a token) and real trainer processes: a
staged snapshot replicated to the next agent survives its node's loss, and a trainer on a
replacement node restores from the peer that holds its snapshot. As in ``test_agent_daemon``,
every daemon and trainer is a subprocess started and ended by the test, and no segment is left.
"""

from __future__ import annotations

import json
import shutil
import textwrap
import time

import grpc
import torch

import ckpt
from agent.pb import pb
from ckpt.testing.net import free_ports

from .test_agent_daemon import (  # noqa: F401 - agents: the fixture that starts and stops node agents
    RESTORER,
    SHM,
    TRAINER,
    AgentProc,
    _code,
    _expected_state,
    _trainer,
    _wait_line,
    agents,
    pytestmark,
)


def test_three_agents_replicate_and_one_lost_node_loses_no_staged_snapshot(agents, tmp_path):  # noqa: F811
    ports = free_ports(3)
    ring = ",".join(f"127.0.0.1:{p}" for p in ports)

    def start(i: int, name: str) -> AgentProc:
        return agents.start(name, "--memory-budget", "128MiB", "--peer-listen", f"127.0.0.1:{ports[i]}",
                            "--peers", ring, "--replicas", "1", "--peer-dead-after", "1")

    a, b, c = start(0, "a"), start(1, "b"), start(2, "c")
    run = tmp_path / "run"
    gate = tmp_path / "gate"
    common = dict(RUN=str(run), STEP="5", WORLD="2", STORE=str(tmp_path / "store"))
    # rank 0 (the committer) trains on node a, rank 1 on node b; a is lost after rank 0 staged.
    r0 = _trainer(tmp_path, "rank0", TRAINER, RANK="0", AGENT=a.address, HANG_AFTER_STAGED="1", **common)
    r1 = _trainer(tmp_path, "rank1", TRAINER, RANK="1", AGENT=b.address, GATE=str(gate), **common)
    try:
        _wait_line(r0, "STAGED")
        with b.client() as cb:  # a's successor in the ring holds the replica
            deadline = time.monotonic() + 60
            while not any(s.replica and s.key.writer == "rank00000" for s in cb.list_snapshots(f"file://{run}")):
                assert time.monotonic() < deadline, b.logs()
                time.sleep(0.05)
        a.kill()  # the node is lost: its agent and its trainer
        r0.kill()
        r0.wait()
        gate.touch()
        _wait_line(r1, "COMMITTED")  # committed by b, on behalf of the lost committer
        assert r1.wait(60) == 0
    finally:
        for p in (r0, r1):
            if p.poll() is None:
                p.kill()
                p.wait()
    manifest = ckpt.read_manifest(ckpt.open_storage(str(run)), 5)
    assert manifest.writers == ("rank00000", "rank00001")
    loaded = {k: torch.zeros_like(v) for k, v in _expected_state().items()} | {"note": ""}
    ckpt.load(loaded, str(run), step=5)
    assert all(torch.equal(loaded[k], v) for k, v in _expected_state().items())
    with b.client() as cb:
        held = {(s.key.writer, s.replica): s.state for s in cb.list_snapshots(f"file://{run}")}
    assert held == {("rank00000", True): pb.SNAPSHOT_STATE_COMMITTED, ("rank00001", False): pb.SNAPSHOT_STATE_COMMITTED}
    with c.client() as cc:  # b's successor got rank 1's replica
        assert [(s.key.writer, s.replica) for s in cc.list_snapshots(f"file://{run}")] == [("rank00001", True)]

    # A trainer restarted on node b restores the whole step from b's memory (its own shard and
    # the replica of the lost node's), with the run's files gone from storage.
    shutil.move(str(run), str(tmp_path / "run.moved"))
    run.mkdir()
    r = _trainer(tmp_path, "restorer", RESTORER, RUN=str(run), AGENT=b.address)
    out, err = r.communicate(timeout=120)
    assert r.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == {"start": 6, "ok": True, "in_memory": [5]}

    for x in (b, c):
        assert x.terminate() == 0
    assert a.segments() != []  # the lost agent left its segments; the node's next agent removes them
    restarted = start(0, "a-restarted")
    assert restarted.segments() == []


PEER_RESTORER = textwrap.dedent('''
    import os, json
    import torch
    import ckpt
    url, address = os.environ["RUN"], os.environ["AGENT"]
    g = torch.Generator().manual_seed(1234)
    expected = {f"w{i}": torch.randn(64 + i, 96, generator=g) for i in range(6)}
    state = {k: torch.zeros_like(v) for k, v in expected.items()} | {"note": ""}
    c = ckpt.Checkpointer(url, agent=address)
    mem = c.sink.restore_source(c.storage)
    c._restore_source = lambda step=None: mem  # to read what each tier served
    start = c.restore(state)
    ok = all(torch.equal(state[k], expected[k]) for k in expected) and state["note"] == "hello"
    print(json.dumps({"start": start, "ok": ok, "fetched": mem.fetched_bytes, "served": mem.served_bytes}),
          flush=True)
    c.close()
''')


def test_trainer_on_a_replacement_node_restores_from_the_peer_holding_its_snapshot(agents, tmp_path):  # noqa: F811
    """Node a is lost after its trainer's step committed; a new agent takes its place in the
    ring, and the restarted trainer there restores from the replica held by a's successor b,
    copied once over the network into the new agent's memory. Every chunk file of the step is
    gone from storage, so an exact restore proves the bytes came from the peer."""
    ports = free_ports(3)
    ring = ",".join(f"127.0.0.1:{p}" for p in ports)

    def start(i: int, name: str, *extra: str) -> AgentProc:
        return agents.start(name, "--memory-budget", "128MiB", "--peer-listen", f"127.0.0.1:{ports[i]}",
                            "--peers", ring, "--replicas", "1", *extra)

    a, b, _c = start(0, "a"), start(1, "b"), start(2, "c")
    run = tmp_path / "run"
    url = f"file://{run}"
    t = _trainer(tmp_path, "trainer", TRAINER, RANK="0", WORLD="1", STEP="5", RUN=str(run), AGENT=a.address)
    _wait_line(t, "COMMITTED")
    assert t.wait(60) == 0
    with b.client() as cb:  # the replica on a's successor learns of the commit
        deadline = time.monotonic() + 60
        while not any(s.replica and s.state == pb.SNAPSHOT_STATE_COMMITTED for s in cb.list_snapshots(url)):
            assert time.monotonic() < deadline, b.logs()
            time.sleep(0.05)
    nbytes = next(s.nbytes for s in b.client().list_snapshots(url) if s.replica)
    a.kill()  # node a is lost with everything in its memory
    sdir = run / ckpt.format.step_dir(5)
    # every file of tensor data: chunk files, packs, or (the trainer consolidated its last step) shards
    chunks = [p for p in sdir.rglob("*") if p.is_file() and p.name != "zarr.json" and ".fragments" not in p.parts]
    assert chunks
    for p in chunks:
        p.unlink()
    a2 = start(0, "a-replacement")  # its place in the ring; nothing of the run in its memory
    with a2.client() as c2:
        assert c2.list_snapshots(url) == []
        listed = c2.list_snapshots(url, with_plans=True, include_peers=True)
        assert [(s.key.writer, s.key.step, s.peer_address) for s in listed] == [("rank00000", 5, f"127.0.0.1:{ports[1]}")]
        # only agents of its ring are ever dialled
        bad = pb.SnapshotInfo()
        bad.CopyFrom(listed[0])
        bad.peer_address = "127.0.0.1:9"
        assert _code(lambda: c2.fetch_snapshot(bad)) == grpc.StatusCode.INVALID_ARGUMENT
        bad.peer_address = listed[0].peer_address
        bad.save_id = "not-this-save"
        assert _code(lambda: c2.fetch_snapshot(bad)) == grpc.StatusCode.FAILED_PRECONDITION

    r = _trainer(tmp_path, "restorer", PEER_RESTORER, RUN=str(run), AGENT=a2.address)
    out, err = r.communicate(timeout=120)
    assert r.returncode == 0, err
    got = json.loads(out.strip().splitlines()[-1])
    assert got == {"start": 6, "ok": True, "fetched": nbytes, "served": got["served"]} and got["served"] > 0
    with a2.client() as c2:  # now held here: a second restore on this node reads local memory
        held = c2.list_snapshots(url)
        assert [(s.key.writer, s.replica, s.state) for s in held] == [("rank00000", True, pb.SNAPSHOT_STATE_COMMITTED)]
        metrics = c2.status()
    assert metrics.used_bytes >= nbytes
    r = _trainer(tmp_path, "restorer2", PEER_RESTORER, RUN=str(run), AGENT=a2.address)
    out, err = r.communicate(timeout=120)
    assert r.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1])["fetched"] == 0

    # an operator whose storage outruns the peer network turns the peer tier off
    assert a2.terminate() == 0
    a3 = start(0, "a-no-peers", "--no-restore-from-peers")
    with a3.client() as c3:
        assert c3.list_snapshots(url, include_peers=True) == []
    # an agent that serves no ring cannot fetch
    lone = agents.start("lone", "--memory-budget", "8MiB")
    with lone.client() as cl:
        assert _code(lambda: cl.fetch_snapshot(listed[0])) == grpc.StatusCode.UNAVAILABLE
