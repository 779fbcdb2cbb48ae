"""The agent fleet's starts without Ray: ``start`` does not wait for an agent (the driver's loop
goes on while it boots beside a hot spare), ``settle`` registers those up and drops one whose start
failed, ``ensure`` waits for those it needs (one already starting too) and raises what a start
raised; a lost node's starting agent is killed. (With Ray, a new node's agent beside a rank booted
ahead: tests/integration/test_recovery_nodes.py.)
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from ray.exceptions import GetTimeoutError, RayActorError

import recovery.fleet as fleet_mod
from recovery.config import RunConfig


class Ref:
    def __init__(self, actor: FakeAgent) -> None:
        self.actor = actor


class FakeAgent:
    def __init__(self, node: str) -> None:
        self.node, self.up, self.error, self.killed = node, False, None, False
        self.info = SimpleNamespace(remote=lambda: Ref(self))
        self.wait_stopped = SimpleNamespace(remote=lambda: ("stopped", node))
        self.set_upstream = SimpleNamespace(remote=lambda leader: None)


class FakeRay:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.actors: list[FakeAgent] = []
        monkeypatch.setattr(fleet_mod, "ray", self)
        monkeypatch.setattr(fleet_mod, "NodeAffinitySchedulingStrategy", lambda node, soft: node)

    def remote(self, cls):
        ray = self

        class Options:
            def options(self, *, scheduling_strategy, **kw):
                return SimpleNamespace(remote=lambda *a, **k: ray._new(scheduling_strategy))

        return Options()

    up_at_once = False

    def _new(self, node: str) -> FakeAgent:
        self.actors.append(FakeAgent(node))
        self.actors[-1].up = self.up_at_once
        return self.actors[-1]

    def wait(self, refs, num_returns, timeout):
        done = [r for r in refs if r.actor.up or r.actor.error]
        return done, [r for r in refs if r not in done]

    def get(self, ref, timeout):
        if ref.actor.error:
            raise ref.actor.error
        if not ref.actor.up:
            raise GetTimeoutError("not up")
        return {"address": f"unix:///{ref.actor.node}"}

    def kill(self, actor, no_restart):
        actor.killed = True


def _fleet() -> tuple[fleet_mod.AgentFleet, list]:
    events: list = []
    fleet = fleet_mod.AgentFleet(RunConfig(num_workers=4, storage="memory://f"), "job", "coord", "memory://f",
                                 lambda kind, msg, **f: events.append(msg))
    return fleet, events


def test_start_does_not_wait_and_settle_registers_the_agents_once_up(monkeypatch):
    ray = FakeRay(monkeypatch)
    fleet, events = _fleet()
    fleet.start({"n1", "n2"})
    assert fleet.starting == {"n1", "n2"} and fleet.agents == {} and len(ray.actors) == 2
    fleet.start({"n1"})  # starting already: not twice
    assert len(ray.actors) == 2
    fleet.settle()  # none up: nothing registered, nothing waited for
    assert fleet.agents == {} and fleet.starting == {"n1", "n2"}
    ray.actors[0].up = True
    fleet.settle()
    assert set(fleet.agents) == {"n1"} and fleet.address == {"n1": "unix:///n1"} and fleet.starting == {"n2"}
    assert list(fleet.watch.values()) == ["n1"] and events == ["agent up on node n1 at unix:///n1"]
    ray.actors[1].error = RayActorError()  # its start failed: dropped with a warning, its actor killed
    fleet.settle()
    assert set(fleet.agents) == {"n1"} and fleet.starting == set() and ray.actors[1].killed
    assert events[-1].startswith("the agent on node n2 did not start")


def test_ensure_waits_for_an_agent_already_starting_and_raises_what_its_start_raised(monkeypatch):
    ray = FakeRay(monkeypatch)
    fleet, _ = _fleet()
    fleet.start({"n1", "n2"})  # n1 comes up later; n2's start fails
    ray.up_at_once = True  # (the agents started from now on)
    ray.actors[0].up = True
    fleet.ensure({"n1", "n3"})  # n1 starting: waited for, not started again; n3 started and waited for
    assert [a.node for a in ray.actors] == ["n1", "n2", "n3"] and set(fleet.agents) == {"n1", "n3"}
    ray.actors[1].error = RayActorError()
    with pytest.raises(RayActorError):
        fleet.ensure({"n2"})
    assert ray.actors[1].killed and fleet.starting == set() and "n2" not in fleet.agents
    fleet.ensure({"n2"})  # a later ensure starts another
    assert "n2" in fleet.agents and len(ray.actors) == 4


def test_a_lost_nodes_starting_agent_is_killed_and_forgotten(monkeypatch):
    ray = FakeRay(monkeypatch)
    fleet, _ = _fleet()
    fleet.coordinator = SimpleNamespace(forget_agent=SimpleNamespace(remote=lambda node: None),
                                        set_agents=SimpleNamespace(remote=lambda agents: None))
    fleet.start({"n1"})
    fleet.drop_node("n1")
    assert ray.actors[0].killed and fleet.starting == set()
