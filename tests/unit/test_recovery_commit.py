"""Recovery logic without Ray or processes, continued: the registry's incremental commit
(fragments in any order, duplicates, a coordinator restart, a failed writer), the relay of
heartbeats and checkpoint events through node agents, and the checks on fragment records."""

from __future__ import annotations

import json
import os
import time

import pytest

import ckpt
from ckpt import format as fmt
from recovery.config import DetectConfig, RunConfig
from recovery.coordinator import Coordinator
from recovery.detect import AGENT_DIED, HANG
from recovery.registry import CheckpointRegistry, PollResult
from tests.helpers import local_agent
from tests.unit.recovery_fakes import Clock, persist

# -- incremental commit ------------------------------------------------------------------------------


def test_fragments_in_any_order_with_duplicates_commit_once_reading_each_once(tmp_path):
    import random

    st = ckpt.open_storage(str(tmp_path))
    clock = Clock()
    reg = CheckpointRegistry(st, clock=clock)
    writers = [fmt.writer_name(r) for r in range(8)]
    order = [*range(8), 3, 5, 0]
    random.Random(1).shuffle(order)
    reg.fragment_ready(7, "s-7", writers[order[0]])  # before rank 0's "saving" arrived: kept for later
    for r in range(8):
        persist(st, 7, writers[r], "s-7", world=8, rank=r)
    reg.saving(7, "s-7", writers, attempt=0)
    committed = []
    for r in order[1:]:
        assert not committed or reg.poll().committed == ()  # committed once, never again
        reg.fragment_ready(7, "s-7", writers[r])
        committed += [c.step for c in reg.poll().committed]
    assert committed == [7] and fmt.committed_steps(st) == [7]
    assert reg.fragment_reads == 8
    assert reg.saves[7].to_dict()["commit_latency_s"] is not None
    reg.fragment_ready(7, "s-7", writers[2])  # a late duplicate of a committed save: nothing happens
    assert reg.poll() == PollResult() and reg.fragment_reads == 8


def test_a_save_that_goes_quiet_is_looked_up_once_in_storage(tmp_path):
    st = ckpt.open_storage(str(tmp_path))
    clock = Clock()
    reg = CheckpointRegistry(st, clock=clock, rescan_after_s=10)
    writers = [fmt.writer_name(r) for r in range(2)]
    reg.saving(2, "q-2", writers, attempt=0)
    persist(st, 2, writers[0], "q-2", rank=0, announce=reg)
    persist(st, 2, writers[1], "q-2", rank=1)  # its announcement was lost
    assert reg.poll().committed == ()
    clock.t += 11
    assert [c.step for c in reg.poll().committed] == [2]


def test_a_coordinator_restart_in_the_middle_of_a_save_commits_it_once(tmp_path):
    st = ckpt.open_storage(str(tmp_path))
    writers = [fmt.writer_name(r) for r in range(4)]
    first = CheckpointRegistry(st)
    first.saving(9, "run9-9", writers, attempt=0)
    for r in range(2):
        persist(st, 9, writers[r], "run9-9", world=4, rank=r, announce=first)
    assert first.poll().committed == ()
    # the coordinator dies; a new one learns the run id from heartbeats and adopts the save
    second = CheckpointRegistry(st)
    assert second.rebuild("run9", 4) == [9]
    assert second.fragment_reads == 2 and second.poll().committed == ()
    for r in range(2, 4):
        persist(st, 9, writers[r], "run9-9", world=4, rank=r, announce=second)
    assert [c.step for c in second.poll().committed] == [9]
    assert second.fragment_reads == 4 and fmt.committed_steps(st) == [9]
    assert CheckpointRegistry(st).rebuild("run9", 4) == []  # committed: nothing left to adopt


def test_a_failed_writer_fails_the_save_without_a_commit(tmp_path):
    st = ckpt.open_storage(str(tmp_path))
    reg = CheckpointRegistry(st)
    writers = [fmt.writer_name(r) for r in range(3)]
    reg.saving(4, "f-4", writers, attempt=0)
    persist(st, 4, writers[0], "f-4", world=3, rank=0, announce=reg)
    reg.writer_failed(4, "f-4", writers[1], "OSError: disk full")
    result = reg.poll()
    assert [r.step for r in result.failed] == [4] and "disk full" in result.failed[0].failed
    persist(st, 4, writers[2], "f-4", world=3, rank=2, announce=reg)
    assert reg.poll().committed == () and fmt.committed_steps(st) == []


# -- per-node relay --------------------------------------------------------------------------------


def _relay_coordinator(clock: Clock) -> Coordinator:
    return Coordinator("memory://relay-unit", DetectConfig(hang_timeout_s=10, startup_timeout_s=20,
                                                           agent_timeout_s=5), clock=clock, start=False)


def test_a_dead_rank_behind_a_live_agent_is_named_alone():
    clock = Clock(0.0)
    c = _relay_coordinator(clock)
    c.begin_attempt(0, 16)
    for t in range(1, 14):  # two nodes of 8 ranks, one relayed call per node and interval
        clock.t = float(t)
        for node in (0, 1):
            beats = [("heartbeat", (0, node * 8 + k, 16, t if node * 8 + k != 11 or t < 2 else 1, {}, f"n{node}",
                                    "run")) for k in range(8)]
            c.relayed(f"n{node}", {"state": "ok"}, beats)
        c.detect_round()
    notes = [n for n in c.poll()["notes"] if n["kind"] == "failure"]
    (note,) = notes
    failure = note["fields"]["failure"]
    assert failure["kind"] == HANG and failure["culprits"] == [11]  # rank 11 stopped at step 1; its agent did not


def test_a_dead_agent_is_reported_while_its_ranks_heartbeats_stop_with_it():
    clock = Clock(0.0)
    c = _relay_coordinator(clock)
    c.begin_attempt(0, 16)
    for t in range(1, 10):
        clock.t = float(t)
        for node in (0, 1):
            if node == 1 and t > 2:
                continue  # node 1's agent died at t=2: nothing of its node comes any more
            c.relayed(f"n{node}", {"state": "ok"}, [("heartbeat", (0, node * 8 + k, 16, t, {}, f"n{node}", "run"))
                                                    for k in range(8)])
        c.detect_round()
    kinds = [(n["fields"]["failure"]["kind"], n["fields"]["failure"]["node"]) for n in c.poll()["notes"]
             if n["kind"] == "failure"]
    assert kinds == [(AGENT_DIED, "n1")]


def test_relayed_checkpoint_events_reach_the_registry_and_unknown_methods_are_ignored(tmp_path):
    clock = Clock()
    c = Coordinator(str(tmp_path), DetectConfig(), clock=clock, start=False)
    writers = [fmt.writer_name(r) for r in range(2)]
    for r in range(2):
        persist(c.storage, 3, writers[r], "r-3", world=2, rank=r)
    c.relayed("n0", None, [("saving", (0, 3, "r-3", writers)), ("begin_attempt", (5, 1)),
                           ("fragment_ready", (0, 3, "r-3", writers[0]))])
    c.relayed("n1", None, [("fragment_ready", (0, 3, "r-3", writers[1]))])
    c.step_once()
    assert c.registry.committed == [3] and c.membership.attempt != 5


def test_the_coordinator_tells_each_node_agent_of_a_commit_once(tmp_path):
    class Agent:
        def __init__(self) -> None:
            self.calls: list[tuple] = []
            self.committed = self  # agent.committed.remote(...), as on a Ray actor handle

        def remote(self, *args) -> None:
            self.calls.append(args)

    c = Coordinator(str(tmp_path), DetectConfig(), clock=Clock(), start=False)
    agents = {"n0": Agent(), "n1": Agent(), "n2": Agent()}
    c.set_agents(agents)
    c.forget_agent("n2")  # a node gone: told nothing more
    writers = [fmt.writer_name(r) for r in range(2)]
    for step in (3, 4):
        for r in range(2):
            persist(c.storage, step, writers[r], f"r-{step}", world=2, rank=r)
        c.relayed("n0", None, [("saving", (0, step, f"r-{step}", writers)),
                               *[("fragment_ready", (0, step, f"r-{step}", w)) for w in writers]])
        c.step_once()
        c.step_once()  # nothing new: nobody is told twice
    assert c.registry.committed == [3, 4]
    url = c.storage.url
    assert agents["n0"].calls == agents["n1"].calls == [(url, 3, "r-3"), (url, 4, "r-4")]
    assert agents["n2"].calls == [] and c.notices_sent == 4
    assert [c.registry.saves[s].to_dict()["agents_told"] for s in (3, 4)] == [2, 2]


def test_a_fragment_checksum_is_checked_on_its_bytes_and_on_a_reserialized_copy(tmp_path):
    st = ckpt.open_storage(str(tmp_path))
    persist(st, 1, fmt.writer_name(0), "s-1", world=1, rank=0)
    path = fmt.fragment_path(1, fmt.writer_name(0))
    data = st.read(path)
    assert fmt._fragment_seal_matches(data, json.loads(data))
    # Re-serialized with other spacing: the byte check declines, the canonical check accepts.
    st.write_atomic(path, json.dumps(json.loads(data), indent=1).encode())
    assert fmt.read_fragment(st, 1, fmt.writer_name(0)).save_id == "s-1"
    # One digit changed that still parses: refused.
    bad = data.replace(b'"save_id":"s-1"', b'"save_id":"s-2"')
    st.write_atomic(path, bad)
    with pytest.raises(ckpt.errors.FormatError, match="checksum"):
        fmt.read_fragment(st, 1, fmt.writer_name(0))


@pytest.mark.parametrize("record", [[[True, 0], 8, 1, 0, 0], [[1.0, 0], 8, 1, 0, 0], [[1, -1], 8, 1, 0, 0],
                                    [[1, 0], 8, 1 << 32, 0, 0], [[1, 0], False, 1, 0, 0]])
def test_chunk_records_that_are_not_plain_non_negative_integers_are_refused(record):
    from ckpt.manifest import ChunkRecord, ManifestError

    with pytest.raises(ManifestError):
        ChunkRecord.from_list(record, "r")


def test_relay_groups_lead_by_the_first_agent_and_a_lost_leader_is_replaced_at_once(monkeypatch):
    import recovery.fleet as fleet_mod

    class FakeAgent:
        def __init__(self, name):
            self.name, self.upstream = name, "unset"
            outer = self

            class Call:
                @staticmethod
                def remote(leader):
                    outer.upstream = None if leader is None else leader.name

            self.set_upstream = Call

    monkeypatch.setattr(fleet_mod, "RELAY_GROUP", 3)
    fleet = fleet_mod.AgentFleet(RunConfig(num_workers=7, storage="memory://g"), "job", "coord", "memory://g",
                                 lambda *a, **k: None)
    fleet.agents = {f"n{i}": FakeAgent(f"n{i}") for i in range(7)}
    fleet._update_relay()
    assert {n: a.upstream for n, a in fleet.agents.items()} == {
        "n0": None, "n1": "n0", "n2": "n0", "n3": None, "n4": "n3", "n5": "n3", "n6": None}
    fleet.coordinator = type("C", (), {"forget_agent": type("F", (), {"remote": staticmethod(lambda n: None)})})()
    fleet.forget("n0")  # the leader's node was lost: n1 leads what is left of its group
    assert {n: a.upstream for n, a in fleet.agents.items()} == {
        "n1": None, "n2": "n1", "n3": "n1", "n4": None, "n5": "n4", "n6": "n4"}


def test_a_relay_leaders_call_carries_its_groups_batches():
    clock = Clock(0.0)
    c = _relay_coordinator(clock)
    c.begin_attempt(0, 4)
    c.relayed_many([(f"n{node}", {"state": "ok"}, [("heartbeat", (0, node * 2 + k, 4, 3, {}, f"n{node}", "run"))
                                                    for k in range(2)]) for node in range(2)])
    progress = c.poll()["progress"]
    assert {r: v["step"] for r, v in progress["ranks"].items()} == {0: 3, 1: 3, 2: 3, 3: 3}
    assert set(progress["agents"]) == {"n0", "n1"}


def test_the_relay_interval_grows_with_groups_and_stays_within_the_timeouts():
    d = DetectConfig()
    assert d.relay_interval(2, 32) == 0.25
    assert d.relay_interval(1250, 32) == 40 / d.RELAY_CALLS_PER_S  # 40 groups
    assert d.relay_interval(100_000, 32) == min(d.hang_timeout_s, d.agent_timeout_s) / 5
    assert DetectConfig(relay_interval_s=1.5).relay_interval(10_000, 32) == 1.5


def test_a_member_agent_sends_to_its_leader_which_sends_its_group_on_in_one_call():
    import threading

    from recovery.node_agent import NodeAgent

    sent = {"coordinator": [], "leader": []}

    class Remote:
        def __init__(self, key):
            self.key = key

        def remote(self, batches):
            sent[self.key].append(batches)

    def agent(node, upstream):
        a = object.__new__(NodeAgent)  # the relay part alone: no daemon
        a.node, a._relay_s, a._stop = node, 0.2, threading.Event()
        a._relay, a._beats, a._forwarded, a._urgent = [], {}, [], False
        a._relay_lock, a._upstream = threading.Lock(), upstream
        a.coordinator = type("C", (), {"relayed_many": Remote("coordinator")})()
        a.status = lambda: {"state": "ok"}
        return a

    leader = agent("n0", None)
    member = agent("n1", type("L", (), {"forward": Remote("leader")})())
    member.relay("heartbeat", (0, 8, 16, 4, {}, "n1", "run"))
    member.relay("heartbeat", (0, 8, 16, 5, {}, "n1", "run"))  # only a rank's latest goes on
    member.relay("fragment_ready", (0, 5, "s-5", "rank00008"))
    threads = [threading.Thread(target=a._heartbeats) for a in (leader, member)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while not sent["leader"] and time.monotonic() < deadline:
        time.sleep(0.01)
    leader.forward(sent["leader"][0])
    while not any(len(b) == 2 for b in sent["coordinator"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    for a in (leader, member):
        a._stop.set()
    for t in threads:
        t.join()
    (node, status, calls), = sent["leader"][0]
    assert node == "n1" and calls == [("heartbeat", (0, 8, 16, 5, {}, "n1", "run")),
                                      ("fragment_ready", (0, 5, "s-5", "rank00008"))]
    group = next(b for b in sent["coordinator"] if len(b) == 2)
    assert [n for n, _s, _c in group] == ["n0", "n1"]


def test_the_socket_directories_killed_agents_left_are_removed_at_shutdown(tmp_path, monkeypatch):
    import socket
    import tempfile

    from recovery import node_agent

    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    for node in ("aaaaaaaa11", "bbbbbbbb22"):  # a killed agent: its socket is still bound on disk
        d = node_agent.socket_dir("job1", node)
        os.makedirs(d)
        s = socket.socket(socket.AF_UNIX)
        s.bind(os.path.join(d, "agent.sock"))
        s.close()
    other = tmp_path / "ckptrec-job2-cccccccc"  # another job's agent: untouched
    other.mkdir()
    node_agent.remove_socket_dirs("job1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckptrec-job2-cccccccc"]


@pytest.mark.parametrize("agent", ["actor", "unix:///run/ckpt-agent/agent.sock", None])
def test_whom_the_coordinator_tells_of_commits_per_kind_of_agent(agent):
    """Agent actors are told themselves; agents run outside the job through the first worker of
    their node; without agents nobody is."""
    import recovery.fleet as fleet_mod

    told: list = []
    fleet = fleet_mod.AgentFleet(RunConfig(num_workers=3, storage="memory://t", agent=agent), "job", "coord",
                                 "memory://t", lambda *a, **k: None)
    fleet.coordinator = type("C", (), {"set_agents": type("S", (), {"remote": staticmethod(told.append)})})()
    fleet.agents = {"n0": "agent0"} if agent == "actor" else {}
    fleet.tell_workers(["w0", "w1", "w2"], ["n0", "n1", "n0"])
    fleet.tell_coordinator()  # as after the coordinator's restart
    if agent is None:
        assert told == []
    elif agent == "actor":
        assert told == [{"n0": "agent0"}]  # tell_workers changes nothing for actors
    else:
        assert told == [{"n0": "w0", "n1": "w1"}] * 2


def test_a_worker_tells_its_nodes_agent_of_a_commit_over_its_socket(tmp_path):
    from recovery.worker_process import Worker

    with local_agent(tmp_path, "ckworkertell") as (daemon, _shm):
        w = Worker(0, 1, 0)
        w.committed("file:///nowhere", 3, "s-3")  # before any attempt ran: no agent known, nothing sent
        w._agent_address = f"unix://{tmp_path}/a.sock"  # as run() sets it from the attempt's spec
        w.committed("file:///run", 3, "s-3")
        assert daemon.agent._told_runs == {"file:///run"}
