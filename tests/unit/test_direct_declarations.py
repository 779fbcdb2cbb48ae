"""The one-pass restore's commit point compared as text (``ckpt.direct._declarations``): the
declarations the state implies, written as our writer writes them, against the commit point's;
equal text restores without parsing them, anything else is matched tensor by tensor or goes to
the planned load, which refuses what it always refused. Also: small chunks copied out of the
segment's mapping beside large ones read with ``preadv``, and a restore of a known step that
lists only that step's snapshots."""

from __future__ import annotations

import json

import pytest
import torch

import ckpt
from ckpt import direct
from ckpt import format as fmt
from ckpt.errors import StateMismatchError
from ckpt.restore import Tier
from ckpt.storage import open_storage
from tests.helpers import local_agent
from tests.unit.test_direct_restore import _equal, _planned, _state, _zeros, saved_run


@pytest.fixture
def saved(tmp_path):
    yield from saved_run(tmp_path)


def _parses(monkeypatch) -> list[int]:
    """Count the commit points the one pass parses whole (the text comparison parses none)."""
    calls: list[int] = []
    real = direct.fmt.parse_root
    monkeypatch.setattr(direct.fmt, "parse_root", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _leaves(state: dict) -> list[tuple[str, torch.Tensor]]:
    from ckpt.state import flatten

    return [(p, t) for p, t, is_tensor in flatten(state) if is_tensor]


def test_declarations_equal_as_text_are_not_parsed(saved, monkeypatch):
    address, run, state, _shm = saved
    planned, parses = _planned(monkeypatch), _parses(monkeypatch)
    out = _zeros(state)
    with ckpt.Checkpointer(run, agent=address, keep_last=None) as c:
        assert c.restore(out) == 4
        assert c.last_restore.served[Tier.STORAGE] == 0
    assert planned == [] and parses == [] and _equal(out, state)


@pytest.mark.parametrize("consolidate", ["never", "kept"])
def test_the_manifest_read_around_the_declarations_is_the_parsed_one(tmp_path, consolidate):
    """The rest of the commit point (values, writers, seal; the writer runs and the zarr metadata
    left out) reads as the parsed document does, for a packs step and a consolidated one."""
    run = str(tmp_path / "run")
    state = _state(12)
    with ckpt.Checkpointer(run, keep_last=None, consolidate=consolidate) as c:
        c.save(3, state, force=True).result(60)
    data = open_storage(run).read(f"{fmt.step_dir(3)}/{fmt.META}")
    parsed = fmt.parse_root(data, "zarr.json")["attributes"][fmt.MANIFEST_KEY]
    assert ("consolidated_metadata" in json.loads(data)) == (consolidate == "kept") and parsed.get("writer_runs")
    found = direct._declarations(data, _leaves(state), "3/")
    assert found is not None
    manifest, keyed = found
    assert {k: v for k, v in manifest.items() if k not in ("arrays", "writer_runs")} == \
           {k: v for k, v in parsed.items() if k not in ("arrays", "writer_runs")}
    assert sorted(k for k, _ in keyed) == sorted(f"3/{a['path']}/c.{'.'.join('0' * len(a['shape']))}".rstrip(".")
                                                 if a["shape"] else f"3/{a['path']}/c" for a in parsed["arrays"])
    # One tensor of another shape, dtype, or one tensor more or fewer: not this text
    for change in ({"model": {**state["model"], "layers.0.w": torch.zeros(3, 4)}},
                   {"half": state["half"].float()}, {"extra": torch.zeros(2)}):
        assert direct._declarations(data, _leaves({**state, **change}), "3/") is None
    assert direct._declarations(data, _leaves({k: v for k, v in state.items() if k != "half"}), "3/") is None
    damaged = bytearray(data)
    damaged[data.index(b'"dtype":"float32"') + 10] ^= 1  # a byte of the declarations: the seal refuses it
    assert direct._declarations(bytes(damaged), _leaves(state), "3/") is None


@pytest.mark.parametrize("key", ["w\u00e9ight", 'a"b', "tab\there"])
def test_a_path_json_escapes_is_matched_one_by_one(tmp_path, monkeypatch, key):
    with local_agent(tmp_path, "escaped") as _agent:
        address, run = f"unix://{tmp_path / 'a.sock'}", str(tmp_path / "run")
        state = {"model": {key: torch.randn(4, 3), "b": torch.randn(3)}}
        with ckpt.Checkpointer(run, agent=address, keep_last=None) as c:
            c.save(1, state, force=True).result(60)
        planned, parses = _planned(monkeypatch), _parses(monkeypatch)
        out = {"model": {key: torch.zeros(4, 3), "b": torch.zeros(3)}}
        with ckpt.Checkpointer(run, agent=address, keep_last=None) as c:
            assert c.restore(out) == 2
    assert planned == [] and parses == [1]  # still one pass, the commit point parsed
    assert all(torch.equal(out["model"][k], state["model"][k]) for k in state["model"])


def test_declarations_changed_behind_a_valid_seal_are_refused_by_the_planned_load(saved, monkeypatch):
    """A commit point rewritten with one shape changed and sealed again: the text differs, the
    tensor-by-tensor match refuses it, and the planned load says why."""
    address, run, state, _shm = saved
    storage = open_storage(run)
    path = f"{fmt.step_dir(3)}/{fmt.META}"
    doc = fmt.parse_root(storage.read(path), path)
    doc["attributes"].pop(fmt.SEAL_KEY)
    for a in doc["attributes"][fmt.MANIFEST_KEY]["arrays"]:
        if a["path"] == "model/layers.2.w":
            a["shape"] = a["chunk_shape"] = [3, 4]
    storage.write_atomic(path, fmt.dumps(fmt.seal_root(doc)))
    planned = _planned(monkeypatch)
    with ckpt.Checkpointer(run, agent=address, keep_last=None) as c, pytest.raises(StateMismatchError, match="layers.2.w"):
        c.restore(_zeros(state))
    assert planned == [1]


def test_small_and_large_chunks_of_one_state_are_both_read_from_memory(tmp_path, monkeypatch):
    """Chunks below ``spans.SMALL`` are copied out of the mapping, the others read with preadv."""
    from agent.trainer import spans

    g = torch.Generator().manual_seed(5)
    state = {"big": torch.randn(256, 512, generator=g), "small": {f"s{i}": torch.randn(7, generator=g) for i in range(30)},
             "mid": torch.randn(spans.SMALL // 4, generator=g)}  # exactly SMALL bytes: not small
    copied: list[int] = []  # bytes of each memmove
    preadv: list[int] = []  # chunks of each pread_many
    real_move, real_many = spans._memmove, spans.pread_many
    monkeypatch.setattr(spans, "_memmove", lambda d, s, n: copied.append(n) or real_move(d, s, n))
    monkeypatch.setattr(spans, "pread_many", lambda fd, got: preadv.append(len(got)) or real_many(fd, got))
    with local_agent(tmp_path, "sizes") as _agent:
        address, run = f"unix://{tmp_path / 'a.sock'}", str(tmp_path / "run")
        with ckpt.Checkpointer(run, agent=address, keep_last=None) as c:
            c.save(1, state, force=True).result(60)
        out = {"big": torch.zeros(256, 512), "small": {k: torch.zeros(7) for k in state["small"]},
               "mid": torch.zeros(spans.SMALL // 4)}
        with ckpt.Checkpointer(run, agent=address, keep_last=None) as c:
            assert c.restore(out) == 2
            report = c.last_restore
    assert copied == [7 * 4] * 30 and sum(preadv) == 2
    assert torch.equal(out["big"], state["big"]) and torch.equal(out["mid"], state["mid"])
    assert all(torch.equal(out["small"][k], v) for k, v in state["small"].items())
    assert report.served[Tier.AGENT_MEMORY] == (256 * 512 + 30 * 7 + spans.SMALL // 4) * 4
    assert report.served[Tier.STORAGE] == 0


def test_a_restore_of_a_known_step_lists_only_that_steps_snapshots(tmp_path):
    """The agent holds each writer's newest committed snapshot (and any newer one in flight, and
    replicas): a restore of a known step takes in the chunk indexes of that step's only."""
    with local_agent(tmp_path, "steps") as _agent:
        address, run = f"unix://{tmp_path / 'a.sock'}", str(tmp_path / "run")
        with ckpt.Checkpointer(run, agent=address, keep_last=None) as c:
            for step in (1, 2, 3):
                c.save(step, {"w": torch.full((4,), float(step))}, force=True).result(60)
        with ckpt.Checkpointer(run, agent=address, keep_last=None) as c:
            assert c.sink.restore_source(c.storage).steps_in_memory == [3]
            assert c.sink.restore_source(c.storage, step=3).steps_in_memory == [3]
            assert c.sink.restore_source(c.storage, step=2).steps_in_memory == []
            assert [i.key.step for i in c.sink.client.stream_snapshots(c.sink.run_url, steps=[2, 3])] == [3]
            assert list(c.sink.client.stream_snapshots(c.sink.run_url, steps=[1, 2])) == []
            for step in (3, 2):
                out = {"w": torch.zeros(4)}
                assert c.restore(out, step=step) == step + 1 and torch.equal(out["w"], torch.full((4,), float(step)))
                assert c.last_restore_source.steps_in_memory == ([3] if step == 3 else [])
                assert (c.last_restore.served[Tier.STORAGE] == 0) == (step == 3)
