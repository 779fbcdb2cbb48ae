"""A job that commits itself with node agents on several nodes (``ckpt.Checkpointer(agent=...)``,
a process group, no coordinator): the committer's trainer tells the others through the job's
store and each tells its own agent (``agent.trainer.relay``), so no agent polls storage for a
commit once it has been told of one.

Two trainer processes joined by gloo, each with its own node agent (two agents in the test's
process stand for two nodes). The agents' slow poll for told runs is made 10 minutes: a commit
that reached the second node's agent in time was told, not found by polling.
"""

from __future__ import annotations

import os
import sys
import threading

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
        relay = c.sink.relay
    return {"committed": committed, "told": relay.told if relay is not None else None,
            "relay_thread_alive": relay._thread.is_alive() if relay is not None else None}


def test_the_other_nodes_agents_are_told_of_each_commit_through_the_jobs_store(tmp_path, monkeypatch):
    from agent.daemon.core import Agent

    monkeypatch.setattr(Agent, "TOLD_POLL_S", (600.0, 600.0))
    notices: dict[str, list[int]] = {"a": [], "b": []}
    lock = threading.Lock()
    real = Agent.notice_commit

    def counting(self, run_url, step, save_id):
        with lock:
            notices[self.config.shm_prefix[-1]].append(step)
        return real(self, run_url, step, save_id)

    monkeypatch.setattr(Agent, "notice_commit", counting)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    run_url = str(tmp_path / "run")
    with local_agent(tmp_path / "a", f"ckrel{os.getpid()}a"), local_agent(tmp_path / "b", f"ckrel{os.getpid()}b"):
        results = run_distributed(relay_worker, 2, run_url, [str(tmp_path / "a" / "a.sock"),
                                                              str(tmp_path / "b" / "a.sock")], tmp_path=tmp_path)
    assert [r["committed"] for r in results] == [list(range(STEPS))] * 2
    # rank 0's agent commits (told of nothing); rank 1's is told of every commit, once
    assert results[0]["told"] == 0 and results[1]["told"] == STEPS
    assert notices == {"a": [], "b": list(range(STEPS))}
    assert [r["relay_thread_alive"] for r in results] == [False, False]  # closed with the Checkpointer
    steps = ckpt.list_steps(ckpt.open_storage(run_url))
    assert [s.step for s in steps if s.committed] == list(range(STEPS))
