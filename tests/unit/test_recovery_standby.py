"""Warm standbys (``recovery.spares.Standbys``) without Ray: booted per node, ready once their
warm-up answers, taken for a rank on their node (a booted one first, else one still booting),
dropped when their process or node is gone; a standby takes the lost process's GPUs."""

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
    def __init__(self, node: str, pid: int) -> None:
        self.node, self.pid, self.dead = node, pid, False
        self.node_info = self  # actor.node_info.remote()

    def remote(self) -> _Ref:
        return _Ref(error=RayActorError()) if self.dead else _Ref({"pid": self.pid})


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
    assert sb.newly_ready() == []
    warm[booted[0].pid].done = True
    (ready,) = sb.newly_ready()
    assert (ready.node, ready.pid) == ("a", booted[0].pid) and sb.newly_ready() == []
    assert sb.tend({"a", "b"}, lost={"b"}) == [] and "b" not in sb.idle  # a lost node's standbys are killed
    assert sorted(a.pid for a in killed) == [booted[2].pid, booted[3].pid]


def test_a_standby_is_taken_on_its_node_a_booted_one_first_then_one_still_booting(fake_ray: None) -> None:
    sb, booted, killed, warm = _standbys(per_node=2)
    sb.tend({"a"}, lost=set())
    warm[booted[1].pid].done = True
    assert sb.take("b") is None and sb.take(None) is None  # none on that node
    first = sb.take("a")
    assert first is not None and first.actor is booted[1] and first.pid == booted[1].pid and sb.taken == 1
    second = sb.take("a")  # still booting: further on than a process started now
    assert second is not None and second.actor is booted[0] and second.pid is None and sb.taken == 2
    assert sb.take("a") is None and killed == []
    sb.tend({"a"}, lost=set())  # refilled
    assert len(sb.idle["a"]) == 2


def test_a_standby_whose_process_died_is_dropped_not_taken(fake_ray: None) -> None:
    sb, booted, killed, warm = _standbys()
    sb.tend({"a"}, lost=set())
    warm[booted[0].pid].done = True
    warm[booted[0].pid].error = RayActorError()
    assert sb.take("a") is None and killed == [booted[0]] and sb.idle["a"] == []
    sb.tend({"a"}, lost=set())
    warm[booted[1].pid].done = True
    assert [s.pid for s in sb.newly_ready()] == [booted[1].pid]
    booted[1].dead = True  # it died idle, after it booted
    assert sb.take("a") is None and killed == [booted[0], booted[1]] and sb.idle["a"] == []
    sb.drop()
    assert sb.idle == {}


def test_a_standby_found_dead_is_reported(fake_ray: None) -> None:
    """What the job logs as a ``spare`` event (``dead=True``): never dropped silently."""
    heard: list[tuple[str, str]] = []
    sb, booted, _killed, warm = _standbys()
    sb._on_dead = lambda node, why: heard.append((node, why))
    sb.tend({"a"}, lost=set())
    warm[booted[0].pid].done = True
    warm[booted[0].pid].error = RayActorError()
    assert sb.take("a") is None
    sb.tend({"a"}, lost=set())
    warm[booted[1].pid].done = True
    assert sb.newly_ready()
    booted[1].dead = True
    assert sb.take("a") is None
    assert [n for n, _ in heard] == ["a", "a"]
    assert "died before it was used" in heard[0][1] and f"(pid {booted[1].pid}) no longer answers" in heard[1][1]


def test_a_standby_takes_the_lost_processs_gpus_unless_it_initialised_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import torch

    from recovery import worker_process

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    worker_process._take_devices(("3",))
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    worker_process._take_devices(("3",))  # already so: nothing to change
    with pytest.raises(RuntimeError, match="initialised CUDA before it was given GPU"):
        worker_process._take_devices(("5", "6"))
