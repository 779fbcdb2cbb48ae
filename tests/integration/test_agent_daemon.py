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
