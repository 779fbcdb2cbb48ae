"""What keeps a restore of thousands of small arrays cheap: the cycle collector paused while its
documents and plans are built, the save id read from a commit point's first bytes, the agent's
chunk index built as a snapshot is persisted (not on the first listing of a restore), and the
plan of a plain tensor made without walking its layout. Counts and values, never times."""

from __future__ import annotations

import gc
import json

import pytest
import torch

import ckpt
from agent.config import AgentConfig
from agent.trainer.held import save_of
from ckpt.gcpause import gc_paused, without_gc
from ckpt.manifest import ArraySpec, ManifestError
from ckpt.plan import plan_load


def test_the_collector_is_paused_and_left_as_it_was_found():
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        assert without_gc(gc.isenabled)() is False
        assert not gc.isenabled()  # the user's choice stays
    finally:
        gc.enable()
    with pytest.raises(ZeroDivisionError):
        without_gc(lambda: 1 / 0)()
    assert gc.isenabled()


def test_a_restore_builds_its_plan_with_the_collector_paused(tmp_path, monkeypatch):
    from ckpt import replicated

    state = {f"w{i}": torch.full((3, 2), float(i)) for i in range(50)}
    with ckpt.Checkpointer(str(tmp_path / "run")) as c:
        c.save(1, state, force=True)
    seen = []
    real = replicated.plan_load
    monkeypatch.setattr(replicated, "plan_load", lambda *a, **k: seen.append(gc.isenabled()) or real(*a, **k))
    out = {k: torch.zeros_like(v) for k, v in state.items()}
    with ckpt.Checkpointer(str(tmp_path / "run")) as c:
        assert c.restore(out) == 2
    assert seen == [False] and gc.isenabled()
    assert all(torch.equal(out[k], v) for k, v in state.items())


def test_the_save_id_is_read_from_the_first_bytes_and_else_parsed(tmp_path):
    state = {f"layers.{i}.w": torch.randn(2, 2) for i in range(300)}
    with ckpt.Checkpointer(str(tmp_path / "run")) as c:
        c.save(7, state, force=True)
    data = (tmp_path / "run" / ckpt.format.step_dir(7) / "zarr.json").read_bytes()
    assert save_of(data) == json.loads(data)["attributes"]["ckpt"]["save_id"]
    # laid out otherwise (another writer, a tool that rewrote it): parsed
    doc = json.loads(data)
    other = json.dumps({"attributes": doc["attributes"], "zarr_format": 3, "node_type": "group"}).encode()
    assert save_of(other) == doc["attributes"]["ckpt"]["save_id"]


def test_a_plain_tensors_plan_is_the_general_plan(tmp_path):
    state = {"a": torch.randn(4, 3), "b": torch.randn(5), "s": torch.tensor(2.0), "e": torch.empty(0, 3),
             "big": torch.randn(64, 8)}
    with ckpt.Checkpointer(str(tmp_path / "run"), max_chunk_bytes=512) as c:  # "big" in several chunks
        c.save(1, state, force=True)
    manifest = ckpt.format.read_manifest(ckpt.open_storage(str(tmp_path / "run")), 1)
    assert manifest.arrays["big"].num_chunks > 1
    plan = plan_load({k: torch.zeros_like(v) for k, v in state.items()}, manifest)
    by_path = {}
    for r in plan.requests:
        by_path.setdefault(r.path, []).append(r)
    assert len(by_path["a"]) == 1 and by_path["a"][0].targets[0].dst == (slice(0, 4), slice(0, 3))
    assert len(by_path["big"]) == manifest.arrays["big"].num_chunks
    with pytest.raises(ckpt.StateMismatchError, match="dtype"):
        plan_load({**state, "a": state["a"].double()}, manifest)
    with pytest.raises(ckpt.StateMismatchError, match="shape"):
        plan_load({**state, "a": torch.zeros(3, 4)}, manifest)


@pytest.mark.parametrize("bad", [{"path": "../x"}, {"path": "a//b"}, {"path": "a/zarr.json"}, {"shape": [2, True]},
                                 {"chunk_shape": [0, 2]}, {"shape": [2]}, {"chunk_separator": "-"}, {"layout": []}])
def test_an_array_declaration_that_is_not_well_formed_is_refused(bad):
    good = {"path": "m/w", "shape": [2, 2], "dtype": "float32", "chunk_shape": [2, 2], "layout": {}, "chunk_separator": "."}
    assert ArraySpec.from_dict(good).shape == (2, 2)
    with pytest.raises(ManifestError):
        ArraySpec.from_dict({**good, **bad})


def test_the_agent_indexes_a_snapshot_as_it_persists(tmp_path):
    from agent.daemon import AgentDaemon

    shm = tmp_path / "shm"
    shm.mkdir()
    d = AgentDaemon(AgentConfig(socket_path=str(tmp_path / "a.sock"), memory_budget_bytes=64 << 20,
                                shm_dir=str(shm), shm_prefix="idxtest", log_format="text"))
    d.start()
    try:
        state = {f"w{i}": torch.randn(4, 4) for i in range(40)}
        with ckpt.Checkpointer(str(tmp_path / "run"), agent=f"unix://{tmp_path / 'a.sock'}") as c:
            c.save(3, state, force=True).result(60)
            held = [s for s in d.agent.snapshots() if s.step == 3]
            # before any listing: the index is there, with every chunk's crc32c
            assert held and all(s.chunk_index and s.chunk_index_crcs for s in held)
            index = json.loads(held[0].chunk_index)
            assert len(index["spans"]) == 40 and all(sp[3] is not None for sp in index["spans"])
    finally:
        d.stop()
