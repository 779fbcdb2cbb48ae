"""Warm standbys (``recovery.spares.Standbys``) without Ray: booted per node, ready once their
warm-up answers, taken for a rank on their node only after they took over its GPUs, dropped when
their process or node is gone."""

from __future__ import annotations

from typing import Any

import pytest
from ray.exceptions import RayActorError

from recovery import spares


class _Ref:
    def __init__(self, value: Any = None, error: Exception | None = None, done: bool = True) -> None:
        self.value, self.error, self.done = value, error, done


class _FakeRay:
    @staticmethod
    def wait(refs: list[_Ref], num_returns: int = 1, timeout: float | None = None) -> tuple[list[_Ref], list[_Ref]]:
        done = [r for r in refs if r.done]
        return done, [r for r in refs if not r.done]

    @staticmethod
    def get(ref: _Ref, timeout: float | None = None) -> Any:
        if ref.error is not None:
            raise ref.error
        return ref.value


class _Actor:
    def __init__(self, node: str, pid: int, adopts: bool = True) -> None:
        self.node, self.pid, self.adopts, self.adopted = node, pid, adopts, None
        self.adopt = self  # actor.adopt.remote(gpus)

    def remote(self, gpus: list[Any]) -> _Ref:
        self.adopted = gpus
        return _Ref(self.adopts)


@pytest.fixture
def fake_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spares, "ray", _FakeRay)


def _standbys(per_node: int = 1) -> tuple[spares.Standbys, list[_Actor], list[_Actor], dict[int, _Ref]]:
    booted: list[_Actor] = []
    killed: list[_Actor] = []
    warm: dict[int, _Ref] = {}  # pid -> the ref its warm-up answers with

    def boot(node: str) -> _Actor:
        actor = _Actor(node, 100 + len(booted))
        booted.append(actor)
        warm[actor.pid] = _Ref({"pid": actor.pid}, done=False)
        return actor

    return spares.Standbys(per_node, boot=boot, kill=killed.append, warm=lambda a: warm[a.pid]), booted, killed, warm


def test_standbys_boot_per_node_answer_when_warm_and_go_with_a_lost_node(fake_ray: None) -> None:
    sb, booted, killed, warm = _standbys(per_node=2)
    assert sb.tend({"a", "b"}, lost=set()) == ["a", "a", "b", "b"]
    assert sb.tend({"a", "b"}, lost=set()) == []  # each node has its two
    assert sb.newly_ready() == [] and sb.take("a", []) is None  # still booting: a new process is as fast
    warm[booted[0].pid].done = True
    (ready,) = sb.newly_ready()
    assert (ready.node, ready.pid) == ("a", booted[0].pid) and sb.newly_ready() == []
    assert sb.tend({"a", "b"}, lost={"b"}) == [] and "b" not in sb.idle  # a lost node's standbys are killed
    assert sorted(a.pid for a in killed) == [booted[2].pid, booted[3].pid]


def test_a_standby_is_taken_on_its_node_only_once_it_took_over_the_gpus(fake_ray: None) -> None:
    sb, booted, killed, warm = _standbys(per_node=2)
    sb.tend({"a"}, lost=set())
    for a in booted:
        warm[a.pid].done = True
    assert sb.take("b", ["3"]) is None and sb.take(None, []) is None  # none on that node
    booted[0].adopts = False  # CUDA already initialised there: it cannot take the GPU
    got = sb.take("a", ["3"])
    assert got is not None and got.actor is booted[1] and booted[1].adopted == ["3"] and sb.taken == 1
    assert killed == [booted[0]] and sb.idle["a"] == []  # the one that could not is gone
    sb.tend({"a"}, lost=set())  # refilled
    assert len(sb.idle["a"]) == 2


def test_a_standby_whose_process_died_is_dropped_not_taken(fake_ray: None) -> None:
    sb, booted, killed, warm = _standbys()
    sb.tend({"a"}, lost=set())
    warm[booted[0].pid].done = True
    warm[booted[0].pid].error = RayActorError()
    assert sb.take("a", []) is None and killed == [booted[0]] and sb.idle["a"] == []
    sb.drop()
    assert sb.idle == {}
