"""Growing back in place, without Ray: the placement's groups reserved for new ranks (numbered
after the job's own, asked for once, looked at again, given up after ``placement_timeout_s``,
removed with the job's), which bundle a new rank takes, and what ``reload`` and ``heal`` do
after a checkpoint while a reservation is being placed. (With Ray: tests/integration/
test_recovery_grow.py.)
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from recovery import inplace, placement
from recovery.config import RunConfig
from recovery.events import Event, EventLog
from recovery.heal import HealPolicy
from recovery.policy import HEAL, RELOAD, RESTARTED, ReloadPolicy
from recovery.spares import Spare, Spares
from recovery.testing import FakeDataParallelJob


class FakeGroup:
    def __init__(self, bundles: int, node: str = "n1") -> None:
        self.bundles, self.node, self.placed = bundles, node, False

    def ready(self) -> FakeGroup:
        return self


class FakeRay:
    """What recovery.placement asks of Ray: groups placed when ``placed`` says, one live node."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, free_slots: int = 4) -> None:
        self.groups: list[FakeGroup] = []
        self.removed: list[FakeGroup] = []
        self.free_slots = free_slots
        self.now = 100.0
        monkeypatch.setattr(placement, "placement_group", self.placement_group)
        monkeypatch.setattr(placement, "remove_placement_group", self.removed.append)
        monkeypatch.setattr(placement, "placement_group_table",
                            lambda pg: {"bundles_to_node_id": {i: pg.node for i in range(pg.bundles)} if pg.placed else {}})
        monkeypatch.setattr(placement.ray, "wait", lambda refs, timeout: ([r for r in refs if r.placed], []))
        monkeypatch.setattr(placement.ray, "nodes", lambda: [{"NodeID": "n1", "Alive": True}])
        monkeypatch.setattr(placement.ray, "available_resources", lambda: {"CPU": 8.0, "slot": float(self.free_slots)})
        monkeypatch.setattr(placement.time, "monotonic", lambda: self.now)

    def placement_group(self, bundles, strategy):
        self.groups.append(pg := FakeGroup(len(bundles)))
        return pg


def _placement(events: list, **cfg) -> placement.Placement:
    config = RunConfig(num_workers=4, storage="memory://grow", resources_per_worker={"CPU": 1.0, "slot": 1},
                       placement_timeout_s=10.0, **cfg)
    pl = placement.Placement(config, lambda kind, msg, **f: events.append((kind, msg, f)))
    pl.pg, pl.size, pl.world = FakeGroup(2), 2, 2  # the job's own group: 2 bundles, both used
    pl.pg.placed = True
    return pl


def test_a_reserved_group_is_numbered_after_the_jobs_and_asked_for_once(monkeypatch):
    fake, events = FakeRay(monkeypatch), []
    pl = _placement(events)
    assert not pl.reserve(2) and pl.reserving  # asked for, not placed yet
    assert not pl.reserve(2) and len(fake.groups) == 1  # looked at again, not asked for twice
    fake.groups[0].placed = True
    assert pl.reserve(2) and not pl.reserving
    assert pl.bundle_count() == 4 and pl.placed_bundles() == {0, 1, 2, 3}
    assert pl.nodes_of({2, 3}) == {"n1"} and pl.nodes_of(set()) == set()
    (reserved,) = [f for kind, _, f in events if "reserved" in f]
    assert reserved["reserved"] == 2
    # bundles 2 and 3 are the new group's first and second; 0 and 1 the job's own
    opts = pl.worker_options(3).get("scheduling_strategy")
    assert (opts.placement_group, opts.placement_group_bundle_index) == (fake.groups[0], 1)
    opts = pl.worker_options(1)["scheduling_strategy"]
    assert (opts.placement_group, opts.placement_group_bundle_index) == (pl.pg, 1)
    assert pl.reserve(0)  # nothing more needed
    job_group = pl.pg
    pl.release()  # every group goes with the job's
    assert fake.removed == [fake.groups[0], job_group] and pl.pg is None and pl.bundle_count() == 0


def test_a_reservation_not_placed_within_the_timeout_is_given_up(monkeypatch):
    fake, events = FakeRay(monkeypatch), []
    pl = _placement(events)
    assert not pl.reserve(1)
    fake.now += 9.0
    assert not pl.reserve(1) and pl.reserving
    fake.now += 1.0
    assert not pl.reserve(1) and not pl.reserving and fake.removed == [fake.groups[0]]
    assert "given up" in events[-1][1]
    assert pl.refused()  # and not asked for again until the cluster has more room
    assert not inplace.room_to_grow(_job(pl, 2), 3) and len(fake.groups) == 1
    fake.now += 99.0
    assert pl.refused()
    fake.now += 1.0  # tried again after 10 x placement_timeout_s even so (room may have moved between nodes)
    assert not pl.refused()
    fake.now -= 1.0
    fake.free_slots += 1  # or once the cluster has more room
    assert not pl.refused() and not inplace.room_to_grow(_job(pl, 2), 3) and len(fake.groups) == 2
    pl.release()
    assert fake.groups[1] in fake.removed  # a pending reservation is removed with the job's group


def _job(pl: placement.Placement, world: int, *, idle_spares: int = 0, ready: int = 0) -> SimpleNamespace:
    """A job of ``world`` ranks in ``pl`` with ``idle_spares`` hot spares (``ready`` of them up)."""
    job = SimpleNamespace(config=pl.config, placement=pl, world_size=world, bundles={}, kept={r: f"w{r}" for r in range(world)},
                          fresh=set(), attempt=3, events=EventLog(echo=None))
    job.spares = Spares(pl.config.spares, boot=lambda bundle: f"spare{bundle}", kill=lambda actor: None,
                        warm=lambda actor: actor)
    for i in range(idle_spares):
        job.spares.idle[100 + i] = Spare(f"s{i}", 100 + i, None, 0.0, node="n1" if i < ready else None)
    job.new_worker = lambda rank, want, attempt: (inplace.bundle_for(job, rank), f"new{rank}")[1]
    job.log = job.events.emit
    return job


def test_room_to_grow_reserves_for_the_missing_ranks_only_where_the_cluster_has_room(monkeypatch):
    fake, events = FakeRay(monkeypatch, free_slots=1), []
    pl = _placement(events)
    assert not inplace.room_to_grow(_job(pl, 2), 4) and not fake.groups  # room for 1 of the 2 missing: not asked
    assert inplace.room_to_grow(_job(pl, 2, idle_spares=1), 4) is False and len(fake.groups) == 1  # a spare takes one
    assert fake.groups[0].bundles == 1
    fake.groups[0].placed = True
    job = _job(pl, 2, idle_spares=1)
    assert inplace.room_to_grow(job, 4)
    assert not inplace.room_to_grow(_job(pl, 4), 4)  # whole
    spares = _placement(events, spares=1)  # a group of 1 (no room for the spare then): room for rank and spare now
    spares.pg, spares.size, spares.world = FakeGroup(1), 1, 1
    fake.free_slots = 4
    assert not inplace.room_to_grow(_job(spares, 1), 2) and fake.groups[-1].bundles == 2
    few = _placement(events, spares=1)
    few.pg, few.size, few.world = FakeGroup(1), 1, 1
    fake.free_slots = 1  # room for the rank only: never a spare at a rank's cost
    assert not inplace.room_to_grow(_job(few, 1), 2) and fake.groups[-1].bundles == 1
    strict = _placement(events, placement_strategy="STRICT_SPREAD")
    job = _job(strict, 2)
    assert not inplace.room_to_grow(job, 3) and len(fake.groups) == 3  # a group apart would not be spread
    last = job.events.events[-1]
    assert "placement_strategy=STRICT_SPREAD" in last.message and last.fields["in_place"] is False


def test_growth_boots_the_new_ranks_in_the_reserved_bundles_not_in_a_spares(monkeypatch):
    fake, events = FakeRay(monkeypatch), []
    pl = _placement(events, spares=1)
    pl.pg, pl.size, pl.world, pl.extra = FakeGroup(3), 3, 2, 1  # bundle 2 is a spare's slot, no spare booted
    pl.pg.placed = True
    job = _job(pl, 2)
    job.spares.idle[2] = Spare("s", 2, None, 0.0)  # a spare booting there
    assert not inplace.room_to_grow(job, 4)  # asked for 2 more
    fake.groups[0].placed = True
    assert inplace.room_to_grow(job, 4)
    inplace.boot_growth(job, 4, "reload")
    assert job.bundles == {0: 0, 1: 1, 2: 3, 3: 4} and job.fresh == {2, 3} and pl.world == 4
    assert job.kept == {0: "w0", 1: "w1", 2: "new2", 3: "new3"}
    last = job.events.events[-1]
    assert last.fields == {"world_size": 4, "wanted": 4, "policy": "reload", "grow": True, "bundles": {2: 3, 3: 4}}
    assert "restore the newest checkpoint" in last.message


def test_new_ranks_boot_ahead_where_the_job_checkpoints_often_enough_to_be_worth_it(monkeypatch):
    fake, events = FakeRay(monkeypatch), []
    pl = _placement(events)
    pl.pg, pl.size, pl.world = FakeGroup(4), 4, 4
    pl.pg.placed = True  # a heal that shrank to 2 kept the bundles 2 and 3, placed again
    job = _job(pl, 2)
    job.kept = {0: "w0", 1: "w1"}
    job.bundles = {0: 0, 1: 1}
    assert inplace.room_to_grow(job, 4)  # no checkpoint interval known yet: grows now, booting them
    for t in (10.0, 10.2, 10.4):  # a checkpoint every 0.2 s: half the job idle for 0.2 s < a boot of 3 s
        job.events._events.append(Event(t, "checkpoint", "", {}))
    assert not inplace.room_to_grow(job, 4) and job.spares.count == 2 and job.spares.ahead_since == fake.now
    ahead = job.events.events[-1]
    assert ahead.fields == {"wanted": 4, "ahead": 2} and "a checkpoint every 0.2 s" in ahead.message
    job.spares.idle = {2: Spare("a2", 2, None, 0.0, node="n1"), 3: Spare("a3", 3, None, 0.0)}  # booted in them
    assert not inplace.room_to_grow(job, 4)  # one still booting: the job trains on
    job.spares.idle[3].node = "n1"
    assert inplace.room_to_grow(job, 4)  # both up: grow now, the new ranks take them
    job.spares.idle.clear()  # (taken by new_worker)
    inplace.boot_growth(job, 4, "heal")
    assert job.spares.count == 0 and job.spares.ahead_since is None
    slow = _job(pl, 2)
    slow.events._events += [Event(t, "checkpoint", "", {}) for t in (0.0, 60.0, 120.0)]  # every minute
    assert inplace.room_to_grow(slow, 4) and slow.spares.ahead_since is None  # 30 s idle > a boot: grow now
    stuck = _job(pl, 2)
    stuck.spares.boot_ahead(2)
    stuck.spares.idle = {2: Spare("a2", 2, None, 0.0), 3: Spare("a3", 3, None, 0.0, node="n1")}
    fake.now += 59.0
    assert not inplace.room_to_grow(stuck, 4)
    fake.now += 1.0  # not up within a minute: the booting one is ended, the job grows with a new process
    assert inplace.room_to_grow(stuck, 4) and stuck.spares.count == 0 and set(stuck.spares.idle) == {3}
    assert "did not come up in time" in stuck.events.events[-1].message


def test_reload_grows_in_place_where_it_can_and_waits_while_the_bundles_are_placed():
    cfg = RunConfig(num_workers=4, storage="memory://grow", min_workers=2, allow_grow=True)
    job = FakeDataParallelJob(cfg, world=2)
    job.grow_in_place = True
    out = ReloadPolicy().on_checkpoint(50, job)
    assert (out.action, out.policy, out.world_size, out.restore) == (RESTARTED, RELOAD, 4, job.point)
    assert job.calls == [("stop", "room for 4 workers again (grow back from 2 after step 50)"), ("find",),
                         ("start", 4, job.point)]
    for policy in (ReloadPolicy(), HealPolicy()):
        pending = FakeDataParallelJob(cfg, world=2)
        pending.growth_pending = True  # a group for the new ranks is being placed
        assert policy.on_checkpoint(50, pending) is None and pending.calls == []
        elsewhere = FakeDataParallelJob(cfg, world=2)  # neither: every worker restarts from the checkpoint
        out = policy.on_checkpoint(50, elsewhere)
        assert (out.action, out.world_size) == (RESTARTED, 4) and ("fit", 4, 2) in elsewhere.calls


def test_a_job_that_grows_in_place_never_falls_back_to_restarting_every_worker(monkeypatch):
    # room_to_grow saw no room (the holder of it not yet gone); a second look a moment later, for a
    # restart, would see it: the job waits for the next checkpoint instead of restarting everyone
    cfg = RunConfig(num_workers=4, storage="memory://grow", min_workers=2, allow_grow=True)
    for policy in (ReloadPolicy(), HealPolicy()):
        job = FakeDataParallelJob(cfg, world=2)  # room_to_grow: False (grow_in_place False), room_for(4): True
        job.grows_only_in_place = True
        assert policy.on_checkpoint(50, job) is None and job.calls == []
    FakeRay(monkeypatch)
    job = _job(_placement([]), 2)
    assert inplace.grows_only_in_place(job)
    job.placement.pg = None  # no group placed
    assert not inplace.grows_only_in_place(job)
    strict = _job(_placement([], placement_strategy="STRICT_SPREAD"), 2)
    assert not inplace.grows_only_in_place(strict)  # a second group would not keep it: a restart may grow it


def test_heal_boots_the_new_ranks_ahead_however_seldom_the_job_checkpoints(monkeypatch):
    # heal grows at the first poll after they are up, not at the next checkpoint: booting ahead
    # costs the missing ranks' share of a poll, growing at once every rank's boot.
    fake, events = FakeRay(monkeypatch), []
    pl = _placement(events)
    pl.pg, pl.size, pl.world = FakeGroup(4), 4, 4
    pl.pg.placed = True
    job = _job(pl, 2)
    job.events._events += [Event(t, "checkpoint", "", {}) for t in (0.0, 60.0, 120.0)]  # every minute
    assert not inplace.room_to_grow(job, 4, 0.2) and job.spares.ahead_since == fake.now
    ahead = job.events.events[-1]
    assert "grows back as soon as they are up" in ahead.message and "0.2 s after they are up" in ahead.message
    assert inplace.boot_ahead_pays(job, 2, 4)[0] is False  # reload (at the next checkpoint, a minute away): not
    job.spares.idle = {2: Spare("a2", 2, None, 0.0, node="n1"), 3: Spare("a3", 3, None, 0.0, node="n1")}
    assert inplace.room_to_grow(job, 4, 0.2)  # both up


def test_heal_grows_between_checkpoints_once_the_new_ranks_are_up_and_reload_waits_for_one():
    cfg = RunConfig(num_workers=4, storage="memory://grow", min_workers=2, allow_grow=True)
    job = FakeDataParallelJob(cfg, world=2)
    job.grow_in_place = True
    assert HealPolicy().on_progress(47, job) is None and job.calls == []  # nothing under way: not even looked
    job.growth_under_way = True  # bundles reserved at the last checkpoint; the new ranks booted since
    out = HealPolicy().on_progress(47, job)
    assert (out.action, out.policy, out.live_step, out.world_size, out.restore) == (RESTARTED, HEAL, 44, 4, None)
    assert job.calls == [("stop", "room for 4 workers again (grow back from 2 after step 47)"), ("start", 4, None),
                         ("heal", 4, 0, 44)]
    booting = FakeDataParallelJob(cfg, world=2)
    booting.growth_under_way = True  # (room_to_grow: still booting)
    assert HealPolicy().on_progress(47, booting) is None and booting.calls == []
    reload = FakeDataParallelJob(cfg, world=2)
    reload.grow_in_place = reload.growth_under_way = True
    assert ReloadPolicy().on_progress(47, reload) is None  # it restores a checkpoint: grows at one


def test_a_booting_spares_node_gets_its_agent_while_it_boots(monkeypatch):
    FakeRay(monkeypatch)
    events: list = []
    pl = _placement(events)
    pl.pg, pl.size, pl.world = FakeGroup(4), 4, 2
    pl.pg.placed = True
    job = _job(pl, 2)
    job.spares.boot_ahead(2)  # two new ranks boot ahead in bundles 2 and 3, on node n1
    job.standbys = SimpleNamespace(per_node=0)
    ensured: list[set] = []
    job.fleet = SimpleNamespace(agents={}, start=ensured.append, settle=lambda: None)
    monkeypatch.setattr(inplace.ray, "wait", lambda refs, **kw: ([], refs))
    inplace.tend_spares(job)
    assert set(job.spares.idle) == {2, 3} and ensured == [{"n1"}]  # started now (not waited for), not when they are up
    job.fleet.agents = {"n1": "agent"}
    job.spares.idle.pop(3)
    inplace.tend_spares(job)
    assert set(job.spares.idle) == {2, 3} and ensured == [{"n1"}]  # its node has one: not again
