"""A job that commits itself with node agents on several nodes (``ckpt.Checkpointer(agent=...)``,
a process group, no coordinator): the trainers tell each other through the job's store and each
tells its own agent (``agent.trainer.relay``): the committing agent that every writer persisted
(it then reads each fragment once), the others that the save committed. No agent polls storage
once its run has been told.

Two trainer processes joined by gloo, each with its own node agent (two agents in the test's
process stand for two nodes). The agents' slow poll for told runs is made 10 minutes: a save
that committed in time, on both nodes, was told, not found by polling.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time

import pytest
import torch
from torch import nn

import ckpt
from tests.helpers import local_agent

from ._multiproc import run_distributed

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux (Unix sockets, shm)")
STEPS = 4


def relay_worker(rank: int, world: int, run_url: str, sockets: list[str]) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))  # 4 arrays, spread over both writers
    committed = []
    with ckpt.Checkpointer(run_url, agent=f"unix://{sockets[rank]}", every_n_steps=1, keep_last=None,
                           commit_timeout_s=120) as c:
        for step in range(STEPS):
            with torch.no_grad():
                model[0].weight.add_(1.0)
            h = c.save(step, {"model": model})
            committed.append(h.committed.result(90).step)  # guard: a notice lost waits 10 minutes
            deadline = time.monotonic() + 60
            while rank == 0 and step == 0 and c.sink.relay.told_persisted < 1 and time.monotonic() < deadline:
                time.sleep(0.01)  # the first save's persist notice reached the agent before the second commits
        relay = c.sink.relay
    return {"committed": committed, "told": relay.told if relay is not None else None,
            "told_persisted": relay.told_persisted if relay is not None else None,
            "relay_thread_alive": relay._thread.is_alive() if relay is not None else None}


def test_the_agents_are_told_of_each_persist_and_commit_through_the_jobs_store(tmp_path, monkeypatch):
    from agent.daemon.core import Agent

    commit_module = sys.modules["ckpt.commit"]  # (ckpt.commit is also the function of that name)

    monkeypatch.setattr(Agent, "TOLD_POLL_S", (600.0, 600.0))
    notices: dict[str, list[int]] = {"a": [], "b": []}
    persisted: dict[str, list[tuple[int, str]]] = {"a": [], "b": []}
    fragment_reads: collections.Counter = collections.Counter()
    lock = threading.Lock()
    real, real_persisted, real_read = Agent.notice_commit, Agent.notice_persisted, commit_module.read_fragment

    def counting(self, run_url, step, save_id, error=""):
        with lock:
            notices[self.config.shm_prefix[-1]].append(step)
        return real(self, run_url, step, save_id, error)

    def counting_persisted(self, run_url, step, save_id, error=""):
        with lock:
            persisted[self.config.shm_prefix[-1]].append((step, error))
        return real_persisted(self, run_url, step, save_id, error)

    def counting_reads(storage, step, writer, **kw):
        with lock:
            fragment_reads[(step, writer)] += 1
        return real_read(storage, step, writer, **kw)

    monkeypatch.setattr(Agent, "notice_commit", counting)
    monkeypatch.setattr(Agent, "notice_persisted", counting_persisted)
    monkeypatch.setattr(commit_module, "read_fragment", counting_reads)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    run_url = str(tmp_path / "run")
    with local_agent(tmp_path / "a", f"ckrel{os.getpid()}a"), local_agent(tmp_path / "b", f"ckrel{os.getpid()}b"):
        results = run_distributed(relay_worker, 2, run_url, [str(tmp_path / "a" / "a.sock"),
                                                              str(tmp_path / "b" / "a.sock")], tmp_path=tmp_path)
    assert [r["committed"] for r in results] == [list(range(STEPS))] * 2
    # rank 0's agent commits: told, once per save, that every writer persisted; rank 1's is told
    # of every commit, once
    assert results[0]["told"] == 0 and results[1]["told"] == STEPS
    assert results[0]["told_persisted"] == STEPS and results[1]["told_persisted"] == 0
    assert notices == {"a": [], "b": list(range(STEPS))}
    assert persisted == {"a": [(s, "") for s in range(STEPS)], "b": []}
    # once told, the committing agent reads rank 1's fragment once per save (the first save: polled)
    assert all(fragment_reads[(s, "rank00001")] == 1 for s in range(1, STEPS)), fragment_reads
    assert [r["relay_thread_alive"] for r in results] == [False, False]  # closed with the Checkpointer
    steps = ckpt.list_steps(ckpt.open_storage(run_url))
    assert [s.step for s in steps if s.committed] == list(range(STEPS))
