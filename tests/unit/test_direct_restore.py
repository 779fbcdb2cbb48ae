"""The one-pass restore (``ckpt.direct``): a state of plain CPU tensors whose chunks a node agent
holds whole is restored straight from its memory without the manifest's typed declarations, a
load plan or a locator; anything else, and anything wrong, goes to the planned load, which
restores or refuses exactly as before. Also: the save plan of a tensor held whole, and the
first checkpoint's preparation, are what the general code makes."""

from __future__ import annotations

import gc
import glob
import threading

import pytest
import torch

import ckpt
from ckpt import replicated
from ckpt.errors import CorruptCheckpointError, StateMismatchError
from ckpt.restore import Tier
from tests.helpers import local_agent


def _state(n: int = 40) -> dict:
    g = torch.Generator().manual_seed(3)
    model = {f"layers.{i}.w": torch.randn(4, 3, generator=g) for i in range(n)}
    return {"model": model, "exp_avg": {k: torch.randn(4, 3, generator=g) for k in model},
            "half": torch.randn(5, generator=g).to(torch.bfloat16), "meta": {"step": 7, "lr": 0.5}}


def _zeros(state: dict) -> dict:
    return {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()},
            "exp_avg": {k: torch.zeros_like(v) for k, v in state["exp_avg"].items()},
            "half": torch.zeros_like(state["half"]), "meta": {}}


def _equal(a: dict, b: dict) -> bool:
    return (all(torch.equal(a["model"][k], b["model"][k]) and torch.equal(a["exp_avg"][k], b["exp_avg"][k])
                for k in a["model"]) and torch.equal(a["half"], b["half"]) and a["meta"] == b["meta"])


def saved_run(tmp_path):
    """A run saved through an agent that still holds it; yields (address, run, state, shm dir)."""
    with local_agent(tmp_path, "direct") as (_daemon, shm):
        address = f"unix://{tmp_path / 'a.sock'}"
        state = _state()
        with ckpt.Checkpointer(str(tmp_path / "run"), agent=address, keep_last=None) as c:
            c.save(3, state, force=True).result(60)
        yield address, str(tmp_path / "run"), state, shm


@pytest.fixture
def saved(tmp_path):
    yield from saved_run(tmp_path)


def _planned(monkeypatch) -> list[int]:
    """Count the planned loads (the direct path makes none)."""
    calls: list[int] = []
    real = replicated.plan_load
    monkeypatch.setattr(replicated, "plan_load", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_a_state_held_whole_in_agent_memory_is_restored_in_one_pass(saved, monkeypatch):
    address, run, state, _shm = saved
    planned = _planned(monkeypatch)
    out = _zeros(state)
    with ckpt.Checkpointer(run, agent=address, keep_last=None) as c:
        assert c.restore(out) == 4
        report = c.last_restore
    assert planned == [] and _equal(out, state)
    assert report.served[Tier.AGENT_MEMORY] == sum(t.nbytes for t in (*state["model"].values(),
                                                                   *state["exp_avg"].values(), state["half"]))
    assert report.served[Tier.STORAGE] == 0 and report.fallbacks == ()


def test_a_model_and_its_adam_state_take_the_one_pass(tmp_path, monkeypatch):
    """An optimizer's state (0-d step counters among its tensors) is restored in one pass too."""
    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
        return model, torch.optim.Adam(model.parameters(), lr=0.1)

    model, opt = build()
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 6)).sum().backward()
        opt.step()
    with local_agent(tmp_path, "directadam") as _agent:
        address = f"unix://{tmp_path / 'a.sock'}"
        with ckpt.Checkpointer(str(tmp_path / "run"), agent=address, keep_last=None) as c:
            c.save(3, {"model": model, "optim": opt}, force=True).result(60)
        planned = _planned(monkeypatch)
        model2, opt2 = build()
        with ckpt.Checkpointer(str(tmp_path / "run"), agent=address, keep_last=None) as c:
            assert c.restore({"model": model2, "optim": opt2}) == 4
            assert c.last_restore.served[Tier.STORAGE] == 0
    assert planned == []
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    for p, p2 in zip(model.parameters(), model2.parameters()):
        s, s2 = opt.state[p], opt2.state[p2]
        assert s.keys() == s2.keys() and all(torch.equal(s[k], s2[k]) for k in s)


@pytest.mark.parametrize("change", ["non_contiguous", "view_into_a_larger_tensor", "from_storage"])
def test_what_the_one_pass_does_not_cover_goes_to_the_planned_load(saved, monkeypatch, change):
    address, run, state, _shm = saved
    planned = _planned(monkeypatch)
    out = _zeros(state)
    agent = address
    if change == "non_contiguous":
        out["model"]["layers.0.w"] = torch.zeros(3, 4).t()
    elif change == "view_into_a_larger_tensor":  # a view into a larger tensor: still contiguous, planned
        out["model"]["layers.0.w"] = torch.zeros(5, 3)[1:]
    else:
        agent = None
    with ckpt.Checkpointer(run, agent=agent, keep_last=None) as c:
        assert c.restore(out) == 4
    assert _equal(out, state)
    assert planned == ([] if change == "view_into_a_larger_tensor" else [1])


def test_entries_on_one_side_only_are_skipped_by_the_one_pass_too_when_not_strict(saved, monkeypatch):
    address, run, state, _shm = saved
    planned = _planned(monkeypatch)
    out = _zeros(state)
    out["model"]["not.saved"] = torch.full((2,), 5.0)
    del out["exp_avg"]["layers.3.w"]
    with ckpt.Checkpointer(run, agent=address, keep_last=None) as c:
        assert c.restore(out, strict=False) == 4
    assert planned == [] and torch.equal(out["model"].pop("not.saved"), torch.full((2,), 5.0))
    out["exp_avg"]["layers.3.w"] = state["exp_avg"]["layers.3.w"]
    assert _equal(out, state)
    with ckpt.Checkpointer(run, agent=address, keep_last=None) as c, pytest.raises(StateMismatchError, match="not.saved"):
        c.restore({**out, "model": {**out["model"], "not.saved": torch.zeros(2)}})  # strict: refused, as before


def test_a_mismatch_is_refused_by_the_planned_load_with_its_message(saved):
    address, run, state, _shm = saved
    out = _zeros(state)
    out["model"]["layers.1.w"] = torch.zeros(4, 3, dtype=torch.float64)
    with ckpt.Checkpointer(run, agent=address, keep_last=None) as c, \
            pytest.raises(StateMismatchError, match="dtype float32 in the checkpoint, float64 in the state"):
        c.restore(out)


def test_memory_that_changed_since_the_snapshot_is_never_restored(saved):
    address, run, state, shm = saved
    segments = glob.glob(f"{shm}/direct*")
    assert segments
    for path in segments:  # every byte of the held snapshot flipped
        with open(path, "r+b") as f:
            data = bytearray(f.read())
            f.seek(0)
            f.write(bytes(b ^ 0xFF for b in data))
    out = _zeros(state)
    with ckpt.Checkpointer(run, agent=address, keep_last=None) as c, pytest.raises(CorruptCheckpointError):
        c.restore(out)


def test_the_collector_pause_holds_while_any_thread_pauses_it():
    from ckpt.gcpause import gc_paused

    assert gc.isenabled()
    inside, release = threading.Event(), threading.Event()

    def other():
        with gc_paused():
            inside.set()
            release.wait(10)

    t = threading.Thread(target=other)
    with gc_paused():
        t.start()
        inside.wait(10)
    assert not gc.isenabled()  # the other thread's pause outlives this one
    release.set()
    t.join()
    assert gc.isenabled()


@pytest.mark.parametrize("world", [1, 3, 8])
def test_the_save_plan_of_tensors_held_whole_is_the_general_plan(world):
    from ckpt.layout import layout_of
    from ckpt.plan import TensorItem, plan_items
    from ckpt.planning import plan_array_writes

    shapes = [(8, 8), (3,), (1000, 300), (5, 0), (), (64, 1024), (7, 3, 2)]
    for rank in range(world):
        items = []
        for i, shape in enumerate(shapes):
            local, layout = layout_of(torch.randn(*shape) if shape else torch.tensor(1.0), rank=rank, world=world)
            items.append(TensorItem(f"a{i}", local, layout))
        for max_chunk_bytes in (1 << 20, 4096, 100):
            plan = plan_items(items, {}, max_chunk_bytes=max_chunk_bytes)
            general, metadata = [], []
            for it in items:
                mine = plan_array_writes(it.path, plan.arrays[it.path], it.tensor, it.layout)
                general += mine
                if any(not any(r.index) for r in mine):
                    metadata.append(plan.arrays[it.path])
            assert [(r.path, r.index, r.slices, r.chunk_shape, r.separator, id(r.tensor)) for r in plan.requests] == \
                   [(r.path, r.index, r.slices, r.chunk_shape, r.separator, id(r.tensor)) for r in general]
            assert plan.metadata == metadata


def test_a_recovery_checkpointer_restores_the_step_the_launcher_chose(tmp_path):
    """``ctx.checkpointer.restore(state)`` in a ``train_fn`` loads the launcher's step (no rank
    waits for rank 0 to list the steps); with no step chosen, the newest committed."""
    from recovery.worker import RecoveryCheckpointer, Reporter

    class Calls:  # a coordinator that takes every fire-and-forget call
        def __getattr__(self, name):
            return type("Method", (), {"remote": staticmethod(lambda *a, **k: None)})()

    run = str(tmp_path / "run")
    with ckpt.Checkpointer(run) as c:
        for step in (2, 4):
            c.save(step, {"w": torch.full((3,), float(step))}, force=True)
    for chosen, expect in ((2, 3), (None, 5)):
        reporter = Reporter(Calls(), 1, 0, 1, None, 60.0)
        out = {"w": torch.zeros(3)}
        with RecoveryCheckpointer(run, reporter=reporter, restore_step=chosen) as c:
            assert c.restore(out) == expect
        assert torch.equal(out["w"], torch.full((3,), float(expect - 1)))
