"""Agent pieces without processes: generated code, config, plan codec, servicer status codes."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import grpc
import pytest
import torch

import ckpt
from agent.config import AgentConfig
from agent.errors import AgentConfigError, PlanError
from agent.pb import pb
from agent.plan import decode_plan, encode_plan
from tests.helpers import local_agent

REPO = Path(__file__).resolve().parents[2]



def test_generated_code_matches_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    from agent.codegen import generate

    files = generate(tmp_path)
    assert files
    for f in files:
        rel = f.relative_to(tmp_path)
        assert filecmp.cmp(f, REPO / rel, shallow=False), f"{rel} is stale: run `python -m agent.codegen`"


def _agent_modules_loaded_by(*modules: str) -> list[str]:
    """The ``agent`` modules a fresh interpreter holds after importing ``modules``."""
    code = ("import importlib, json, sys\n"
            f"for name in {list(modules)!r}:\n    importlib.import_module(name)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'agent')))")
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": path})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_the_trainer_side_loads_nothing_of_the_daemon_side(tmp_path):
    """A trainer (``Checkpointer(agent=...)`` opens the shipped sink by its module path) loads
    no module of the daemon side, and the daemon none of the trainer side; together they
    still save, hold, commit and restore from the agent's memory."""
    from ckpt.sink import _SHIPPED_SINKS

    trainer = _agent_modules_loaded_by("agent.trainer", _SHIPPED_SINKS["agent"][0], "agent.sink")
    assert {"agent.trainer.sink", "agent.trainer.memory", "agent.trainer.client", "agent.wire"} <= set(trainer)
    assert [m for m in trainer if m == "agent.daemon" or m.startswith("agent.daemon.")] == []
    daemon = _agent_modules_loaded_by("agent.daemon")
    assert {"agent.daemon.core", "agent.daemon.servicers", "agent.wire"} <= set(daemon)
    assert [m for m in daemon if m == "agent.trainer" or m.startswith("agent.trainer.")] == []

    with local_agent(tmp_path, "sides") as (daemon_, _):
        state = {"w": torch.arange(5000, dtype=torch.float32), "n": 7}
        run, addr = str(tmp_path / "run"), f"unix://{tmp_path / 'a.sock'}"
        with ckpt.Checkpointer(run, agent=addr) as c:
            c.save(1, state, force=True).result(60)
        assert [(s.step, s.state) for s in daemon_.agent.snapshots()] == [(1, ckpt.SnapshotState.COMMITTED)]
        dest = {"w": torch.zeros(5000), "n": 0}
        with ckpt.Checkpointer(run, agent=addr) as c:
            assert c.sink.restore_source(c.storage).steps_in_memory == [1]
            assert c.restore(dest) == 2
        assert torch.equal(dest["w"], state["w"]) and dest["n"] == 7


def test_the_wire_maps_states_and_errors_both_ways():
    from agent.errors import AgentBudgetError, AgentDrainingError, AgentNotFoundError, SnapshotExistsError
    from agent.wire import PB_TO_STATE, STATE_TO_PB, error_from_rpc, status_of

    held = [ckpt.SnapshotState.STAGED, ckpt.SnapshotState.PERSISTED, ckpt.SnapshotState.COMMITTED,
            ckpt.SnapshotState.FAILED]
    assert sorted(STATE_TO_PB, key=held.index) == held  # captured and skipped never leave a trainer
    assert all(PB_TO_STATE[STATE_TO_PB[s]] is s for s in held)
    assert pb.SNAPSHOT_STATE_UNSPECIFIED not in PB_TO_STATE
    assert status_of(AgentNotFoundError("x")) == grpc.StatusCode.NOT_FOUND
    assert status_of(AgentDrainingError("x")) == grpc.StatusCode.UNAVAILABLE
    assert status_of(PlanError("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(KeyError("x")) == grpc.StatusCode.INTERNAL

    class Failed(grpc.RpcError, grpc.Call):  # what a stub raises, without a server
        def __init__(self, code):
            self._code = code

        def code(self):
            return self._code

        def details(self):
            return "why"

        def initial_metadata(self): ...
        def trailing_metadata(self): ...
        def is_active(self): ...
        def time_remaining(self): ...
        def cancel(self): ...
        def add_callback(self, callback): ...

    for error in (AgentBudgetError("x"), SnapshotExistsError("x")):
        back = error_from_rpc(Failed(status_of(error)), "saving")
        assert type(back) is type(error) and str(back) == "saving: why"
    assert isinstance(error_from_rpc(Failed(grpc.StatusCode.UNAVAILABLE), "saving"), ConnectionError)


def test_config_validation(tmp_path):
    sock = str(tmp_path / "a.sock")
    assert AgentConfig(socket_path=sock).peer_listen is None  # nothing on TCP by default
    with pytest.raises(AgentConfigError, match="loopback"):
        AgentConfig(socket_path=sock, peer_listen="0.0.0.0:7460", token="t")
    with pytest.raises(AgentConfigError, match="token"):
        AgentConfig(socket_path=sock, peer_listen="127.0.0.1:7460")
    with pytest.raises(AgentConfigError, match="replicas"):
        AgentConfig(socket_path=sock, peer_listen="127.0.0.1:1", token="t", peers=("127.0.0.1:1",), replicas=1)
    ring = ("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3")
    c = AgentConfig(socket_path=sock, peer_listen="127.0.0.1:2", token="t", peers=ring, replicas=2)
    assert c.ring_successors() == ["127.0.0.1:3", "127.0.0.1:1"]
    (tmp_path / "token").write_text("s3cret\n")
    (tmp_path / "agent.toml").write_text(
        f'[agent]\nsocket_path = "{sock}"\nmemory_budget = "2GiB"\ntoken_file = "{tmp_path / "token"}"\n'
        'peer_listen = "127.0.0.1:7460"\nsocket_mode = "0660"\n')
    c = AgentConfig.from_file(tmp_path / "agent.toml", replicas=None)
    assert (c.memory_budget_bytes, c.token, c.socket_mode) == (2 << 30, "s3cret", 0o660)
    (tmp_path / "bad.toml").write_text(f'socket_path = "{sock}"\nmemory_budgit = 1\n')
    with pytest.raises(AgentConfigError, match="memory_budgit"):
        AgentConfig.from_file(tmp_path / "bad.toml")


def _plan_and_slab():
    state = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5, dtype=torch.bfloat16),
             "n": 3}
    plan = ckpt.plan_save(state)
    slab = torch.zeros(1 << 16, dtype=torch.uint8)
    off = 0
    views = {}
    for r in plan.requests:
        if id(r.tensor) not in views:
            n = r.tensor.numel() * r.tensor.element_size()
            v = slab[off : off + n].view(r.tensor.dtype).view(r.tensor.shape)
            v.copy_(r.tensor)
            views[id(r.tensor)] = v
            off += 4096
    import dataclasses

    host = ckpt.SavePlan(plan.arrays, [dataclasses.replace(r, tensor=views[id(r.tensor)]) for r in plan.requests],
                         plan.metadata, plan.values, {"": "int"})  # as if the state's keys were ints
    return host, slab


def test_plan_round_trip_and_persist(tmp_path):
    plan, slab = _plan_and_slab()
    text = encode_plan(plan, slab)
    other = slab.clone()  # the agent's own mapping of the same bytes
    decoded = decode_plan(text, other)
    assert decoded.plan.values == plan.values and decoded.plan.containers == {"": "int"}
    assert [r.key for r in decoded.plan.requests] == [r.key for r in plan.requests]
    for a, b in zip(decoded.plan.requests, plan.requests):
        assert torch.equal(a.tensor, b.tensor) and a.tensor.data_ptr() != b.tensor.data_ptr()
    ckpt.write_plan(ckpt.open_storage(str(tmp_path)), decoded.plan, step=1, writer="rank00000", save_id="x")
    ckpt.commit(ckpt.open_storage(str(tmp_path)), 1, ["rank00000"], save_id="x")
    out = {"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.bfloat16), "n": 0}
    ckpt.load(out, str(tmp_path))
    assert torch.equal(out["a"], torch.arange(12, dtype=torch.float32).reshape(3, 4)) and out["n"] == 3


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d["tensors"][0].__setitem__(0, 1 << 40), "outside"),
    (lambda d: d["tensors"][0].__setitem__(1, "os.system"), "dtype"),
    (lambda d: d["requests"][0].__setitem__(0, "nope"), "not an array"),
    (lambda d: d["requests"][0].__setitem__(1, [99, 0]), "grid"),
    (lambda d: d["requests"].append(d["requests"][0]), "twice"),
    (lambda d: d.__setitem__("version", 7), "version"),
])
def test_malformed_plans_are_refused(mutate, match):
    plan, slab = _plan_and_slab()
    doc = json.loads(encode_plan(plan, slab))
    mutate(doc)
    with pytest.raises(PlanError, match=match):
        decode_plan(json.dumps(doc), slab)


@pytest.fixture
def servicer(tmp_path):
    from agent.daemon.core import Agent
    from agent.daemon.servicers import TrainerServicer

    cfg = AgentConfig(socket_path=str(tmp_path / "s"), memory_budget_bytes=1 << 20, shm_dir=str(tmp_path),
                      shm_prefix="unit")
    agent = Agent(cfg)
    yield TrainerServicer(agent), agent
    agent.close()
    assert os.listdir(tmp_path) == []


def _context():
    ctx = mock.create_autospec(grpc.ServicerContext, instance=True)
    ctx.code.return_value = None
    ctx.abort.side_effect = grpc.RpcError()
    return ctx


def test_servicer_status_codes(servicer):
    s, agent = servicer
    ctx = _context()
    with pytest.raises(grpc.RpcError):
        s.LeaseBuffer(pb.LeaseBufferRequest(session_id="none", nbytes=10), ctx)
    assert ctx.abort.call_args[0][0] == grpc.StatusCode.NOT_FOUND
    sess = agent.register("file:///r", "rank00000", 1, __import__("agent.daemon.snapshot").daemon.snapshot.PersistSettings())
    for req, code in [
        (pb.LeaseBufferRequest(session_id=sess.id, nbytes=0), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.LeaseBufferRequest(session_id=sess.id, nbytes=2 << 20), grpc.StatusCode.RESOURCE_EXHAUSTED),
    ]:
        ctx = _context()
        with pytest.raises(grpc.RpcError):
            s.LeaseBuffer(req, ctx)
        assert ctx.abort.call_args[0][0] == code
    seg = s.LeaseBuffer(pb.LeaseBufferRequest(session_id=sess.id, nbytes=4096), _context()).segment
    ctx = _context()
    with pytest.raises(grpc.RpcError):
        s.AnnounceStaged(pb.AnnounceStagedRequest(session_id=sess.id, segment=seg, step=1, save_id="x",
                                                  writers=["rank00000"], plan_json="{"), ctx)
    assert ctx.abort.call_args[0][0] == grpc.StatusCode.INVALID_ARGUMENT
    agent.end_session(sess.id)


def test_bad_request_log_is_one_line_rate_limited_without_traceback():
    import logging

    from agent.logs import BadRequestFilter

    now = [100.0]
    f = BadRequestFilter(interval_s=10.0, clock=lambda: now[0])

    def record(msg):
        try:
            raise ValueError("Error parsing message")
        except ValueError:
            import sys

            return logging.LogRecord("grpc._common", logging.ERROR, __file__, 1, msg, (), sys.exc_info())

    first = record("Exception deserializing request!")
    assert f.filter(first) and first.levelno == logging.WARNING and first.exc_info is None
    assert "malformed request refused" in first.getMessage()
    assert not any(f.filter(record("Exception deserializing request!")) for _ in range(50))  # a flood: dropped
    now[0] += 11
    later = record("Exception deserializing request!")
    assert f.filter(later) and "50 more since the last report" in later.getMessage()
    other = record("something else from grpc")
    assert f.filter(other) and other.exc_info is not None  # anything else passes untouched


def test_a_snapshot_committed_after_a_newer_one_is_evicted(servicer, monkeypatch):
    # Commits run in parallel and may finish out of step order: step 4 committing after step 5
    # must not stay in memory (it would hold the trainer's buffer for good), and the newest
    # committed snapshot stays for restore.
    from types import SimpleNamespace

    from ckpt import SnapshotState

    COMMITTED, PERSISTED = SnapshotState.COMMITTED, SnapshotState.PERSISTED

    _, agent = servicer
    snaps = {s: SimpleNamespace(run_url="file:///r", writer="rank00000", step=s, state=st, replica=False)
             for s, st in ((3, COMMITTED), (4, PERSISTED), (5, COMMITTED), (6, PERSISTED))}
    monkeypatch.setattr(agent, "_snapshots", {("file:///r", "rank00000", s): v for s, v in snaps.items()})
    evicted = []
    monkeypatch.setattr(agent, "_evict", lambda s: evicted.append(s.step))
    snaps[4].state = COMMITTED
    agent._evict_older(snaps[4])  # step 4 commits after step 5 did
    assert sorted(evicted) == [3, 4]  # 5 stays (newest committed), 6 is still on its way


def test_retention_keeps_a_step_whose_commit_is_in_flight_after_its_snapshot_was_evicted(servicer, monkeypatch):
    # Step 4 is persisted and its commit is on its way when step 5 commits first: step 4's
    # snapshot may be evicted then (a newer one is committed), but the retention that step 5's
    # commit runs must still keep step 4, or it deletes the directory under step 4's commit
    # (its commit point's rename then fails: seen under load).
    from types import SimpleNamespace

    from agent.daemon import core

    _, agent = servicer
    run = "file:///r"
    seen = []
    monkeypatch.setattr(core, "run_gc", lambda storage, policy, **kw: seen.append(set(kw["in_progress"]))
                        or SimpleNamespace(deleted=[]))
    monkeypatch.setattr(core.fmt, "read_manifest",
                        lambda storage, step: SimpleNamespace(save_id="s5", to_dict=dict))
    monkeypatch.setattr(agent, "storage", lambda url: SimpleNamespace(read=lambda path: b"{}"))
    settings = SimpleNamespace(keep_last=1, keep_every=0, commit_timeout_s=5, library_versions={})
    snap5 = SimpleNamespace(run_url=run, writer="rank00000", step=5, save_id="s5", committer=True,
                            writers=("rank00000",), settings=settings, state=ckpt.SnapshotState.PERSISTED, error="",
                            fragment_json="", commit_point=b"", session=None, replica=False, replicas_wanted=0)
    agent._in_flight.update({(run, 4): 1, (run, 5): 1})  # as the persist loop counts them; no snapshot of 4 held
    agent._commit(snap5)
    assert seen == [{4}]  # step 4 kept; step 5 itself is committed and judged by the rules
    assert dict(agent._in_flight) == {(run, 4): 1}


def test_the_writers_of_a_step_on_one_node_read_its_commit_point_once(servicer, monkeypatch):
    # Eight writers of a node wait for the same commit: one waits (and reads the commit point),
    # the others take what it read; the committer never waits behind them.
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from agent.daemon import core

    _, agent = servicer
    run, reads, waits = "file:///r", [], []
    monkeypatch.setattr(core, "complete", lambda storage, step, save, writers, **kw: waits.append(kw["committer"])
                        or SimpleNamespace(to_dict=lambda: {"step": step}))

    def wait_for_commit_point(storage, step, save, **kw):  # the waiter reads the commit point as it finds it
        waits.append(False)
        return SimpleNamespace(to_dict=lambda: {"step": step}), storage.read("root")

    monkeypatch.setattr(core, "wait_for_commit_point", wait_for_commit_point)
    monkeypatch.setattr(agent, "storage", lambda url: SimpleNamespace(read=lambda path: reads.append(path) or b"{}"))
    settings = SimpleNamespace(keep_last=0, keep_every=0, commit_timeout_s=5, library_versions={})
    states = []
    monkeypatch.setattr(agent, "_set_state", lambda snap, state, **kw: states.append((snap.writer, state, kw)))
    snaps = [SimpleNamespace(run_url=run, writer=f"rank{r:05d}", step=9, save_id="s9", committer=r == 0,
                             writers=tuple(f"rank{i:05d}" for i in range(8)), settings=settings, replica=False)
             for r in range(8)]
    agent._in_flight.update({(run, 9): 8})
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(agent._commit, snaps[1:] + snaps[:1]))
    assert waits.count(True) == 1 and waits.count(False) <= 1  # the committer, and at most one waiter
    assert len(reads) == len(waits) <= 2
    assert sorted(w for w, st, kw in states) == [s.writer for s in snaps]
    assert all(st == ckpt.SnapshotState.COMMITTED and kw["commit_point"] == b"{}" for _, st, kw in states)
