"""The ``ckpt.Checkpointer`` hook API in a real 3-process gloo job where a rank dies.

A rank dies (``os._exit``) after its snapshot of a step is staged, while it persists it: that
step is never committed, the committer (and the other survivor) report a ``CommitError`` in
``status()`` within ``commit_timeout_s`` (plus one poll), the survivors' ``save`` keeps
returning at once, the previous committed step stays loadable, and a resumed run commits the
failed step over the dead attempt's debris.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import ckpt
from ckpt import format as fmt
from ckpt.storage import LocalStorage

from ._checks import assert_bitexact, not_bits
from ._multiproc import run_distributed
from .test_checkpointer_ddp_processes import named_state

DEATH_WORLD = 3
VICTIM = 2
DEATH_CODE = 43
DIES_AT = 4  # checkpoints at 2 (committed), 4 (the victim dies persisting it), 6 (after the death)
DEATH_STEPS = 7
COMMIT_TIMEOUT_S = 2.0


class DyingStorage(LocalStorage):
    """Local storage on which this process dies (``os._exit``) at its first write into one step:
    the snapshot of that step was staged (persisting starts only after staging), and persisting
    it never finishes, so no fragment and no failure marker are ever written."""

    def __init__(self, root: str, step: int) -> None:
        super().__init__(root)
        self.prefix = fmt.step_dir(step) + "/"

    def _maybe_die(self, path: str) -> None:
        if path.startswith(self.prefix):
            os._exit(DEATH_CODE)

    def write(self, path: str, parts: Any, *, durable: bool = True) -> None:
        self._maybe_die(path)
        super().write(path, parts, durable=durable)

    def write_atomic(self, path: str, data: bytes) -> None:
        self._maybe_die(path)
        super().write_atomic(path, data)


def replicated_job(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, dict]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4))
    optim = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, optim, {"model": model, "optim": optim, "steps_done": 0}


def replicated_step(model: nn.Module, optim: torch.optim.Optimizer, state: dict, step: int) -> None:
    """The same full batch on every rank: the replicas stay identical without communicating."""
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(8, 6, generator=g), torch.randn(8, 4, generator=g)
    optim.zero_grad()
    F.mse_loss(model(x), y).backward()
    optim.step()
    state["steps_done"] = step


def dying_rank_worker(rank: int, world: int, url: str) -> dict:
    model, optim, state = replicated_job(seed=0)
    storage = DyingStorage(url, DIES_AT) if rank == VICTIM else url
    ckptr = ckpt.Checkpointer(storage, every_n_steps=2, keep_last=2, commit_timeout_s=COMMIT_TIMEOUT_S)
    ckptr.attach(optim)
    handles: dict[int, ckpt.SnapshotHandle] = {}
    for step in (1, 2):
        replicated_step(model, optim, state, step)
        handle = ckptr.save(step, state)
        assert (handle is not None) == (step == 2)
    handles[2] = handle
    ref = named_state(model, optim)
    handles[2].result(timeout=60)  # committed everywhere before anyone dies

    save_s: dict[int, float] = {}
    resolved_after: dict[int, float] = {}
    t_loop = time.monotonic()
    for step in range(3, DEATH_STEPS + 1):
        replicated_step(model, optim, state, step)
        t = time.monotonic()
        handle = ckptr.save(step, state)
        save_s[step] = time.monotonic() - t
        if handle is None:
            continue
        handles[step] = handle
        handle.committed.add_done_callback(lambda f, s=step, t=t: resolved_after.__setitem__(s, time.monotonic() - t))
        if rank == VICTIM and step == DIES_AT:
            handle.staged.result(timeout=30)  # staged; persisting it ends this process
    loop_s = time.monotonic() - t_loop
    states_after_loop = {s: h.state.value for s, h in handles.items()}
    if rank == VICTIM:
        time.sleep(30)
        raise AssertionError(f"rank {rank} should have died persisting step {DIES_AT}")

    # The survivors were never held up: every save returned at once, the loop ran while the
    # checkpoint of step 4 was still waiting for the dead rank.
    assert sorted(handles) == [2, 4, 6] and not any(h.skipped for h in handles.values())
    assert max(save_s.values()) < 1.0, save_s
    assert loop_s < COMMIT_TIMEOUT_S, f"the training loop took {loop_s:.2f} s"
    assert states_after_loop[2] == "committed"
    assert states_after_loop[4] in ("captured", "staged", "persisted"), states_after_loop
    assert states_after_loop[6] in ("captured", "staged", "persisted"), states_after_loop

    ckptr.wait()  # returns: the failures are reported, not raised (on_error="warn")
    status = ckptr.status()
    ckptr.close()
    assert status.last_committed == 2 and status.failed == 2 and status.in_flight == 0, status
    assert [(c["step"], c["state"]) for c in status.checkpoints] == [(2, "committed"), (4, "failed"), (6, "failed")]
    for s in (4, 6):
        handles[s].persisted.result(timeout=0)  # this rank's own part was written
        assert isinstance(handles[s].error, ckpt.CommitError), handles[s].error
        assert any(f"checkpoint of step {s} failed: CommitError" in e for e in status.errors), status.errors
    error = str(handles[DIES_AT].error)
    if rank == 0:  # the committer names the writer it waited for, and how long it did
        waited = re.search(rf"no fragment from {fmt.writer_name(VICTIM)} after (\d+) s", error)
        assert waited and int(waited.group(1)) >= round(COMMIT_TIMEOUT_S), error  # the whole wait, not what was left
    else:  # its own wait ended, or the committer's failure (told through the store) came first
        assert "not committed after" in error or (
            "the committer failed" in error and f"no fragment from {fmt.writer_name(VICTIM)}" in error), error
    # Reported within commit_timeout_s, plus at most one poll interval (1 s) and some slack.
    assert COMMIT_TIMEOUT_S <= resolved_after[DIES_AT] < COMMIT_TIMEOUT_S + 2.5, resolved_after
    return {"ref": ref, "steps_done": 2}


def test_rank_dying_while_persisting_never_commits(tmp_path) -> None:
    url = str(tmp_path / "run")
    results = run_distributed(dying_rank_worker, DEATH_WORLD, url, tmp_path=tmp_path, expect_exit={VICTIM: DEATH_CODE})
    assert results[VICTIM] is None
    storage = ckpt.open_storage(url)
    assert [(s.step, s.committed) for s in fmt.list_steps(storage)] == [(2, True), (4, False), (6, False)]
    for s in (4, 6):
        frags = set(storage.list_dir(f"{fmt.step_dir(s)}/{fmt.FRAGMENTS}"))
        assert not any(n.startswith(fmt.writer_name(VICTIM)) for n in frags), frags  # no fragment, no marker
        for r in range(DEATH_WORLD):
            if r != VICTIM:
                assert fmt.read_fragment(storage, s, fmt.writer_name(r)).step == s

    # The previous committed step is the newest, and loads bit for bit.
    ref = results[0]["ref"]
    tree = {"model": {k: not_bits(t) for k, t in ref["model"].items()},
            "optim": {"state": {n: {k: not_bits(t) for k, t in s.items()} for n, s in ref["optim"].items()},
                      "param_groups": None},
            "steps_done": None}
    assert ckpt.load(tree, url) == 2
    for k, t in ref["model"].items():
        assert_bitexact(tree["model"][k], t, f"model {k}")
    for n, s in ref["optim"].items():
        for k, t in s.items():
            assert_bitexact(tree["optim"]["state"][n][k], t, f"optim {n} {k}")
    assert tree["steps_done"] == 2

    # A resumed run (one process) restores step 2 and commits step 4 over the dead attempt's debris.
    model, optim, state = replicated_job(seed=7)
    with ckpt.Checkpointer(url, every_n_steps=2, keep_last=2, commit_timeout_s=30) as ckptr:
        start = ckptr.restore(state)
        assert start == 3 and state["steps_done"] == 2
        for k, t in ref["model"].items():
            assert_bitexact(model.state_dict()[k], t, f"restored {k}")
        ckptr.attach(optim)
        for step in range(start, DIES_AT + 1):
            replicated_step(model, optim, state, step)
            handle = ckptr.save(step, state)
        manifest = handle.result(timeout=60)
    assert manifest.step == DIES_AT and manifest.writers == (fmt.writer_name(0),)
    assert ckpt.committed_steps(storage) == [2, DIES_AT]
    expected = named_state(model, optim)
    tree["steps_done"] = None
    assert ckpt.load(tree, url) == DIES_AT
    for k, t in expected["model"].items():
        assert_bitexact(tree["model"][k], t, f"step {DIES_AT}: model {k}")
    for n, s in expected["optim"].items():
        for k, t in s.items():
            assert_bitexact(tree["optim"]["state"][n][k], t, f"step {DIES_AT}: optim {n} {k}")
    assert tree["steps_done"] == DIES_AT
