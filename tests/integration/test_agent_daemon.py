"""Real ``ckpt-agent`` daemons on Unix sockets and loopback TCP, real trainer processes.

Every daemon and trainer is a subprocess started and ended by the test; each test's agents use
their own shared-memory prefix, and the test asserts none of their segments is left behind.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import pytest
import torch

import ckpt
from agent.pb import pb, rpc
from agent.trainer.client import AgentClient

REPO = Path(__file__).resolve().parents[2]
SHM = "/dev/shm"
pytestmark = pytest.mark.skipif(not os.path.isdir(SHM) or not sys.platform.startswith("linux"),
                                reason="needs Linux POSIX shared memory")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


class AgentProc:
    """One ``ckpt-agent serve`` subprocess."""

    def __init__(self, tmp: Path, name: str, prefix: str, *extra: str) -> None:
        self.dir = tmp / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket = str(self.dir / "agent.sock")
        self.ready = self.dir / "ready.json"
        self.prefix = prefix
        self.log = open(self.dir / "agent.log", "wb")
        token = self.dir / "token"
        token.write_text("peer-token-of-this-test\n")
        if "--peer-listen" in extra:
            extra = (*extra, "--token-file", str(token))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "serve", "--socket", self.socket, "--shm-prefix", prefix,
             "--ready-file", str(self.ready), "--agent-id", name, "--log-format", "json", *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env=_env(), cwd=REPO)
        deadline = time.monotonic() + 60
        while not self.ready.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"agent {name} exited {self.proc.returncode}: {self.logs()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"agent {name} did not start: {self.logs()}")
            time.sleep(0.05)
        self.info = json.loads(self.ready.read_text())

    @property
    def address(self) -> str:
        return f"unix://{self.socket}"

    def client(self) -> AgentClient:
        return AgentClient(self.address)

    def logs(self) -> str:
        self.log.flush()
        return (self.dir / "agent.log").read_text(errors="replace")[-4000:]

    def segments(self) -> list[str]:
        return sorted(n for n in os.listdir(SHM) if n.startswith(self.prefix + "."))

    def terminate(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"agent did not stop on SIGTERM: {self.logs()}")
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def agents(tmp_path):
    """Start agents with ``agents.start(name, *flags)``; all are stopped and their segments
    checked at the end."""
    prefix = "t" + secrets.token_hex(4)
    started: list[AgentProc] = []

    class Agents:
        def start(self, name: str, *flags: str) -> AgentProc:
            a = AgentProc(tmp_path, name, prefix, *flags)
            started.append(a)
            return a

        prefix_ = prefix

    yield Agents()
    for a in started:
        if a.proc.poll() is None:
            a.terminate()
    leftovers = sorted(n for n in os.listdir(SHM) if n.startswith(prefix + "."))
    for n in leftovers:
        os.unlink(os.path.join(SHM, n))
    assert not leftovers, f"shared-memory segments left behind: {leftovers}"


TRAINER = textwrap.dedent('''
    import os, sys, time, json
    import torch, torch.distributed as dist
    import ckpt
    from agent.trainer.client import AgentClient

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD"])
    url, address, step = os.environ["RUN"], os.environ["AGENT"], int(os.environ["STEP"])
    if world > 1:
        dist.init_process_group("gloo", store=dist.FileStore(os.environ["STORE"], world), rank=rank, world_size=world)

    def state_of(seed):
        g = torch.Generator().manual_seed(seed)
        return {f"w{i}": torch.randn(64 + i, 96, generator=g) for i in range(6)} | {"note": "hello"}

    state = state_of(1234)
    c = ckpt.Checkpointer(url, agent=address, every_n_steps=1000, keep_last=None, commit_timeout_s=120)
    gate = os.environ.get("GATE")
    if gate:
        while not os.path.exists(gate):
            time.sleep(0.05)
    h = c.save(step, state, force=True)
    h.staged.result(60)
    # The agent acknowledged the announce once it lists the snapshot.
    cl = AgentClient(address)
    while True:
        try:
            cl.get_snapshot(c.storage.url, c.writer, step)
            break
        except Exception:
            time.sleep(0.02)
    print("STAGED", flush=True)
    if os.environ.get("HANG_AFTER_STAGED"):
        time.sleep(3600)
    h.result(120)
    print("COMMITTED", flush=True)
    c.close()
''')

RESTORER = textwrap.dedent('''
    import os, json
    import torch
    import ckpt
    url, address = os.environ["RUN"], os.environ["AGENT"]
    g = torch.Generator().manual_seed(1234)
    expected = {f"w{i}": torch.randn(64 + i, 96, generator=g) for i in range(6)}
    state = {k: torch.zeros_like(v) for k, v in expected.items()} | {"note": ""}
    c = ckpt.Checkpointer(url, agent=address)
    mem = c.sink.restore_source(c.storage)
    start = c.restore(state)
    ok = all(torch.equal(state[k], expected[k]) for k in expected) and state["note"] == "hello"
    print(json.dumps({"start": start, "ok": ok, "in_memory": mem.steps_in_memory}), flush=True)
    c.close()
''')


def _trainer(tmp: Path, name: str, script: str, **env: str) -> subprocess.Popen:
    path = tmp / f"{name}.py"
    path.write_text(script)
    return subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env() | env, cwd=REPO)


def _expected_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return {f"w{i}": torch.randn(64 + i, 96, generator=g) for i in range(6)}


def _wait_line(proc: subprocess.Popen, want: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"trainer exited before {want!r}: {proc.wait()} {proc.stderr.read()[-3000:]}")
        if line.strip() == want:
            return
    raise AssertionError(f"no {want!r} from the trainer")


def test_trainer_killed_after_staged_agent_persists_commits_and_serves_restore(agents, tmp_path):
    agent = agents.start("a0", "--memory-budget", "256MiB")
    run = tmp_path / "run"
    store = tmp_path / "store"
    gate = tmp_path / "gate"
    common = dict(RUN=str(run), AGENT=agent.address, STEP="10", WORLD="2", STORE=str(store))
    # rank 0 (the committer) stages and is killed before step 10 can be committed: rank 1 has
    # not saved yet, so the commit must come from the agent after the committer is gone.
    r0 = _trainer(tmp_path, "rank0", TRAINER, RANK="0", HANG_AFTER_STAGED="1", **common)
    r1 = _trainer(tmp_path, "rank1", TRAINER, RANK="1", GATE=str(gate), **common)
    try:
        _wait_line(r0, "STAGED")
        assert not (run / "000000000010" / "zarr.json").exists()
        r0.kill()
        r0.wait()
        gate.touch()
        _wait_line(r1, "COMMITTED")
        assert r1.wait(60) == 0, r1.stderr.read()
    finally:
        for p in (r0, r1):
            if p.poll() is None:
                p.kill()
                p.wait()
    # What landed in storage: a committed step 10 with both writers' fragments and the right values.
    manifest = ckpt.read_manifest(ckpt.open_storage(str(run)), 10)
    assert manifest.writers == ("rank00000", "rank00001")
    frags = sorted(p.name for p in (run / "000000000010" / ".fragments").iterdir())
    assert frags == ["rank00000.json", "rank00001.json"]
    loaded = {k: torch.zeros_like(v) for k, v in _expected_state().items()} | {"note": ""}
    ckpt.load(loaded, str(run), step=10)
    assert all(torch.equal(loaded[k], v) for k, v in _expected_state().items())
    # Both writers' snapshots are still held in the agent's memory, committed.
    with agent.client() as c:
        held = {(s.key.writer, s.key.step): s.state for s in c.list_snapshots(f"file://{run}")}
    assert held == {("rank00000", 10): pb.SNAPSHOT_STATE_COMMITTED, ("rank00001", 10): pb.SNAPSHOT_STATE_COMMITTED}

    # A trainer restarted on this node restores from the agent's memory: with the run's files
    # gone from storage, only the agent can provide them.
    shutil.move(str(run), str(tmp_path / "run.moved"))
    run.mkdir()
    r = _trainer(tmp_path, "restorer", RESTORER, RUN=str(run), AGENT=agent.address)
    out, err = r.communicate(timeout=120)
    assert r.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result == {"start": 11, "ok": True, "in_memory": [10]}

    assert agent.terminate() == 0
    assert agent.segments() == []
    assert not os.path.exists(agent.socket)


def test_sigterm_drains_held_snapshot_then_exits_clean(agents, tmp_path):
    agent = agents.start("a0", "--memory-budget", "128MiB")
    run = tmp_path / "run"
    t = _trainer(tmp_path, "trainer", TRAINER, RANK="0", WORLD="1", RUN=str(run), AGENT=agent.address, STEP="7",
                 HANG_AFTER_STAGED="1")
    try:
        _wait_line(t, "STAGED")
        assert agent.terminate() == 0
    finally:
        t.kill()
        t.wait()
    manifest = ckpt.read_manifest(ckpt.open_storage(str(run)), 7)
    assert manifest.writers == ("rank00000",)
    loaded = {k: torch.zeros_like(v) for k, v in _expected_state().items()} | {"note": ""}
    ckpt.load(loaded, str(run), step=7)
    assert all(torch.equal(loaded[k], v) for k, v in _expected_state().items())
    assert agent.segments() == []
    assert '"msg": "draining"' in agent.logs()


def test_killed_agent_segments_are_removed_by_the_next_agent(agents, tmp_path):
    a = agents.start("a0", "--memory-budget", "64MiB")
    with a.client() as c:
        events = c.register(pb.RegisterRequest(run_url=f"file://{tmp_path}/run", writer="rank00000"))
        sid = next(events).registered.session_id
        c.lease(sid, 1 << 20)
        c.lease(sid, 2 << 20)
        assert len(a.segments()) == 2
        a.kill()  # while the session is open: its segments are still leased
        events.cancel()
    assert len(a.segments()) == 2  # a crash leaves them behind
    b = agents.start("a1", "--memory-budget", "64MiB")
    assert b.segments() == []


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code()


def test_bad_requests_get_status_codes_and_the_daemon_keeps_serving(agents, tmp_path):
    a = agents.start("a0", "--memory-budget", "8MiB", "--peer-listen", "127.0.0.1:0")
    tok = (a.dir / "token")
    run = f"file://{tmp_path}/run"
    with a.client() as c:
        events = c.register(pb.RegisterRequest(run_url=run, writer="rank00000"))
        sid = next(events).registered.session_id
        t = c.trainer
        ann = lambda **kw: t.AnnounceStaged(pb.AnnounceStagedRequest(**({  # noqa: E731
            "session_id": sid, "segment": seg, "step": 1, "save_id": "s1", "writers": ["rank00000"],
            "committer": True, "plan_json": "{}"} | kw)), timeout=10)
        # unknown session / segment, before any lease (out of order)
        assert _code(lambda: c.lease("nope", 1024)) == grpc.StatusCode.NOT_FOUND
        seg = "ckptagent.1.x.1"
        assert _code(lambda: ann()) == grpc.StatusCode.FAILED_PRECONDITION
        # malformed
        assert _code(lambda: c.lease(sid, 0)) == grpc.StatusCode.INVALID_ARGUMENT
        seg = c.lease(sid, 1 << 20).segment
        assert _code(lambda: ann(plan_json="not json")) == grpc.StatusCode.INVALID_ARGUMENT
        bad_plan = json.dumps({"version": 1, "arrays": [], "metadata": [], "values": {},
                               "tensors": [[1 << 30, "float32", [4]]], "requests": []})
        assert _code(lambda: ann(plan_json=bad_plan)) == grpc.StatusCode.INVALID_ARGUMENT
        assert _code(lambda: ann(writers=["rank00001"])) == grpc.StatusCode.INVALID_ARGUMENT
        assert _code(lambda: ann(step=-1)) == grpc.StatusCode.INVALID_ARGUMENT
        assert _code(lambda: ann(plan_json="x" * (20 << 20))) == grpc.StatusCode.RESOURCE_EXHAUSTED  # oversized
        # over budget
        assert _code(lambda: c.lease(sid, 64 << 20)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        c.lease(sid, 6 << 20)
        assert _code(lambda: c.lease(sid, 2 << 20)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _code(lambda: c.get_snapshot(run, "rank00000", 3)) == grpc.StatusCode.NOT_FOUND
        # a peer with a wrong or no token
        ch = grpc.insecure_channel(f"127.0.0.1:{a.info['peer_port']}")
        peer = rpc.PeerServiceStub(ch)
        req = pb.ListSnapshotsRequest()
        assert _code(lambda: peer.ListSnapshots(req, timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda: peer.ListSnapshots(req, metadata=(("authorization", "Bearer wrong"),),
                                                timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
        assert peer.ListSnapshots(req, metadata=(("authorization", f"Bearer {tok.read_text().strip()}"),),
                                  timeout=10).snapshots == []
        ch.close()
        # still serving
        assert c.status().state == "serving"
        assert c.status().sessions == 1
        events.cancel()
    assert a.terminate() == 0


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_three_agents_replicate_and_one_lost_node_loses_no_staged_snapshot(agents, tmp_path):
    ports = _free_ports(3)
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


def test_trainer_on_a_replacement_node_restores_from_the_peer_holding_its_snapshot(agents, tmp_path):
    """Node a is lost after its trainer's step committed; a new agent takes its place in the
    ring, and the restarted trainer there restores from the replica held by a's successor b,
    copied once over the network into the new agent's memory. Every chunk file of the step is
    gone from storage, so an exact restore proves the bytes came from the peer."""
    ports = _free_ports(3)
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
