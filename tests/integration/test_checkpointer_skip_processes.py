"""``when_busy="skip"`` on one rank of several: the step fails at once on every rank.

A rank whose host memory is all in use skips its snapshot while the others take theirs. Before,
nobody heard of it: the committer waited ``commit_timeout_s`` (600 s by default) for a fragment
that would never come, and where the committer skipped, every other writer waited as long for a
commit that would never happen; ``close()`` waited behind them. Now the skipping rank leaves its
failure marker and tells the others through the job's store.
"""

from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch

import ckpt
from ckpt import format as fmt

from ._multiproc import run_distributed

WORLD = 2
WAIT_S = 90  # far above the notice, far below commit_timeout_s: a wait that long is the bug


def _take_all_host_memory(ck: ckpt.Checkpointer) -> list:
    taken = []
    while (slab := ck.pool.acquire(1, block=False)) is not None:
        taken.append(slab)
    return taken


def skip_worker(rank: int, world: int, url: str, skipper: int, sockets: list[str] | None) -> dict:
    state = {f"w{i}": torch.full((512,), float(i)) for i in range(8)}  # each rank writes some of them
    out: dict = {}
    agent = f"unix://{sockets[rank]}" if sockets else None
    # Room for several snapshots (an agent holds one until the next commits): only the rank
    # whose memory the test takes skips.
    with ckpt.Checkpointer(url, every_n_steps=1, keep_last=None, when_busy="skip", commit_timeout_s=600,
                           agent=agent, host_budget_bytes=1 << 20) as ck:
        ck.save(1, state).committed.result(WAIT_S)
        taken = _take_all_host_memory(ck) if rank == skipper else []
        h2 = ck.save(2, state)
        out["skipped"] = h2.skipped
        if not h2.skipped:
            error = h2.committed.exception(timeout=WAIT_S)  # raises TimeoutError: the bug
            out["error"] = f"{type(error).__name__}: {error}"
        for slab in taken:
            ck.pool.release(slab)
        ck.save(3, state).committed.result(WAIT_S)  # and the job goes on checkpointing
        out["status_skipped"] = ck.status().skipped
    return out


@pytest.mark.parametrize("skipper", [1, 0], ids=["a_writer_skips", "the_committer_skips"])
@pytest.mark.parametrize("agents", [False, True], ids=["in_process", "node_agents"])
def test_a_snapshot_skipped_on_one_rank_fails_the_step_at_once_everywhere(tmp_path, skipper, agents):
    """With node agents (one per rank, as on two nodes), the committing agent hears the skip from
    its trainer, and the other agent from its trainer that the save failed (``NoticeCommit`` with
    an error), so no agent waits ``commit_timeout_s`` either."""
    url = str(tmp_path / "run")
    with contextlib.ExitStack() as stack:
        sockets = None
        if agents:
            if not sys.platform.startswith("linux"):
                pytest.skip("node agents need Linux (Unix sockets, shm)")
            from tests.helpers import local_agent

            sockets = []
            for name in "ab":
                (tmp_path / name).mkdir()
                stack.enter_context(local_agent(tmp_path / name, f"ckskip{os.getpid()}{name}"))
                sockets.append(str(tmp_path / name / "a.sock"))
        results = run_distributed(skip_worker, WORLD, url, skipper, sockets, tmp_path=tmp_path, timeout=4 * WAIT_S)
    other = 1 - skipper
    assert results[skipper]["skipped"] is True and results[skipper]["status_skipped"] == 1
    assert results[other]["skipped"] is False
    assert "rank0000%d: skipped its snapshot" % skipper in results[other]["error"], results[other]["error"]
    assert fmt.committed_steps(ckpt.open_storage(url)) == [1, 3]
