"""A node agent told of a commit by the committer (the job's coordinator) reads the commit point
once, at once, instead of polling storage for it (``Agent.notice_commit``)."""

from __future__ import annotations

import collections
import threading

import pytest
from torch import nn

import ckpt
from ckpt import format as fmt
from ckpt.commit import wait_for_commit_point, wait_for_fragments
from tests.helpers import local_agent


def _counting_reads(monkeypatch) -> collections.Counter:
    reads: collections.Counter = collections.Counter()
    real = fmt.read_manifest_bytes

    def counting(storage, step):
        reads[step] += 1
        return real(storage, step)

    monkeypatch.setattr(fmt, "read_manifest_bytes", counting)
    return reads


@pytest.mark.parametrize("told", ["in_process", "rpc"])
def test_a_commit_announced_to_the_agent_is_read_once_not_polled_for(tmp_path, monkeypatch, told):
    """``rpc``: told over the agent's socket (``NoticeCommit``), as a job whose node agents run
    outside it (a DaemonSet) is told, through a process of the job on the node."""
    from agent.daemon.core import Agent
    from agent.trainer.client import AgentClient

    monkeypatch.setattr(Agent, "TOLD_POLL_S", (60.0, 60.0))  # only the notice can end the wait in time
    reads = _counting_reads(monkeypatch)
    with local_agent(tmp_path, "cknotice") as (daemon, _shm):
        with ckpt.Checkpointer(tmp_path / "run", agent=f"unix://{tmp_path}/a.sock", every_n_steps=1,
                               commit_by="external", commit_timeout_s=120) as c:
            model = nn.Linear(4, 2)
            for step in (1, 2):
                h = c.save(step, {"model": model})
                save = f"{c.run_id}-{step}"
                wait_for_fragments(c.storage, step, save, c.writers, timeout_s=60, poll_s=0.01)
                ckpt.commit(c.storage, step, c.writers, save_id=save)
                if told == "rpc":
                    with AgentClient(f"unix://{tmp_path}/a.sock") as client:
                        client.notice_commit(c.storage.url, step, save)
                else:
                    daemon.agent.notice_commit(c.storage.url, step, save)
                assert h.committed.result(60).step == step
    # step 1: polled for (the agent did not know commits would be announced); step 2: read once
    assert reads[1] >= 1 and reads[2] == 1


def test_wait_for_commit_point_is_woken_and_stops(tmp_path):
    with ckpt.Checkpointer(tmp_path, every_n_steps=1) as c:
        c.save(0, {"w": nn.Linear(2, 2).weight.detach()}).committed.result(60)
    storage = ckpt.open_storage(tmp_path)
    save = fmt.read_manifest(storage, 0).save_id
    wake = threading.Event()
    wake.set()  # told before the wait began: read at once, though the first poll is a minute away
    m, data = wait_for_commit_point(storage, 0, save, timeout_s=60, poll_s=60, max_poll_s=60, wake=wake)
    assert m.save_id == save and data and not wake.is_set()
    stop, wake = threading.Event(), threading.Event()
    out: list = []

    def waiter() -> None:
        try:
            wait_for_commit_point(storage, 7, "never", timeout_s=120, poll_s=60, max_poll_s=60, stop=stop, wake=wake)
        except ckpt.CkptError as e:
            out.append(e)

    t = threading.Thread(target=waiter)
    t.start()
    stop.set()
    wake.set()  # as an agent's close does
    t.join(30)
    assert not t.is_alive() and "closed before the commit" in str(out[0])


def test_a_notice_without_its_run_or_save_is_refused(tmp_path):
    import grpc

    from agent.trainer.client import AgentClient

    with local_agent(tmp_path, "cknoticebad"), AgentClient(f"unix://{tmp_path}/a.sock") as client:
        for run_url, save in (("", "s-1"), ("file:///r", "")):
            with pytest.raises(grpc.RpcError) as e:
                client.notice_commit(run_url, 1, save)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
