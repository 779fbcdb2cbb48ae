"""``when_busy="skip"`` on one rank of several: the step fails at once on every rank.

A rank whose host memory is all in use skips its snapshot while the others take theirs. Before,
nobody heard of it: the committer waited ``commit_timeout_s`` (600 s by default) for a fragment
that would never come, and where the committer skipped, every other writer waited as long for a
commit that would never happen; ``close()`` waited behind them. Now the skipping rank leaves its
failure marker and tells the others through the job's store.
"""

from __future__ import annotations

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


def skip_worker(rank: int, world: int, url: str, skipper: int) -> dict:
    state = {f"w{i}": torch.full((512,), float(i)) for i in range(8)}  # each rank writes some of them
    out: dict = {}
    with ckpt.Checkpointer(url, every_n_steps=1, keep_last=None, when_busy="skip", commit_timeout_s=600) as ck:
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
def test_a_snapshot_skipped_on_one_rank_fails_the_step_at_once_everywhere(tmp_path, skipper):
    url = str(tmp_path / "run")
    results = run_distributed(skip_worker, WORLD, url, skipper, tmp_path=tmp_path, timeout=4 * WAIT_S)
    other = 1 - skipper
    assert results[skipper]["skipped"] is True and results[skipper]["status_skipped"] == 1
    assert results[other]["skipped"] is False
    assert "rank0000%d: skipped its snapshot" % skipper in results[other]["error"], results[other]["error"]
    assert fmt.committed_steps(ckpt.open_storage(url)) == [1, 3]
