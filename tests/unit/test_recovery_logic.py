"""Recovery logic without Ray or processes: membership and failure detection on a fake clock,
the checkpoint registry committing into a temp directory, the coordinator's rounds, the
reload policy against a fake job, configuration, and the agent's rollback rule."""

from __future__ import annotations

import json
import time

import pytest
import torch

import ckpt
from ckpt import format as fmt
from ckpt.commit import failed_marker
from ckpt.restore import Tier
from recovery.config import CheckpointConfig, DetectConfig, RunConfig
from recovery.coordinator import Coordinator
from recovery.detect import AGENT_DIED, HANG, STORAGE, WORKER_DIED, Failure, Membership
from recovery.events import EventLog
from recovery.policies import resolve_policy
from recovery.policy import CONTINUED, RESTARTED, RecoveryOutcome, RecoveryPolicy, ReloadPolicy
from recovery.registry import CheckpointRegistry
from recovery.restore import RestorePoint
from tests.unit.recovery_fakes import Clock, persist

# -- membership and detection ---------------------------------------------------------------------


def test_hang_is_no_progress_for_the_timeout_and_is_reported_once():
    m = Membership(DetectConfig(hang_timeout_s=5, startup_timeout_s=50))
    m.begin_attempt(0, 2, now=0)
    m.heartbeat(0, 0, 2, 1, {"loss": 1.5}, now=1)
    m.heartbeat(0, 1, 2, 1, {}, now=1)
    assert m.check(now=5.9) == []
    m.heartbeat(0, 0, 2, 2, {}, now=5)  # rank 0 progresses, rank 1 only repeats its step
    m.heartbeat(0, 1, 2, 1, {}, now=5.5)
    found = m.check(now=6.5)
    assert [(f.kind, f.ranks, f.last_step) for f in found] == [(HANG, (1,), 2)]
    assert found[0].last_progress_at == 1 and found[0].detected_after_s == pytest.approx(5.5)
    (again,) = m.check(now=100)
    assert (again.ranks, again.last_progress_at, "rank 0 stuck at step 2 for 95.0 s" in again.detail) == ((0,), 5, True)
    assert m.check(now=200) == []
    assert m.progress()["ranks"][0]["metrics"] == {"loss": 1.5}


def test_startup_timeout_applies_before_the_first_report():
    m = Membership(DetectConfig(hang_timeout_s=1, startup_timeout_s=10))
    m.begin_attempt(3, 2, now=0)
    m.heartbeat(3, 0, 2, None, {}, now=0.5)  # alive, no step yet
    assert m.check(now=9) == []
    (f,) = m.check(now=10.5)
    assert f.kind == HANG and f.ranks == (0, 1) and "without a first report" in f.detail and f.attempt == 3


def test_the_startup_timeout_grows_with_the_world():
    config = DetectConfig(startup_timeout_s=300)
    assert config.startup_timeout_for(10_000) == 600 and config.startup_timeout_for(4) == 300.12
    m = Membership(DetectConfig(hang_timeout_s=1, startup_timeout_s=10, startup_timeout_per_rank_s=0.01))
    m.begin_attempt(1, 1000, now=0)  # 10 s + 1,000 x 0.01 s
    assert m.check(now=19.5) == []
    (f,) = m.check(now=20.5)
    assert len(f.ranks) == 1000 and "startup_timeout_s=20 at this world size" in f.detail
    with pytest.raises(ValueError, match="startup_timeout_per_rank_s"):
        DetectConfig(startup_timeout_per_rank_s=-1)


def test_heartbeats_of_an_old_attempt_are_ignored_and_a_newer_one_is_adopted():
    m = Membership(DetectConfig())
    m.begin_attempt(2, 4, now=0)
    assert not m.heartbeat(1, 0, 4, 99, {}, now=1)
    assert m.last_step is None
    # a restarted coordinator knows no attempt; the first heartbeat teaches it
    fresh = Membership(DetectConfig())
    assert fresh.heartbeat(2, 2, 3, 17, {}, now=1)
    assert (fresh.attempt, fresh.world_size, fresh.last_step) == (2, 3, 17)


def test_silent_agent_is_a_failure():
    m = Membership(DetectConfig(agent_timeout_s=3))
    m.begin_attempt(0, 1, now=0)
    m.heartbeat(0, 0, 1, 0, {}, now=0)
    m.agent_heartbeat("node-a", {"used_bytes": 1}, now=0)
    m.agent_heartbeat("node-b", {}, now=2)
    kinds = [(f.kind, f.node) for f in m.check(now=4)]
    assert (AGENT_DIED, "node-a") in kinds and (AGENT_DIED, "node-b") not in kinds


def test_failure_kinds_are_checked():
    with pytest.raises(ValueError, match="unknown failure kind"):
        Failure("meteor", 0, "", 0.0)


# -- registry ---------------------------------------------------------------------------------------


def test_registry_commits_when_every_fragment_is_in_and_runs_retention(tmp_path):
    st = ckpt.open_storage(str(tmp_path))
    reg = CheckpointRegistry(st, keep=ckpt.retention.RetentionPolicy(keep_last=2))
    writers = [fmt.writer_name(0), fmt.writer_name(1)]
    for step in (0, 5, 10):
        reg.saving(step, f"run-{step}", writers, attempt=0)
        persist(st, step, writers[0], f"run-{step}", rank=0, announce=reg)
        assert reg.poll().committed == ()  # one writer is missing
        persist(st, step, writers[1], f"run-{step}", rank=1, announce=reg)
        result = reg.poll()
        assert [r.step for r in result.committed] == [step]
    assert fmt.committed_steps(st) == [5, 10] == reg.committed
    assert result.deleted == (0,)
    out = {"w": torch.zeros(8)}
    ckpt.load(out, st)
    assert out["w"].tolist() == [10.0] * 4 + [11.0] * 4


def test_registry_counts_failed_saves_and_ignores_stale_fragments(tmp_path):
    st = ckpt.open_storage(str(tmp_path))
    reg = CheckpointRegistry(st)
    writers = [fmt.writer_name(0), fmt.writer_name(1)]
    reg.saving(3, "new-3", writers, attempt=1)
    persist(st, 3, writers[0], "old-3", rank=0)  # a stale attempt's fragment does not count
    persist(st, 3, writers[1], "new-3", rank=1, announce=reg)
    assert reg.poll().committed == ()
    st.write_atomic(failed_marker(3, writers[0]), json.dumps({"save_id": "new-3", "error": "disk full"}).encode())
    reg.rescan(3)  # what the registry does for a save that went quiet: finds the failure marker
    result = reg.poll()
    assert [r.step for r in result.failed] == [3] and "disk full" in result.failed[0].failed
    assert reg.consecutive_failures == 1 and fmt.committed_steps(st) == []


def test_a_stale_fragment_read_first_does_not_fail_the_save_its_replacement_commits(tmp_path):
    st = ckpt.open_storage(str(tmp_path))
    reg = CheckpointRegistry(st)
    writers = [fmt.writer_name(0), fmt.writer_name(1)]
    reg.saving(3, "new-3", writers, attempt=1)
    persist(st, 3, writers[0], "old-3", rank=0)  # persisted late by the agent of a rolled-back attempt
    reg.rescan(3)
    persist(st, 3, writers[1], "new-3", rank=1, announce=reg)
    assert reg.poll().committed == () and reg.pending[3].failed is None
    persist(st, 3, writers[0], "new-3", rank=0, announce=reg)  # this save's own fragment replaces it
    assert [r.step for r in reg.poll().committed] == [3]


def test_rebuild_adopts_the_saves_of_the_current_run_id(tmp_path):
    st = ckpt.open_storage(str(tmp_path))
    writers = [fmt.writer_name(0), fmt.writer_name(1)]
    persist(st, 4, writers[0], "abc-4", rank=0)
    persist(st, 4, writers[1], "abc-4", rank=1)
    reg = CheckpointRegistry(st)
    assert reg.rebuild() == [] and reg.committed == []
    assert reg.rebuild("abc", 2) == [4]
    assert [r.step for r in reg.poll().committed] == [4]
    assert CheckpointRegistry(st).rebuild("abc", 2) == []  # committed now: nothing to adopt


# -- coordinator --------------------------------------------------------------------------------------


def test_coordinator_rounds_commit_detect_and_survive_a_restart(tmp_path):
    clock = Clock()
    url = str(tmp_path)
    st = ckpt.open_storage(url)
    c = Coordinator(url, DetectConfig(hang_timeout_s=2, storage_failure_limit=2), clock=clock, start=False)
    c.begin_attempt(0, 2)
    writers = [fmt.writer_name(0), fmt.writer_name(1)]
    for rank in (0, 1):
        c.heartbeat(0, rank, 2, 0, {"loss": 2.0, "grad_norm": 1.0}, node="n", run_id="rid")
    c.saving(0, 0, "rid-0", writers)
    for rank in (0, 1):
        persist(st, 0, writers[rank], "rid-0", rank=rank, announce=c)
    c.step_once()
    snap = c.poll(0, attempt=0)
    assert [n["fields"].get("step") for n in snap["notes"] if n["kind"] == "checkpoint"] == [0]
    c.snapshot_report(0, 0, 0, "rid-0", 0.012, 64)
    c._thread.start()
    assert c.checkpoints()[0]["stall_s"] == pytest.approx(0.012)
    c.stop()
    c.join()

    # A save in flight when the coordinator dies: the next one finds it from storage + heartbeats.
    persist(st, 5, writers[0], "rid-5", rank=0)
    c2 = Coordinator(url, DetectConfig(hang_timeout_s=2, storage_failure_limit=2), clock=clock, start=False)
    assert c2.registry.committed == [0]
    c2.heartbeat(0, 0, 2, 5, {}, run_id="rid")
    c2.heartbeat(0, 1, 2, 5, {}, run_id="rid")
    persist(st, 5, writers[1], "rid-5", rank=1)
    c2.step_once(rescan=True)
    assert fmt.committed_steps(st) == [0, 5]

    # no progress -> a hang, reported once; failing saves -> a storage failure
    clock.t += 3
    for step in (10, 15):
        c2.saving(0, step, f"rid-{step}", writers)
        st.write_atomic(failed_marker(step, writers[0]), json.dumps({"save_id": f"rid-{step}", "error": "EIO"}).encode())
        c2.snapshot_report(0, 0, step, f"rid-{step}", 0.0, 0, error="EIO")  # what the failing worker reports
    c2.step_once()
    c2.step_once()
    kinds = [n["fields"]["failure"]["kind"] for n in c2.poll(0)["notes"] if n["kind"] == "failure"]
    assert kinds == [HANG, STORAGE]


# -- policy -------------------------------------------------------------------------------------------


class FakeJob:
    def __init__(self, config: RunConfig, room: int) -> None:
        self.config = config
        self.room = room
        self._world = config.num_workers
        self._attempt = 0
        self.calls: list[tuple] = []
        self.events = EventLog(echo=None)

    @property
    def world_size(self) -> int:
        return self._world

    @property
    def attempt(self) -> int:
        return self._attempt

    def log(self, kind, message, **fields):
        self.events.emit(kind, message, **fields)

    def stop_workers(self, reason):
        self.calls.append(("stop",))

    def find_restore_point(self):
        self.calls.append(("find",))
        return RestorePoint(40, {"rank00000": Tier.AGENT_MEMORY, "rank00001": Tier.STORAGE})

    def fit_world(self, want, minimum):
        self.calls.append(("fit", want, minimum))
        return max(minimum, min(want, self.room))

    def room_for(self, n):
        return self.room >= n

    def start_workers(self, world_size, restore):
        self.calls.append(("start", world_size, restore.step))
        self._world = world_size
        self._attempt += 1


def _config(**kw) -> RunConfig:
    return RunConfig(num_workers=4, storage="memory://x", **kw)


def test_reload_stops_everything_then_restores_the_freshest_point_and_shrinks():
    job = FakeJob(_config(min_workers=2), room=3)
    out = ReloadPolicy().on_failure(Failure(WORKER_DIED, 0, "rank 3 died", 1.0, ranks=(3,)), job)
    assert job.calls == [("stop",), ("find",), ("fit", 4, 2), ("start", 3, 40)]
    assert (out.action, out.world_size, out.restore.step, out.restore.expected_tier) == (RESTARTED, 3, 40, "mixed")


def test_reload_restarts_nothing_on_storage_failure_and_grows_back_only_if_allowed():
    job = FakeJob(_config(), room=4)
    out = ReloadPolicy().on_failure(Failure(STORAGE, 0, "3 failed", 1.0), job)
    assert out.action == CONTINUED and job.calls == [] and job.events.of_kind("storage")
    job._world = 3
    assert ReloadPolicy().on_checkpoint(50, job) is None  # allow_grow is off
    grow = FakeJob(_config(allow_grow=True), room=3)
    grow._world = 3
    assert ReloadPolicy().on_checkpoint(50, grow) is None  # no room yet
    grow.room = 4
    out = ReloadPolicy().on_checkpoint(60, grow)
    assert out.action == RESTARTED and grow.calls[-1] == ("start", 4, 40)


def test_policy_names_and_objects():
    assert isinstance(resolve_policy("reload"), ReloadPolicy)

    class Mine(RecoveryPolicy):
        name = "mine"

        def on_failure(self, failure, job):
            return RecoveryOutcome(CONTINUED)

    mine = Mine()
    assert resolve_policy(mine) is mine
    with pytest.raises(ValueError, match="unknown recovery policy 'nope'.*reload"):
        resolve_policy("nope")
    with pytest.raises(TypeError):
        resolve_policy(42)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_workers": 0}, "num_workers"), ({"min_workers": 5}, "min_workers"), ({"max_failures": -2}, "max_failures"),
    ({"agent": "tcp://x"}, "agent"), ({"backend": "mpi"}, "backend"), ({"placement_timeout_s": 0}, "placement_timeout_s"),
    ({"agent_replicas": -1}, "agent_replicas"), ({"agent_replicas": True}, "agent_replicas"),
    ({"agent_replicas": 1, "agent": None}, "agent_replicas needs agent='actor'"),
    ({"spares": -1}, "spares"), ({"spares": 1.5}, "spares"), ({"standby": -1}, "standby"), ({"standby": True}, "standby"),
])
def test_run_config_validation(kwargs, match):
    base = {"num_workers": 4, "storage": "/tmp/x"} | kwargs
    with pytest.raises(ValueError, match=match):
        RunConfig(**base)


def test_config_details():
    cfg = RunConfig(num_workers=2, storage="/x", backoff_s=1.0, backoff_max_s=5.0)
    assert [cfg.backoff_for(n) for n in range(6)] == [0.0, 0.0, 1.0, 2.0, 4.0, 5.0]  # the first restart: at once
    assert cfg.torch_backend == "gloo"
    assert RunConfig(num_workers=1, storage="/x", resources_per_worker={"GPU": 1}).torch_backend == "nccl"
    with pytest.raises(ValueError, match="hang_timeout_s"):
        DetectConfig(hang_timeout_s=0)
    with pytest.raises(ValueError, match="commit_by"):
        CheckpointConfig(options={"commit_by": "rank0"})


# -- the agent's rollback rule ------------------------------------------------------------------------


def test_agent_drops_uncommitted_snapshots_a_rolled_back_trainer_left(tmp_path):
    from agent.config import AgentConfig
    from agent.daemon.core import Agent
    from agent.daemon.snapshot import PersistSettings
    from agent.errors import AgentStateError as Conflict
    from agent.plan import encode_plan

    shm = tmp_path / "shm"
    shm.mkdir()
    agent = Agent(AgentConfig(socket_path=str(tmp_path / "s"), memory_budget_bytes=1 << 20, shm_dir=str(shm),
                              shm_prefix="rollback"))
    run = str(tmp_path / "run")
    settings = PersistSettings(commit_timeout_s=60)
    writers = ("rank00000", "rank00001")  # rank 1 never saves: no step can commit

    def announce(sess, step):
        seg = agent.lease(sess.id, 4096)
        view = seg.tensor[:16].view(torch.float32)
        view.copy_(torch.arange(4.0) + step)
        plan = ckpt.plan_save({"w": ckpt.Sharded(view, dim=0, rank=0, world=2)}, rank=0, world=2)
        return agent.announce(sess.id, seg.name, step, f"{sess.id}-{step}", writers, False,
                              encode_plan(plan, seg.tensor))

    try:
        first = agent.register(run, "rank00000", 1, settings)
        snap = announce(first, 10)
        deadline = time.monotonic() + 30
        while snap.state != "persisted" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert snap.state == "persisted"
        with pytest.raises(Conflict):  # its own trainer is alive: snapshots stay in step order
            announce(first, 5)
        agent.end_session(first.id)  # the trainer was killed; the job rolls back to step 5
        second = agent.register(run, "rank00000", 2, settings)
        assert announce(second, 5).step == 5
        assert announce(second, 10).save_id == f"{second.id}-10"
        assert [s.step for s in agent.snapshots(run)] == [5, 10]
    finally:
        agent.close()
    assert list(shm.iterdir()) == []


def test_a_hang_report_names_the_culprit_apart_from_the_ranks_waiting_on_it():
    m = Membership(DetectConfig(hang_timeout_s=10, startup_timeout_s=100))
    m.begin_attempt(0, 1000, now=0)
    for r in range(1000):
        m.heartbeat(0, r, 1000, 41, {}, now=1)
    for r in range(1000):  # every rank but 637 reaches step 42, then all wait on it in a collective
        if r != 637:
            m.heartbeat(0, r, 1000, 42, {}, now=2 + r / 1000)
    (f,) = m.check(now=13)
    assert f.kind == HANG and f.culprits == (637,) and len(f.ranks) == 1000
    assert f.detail.startswith("no progress") and "rank 637 stuck at step 41" in f.detail
    assert "999 rank(s) waiting behind it (at step 42)" in f.detail
    assert len(f.detail) < 1000  # a report names the culprit and a few waiters, not every rank
    assert f.to_dict()["culprits"] == [637]


def test_a_rank_that_never_reported_is_the_culprit():
    m = Membership(DetectConfig(hang_timeout_s=5, startup_timeout_s=20))
    m.begin_attempt(1, 4, now=0)
    for r in (0, 1, 3):
        m.heartbeat(1, r, 4, 0, {}, now=1)
    (f,) = m.check(now=21)
    assert f.culprits == (2,) and set(f.ranks) == {0, 1, 2, 3}
