"""The agent's table of a committed step (``GetStepTable``: ``agent.daemon.steptable`` builds it
once per step for the node, ``agent.trainer.table`` restores from it): a restore of a known step
that every array of is held whole on the node takes one call and no listing; anything else is
refused with its reason and the restore lists the snapshots as before; memory that changed is
still never restored."""

from __future__ import annotations

import glob
import time
from array import array

import crc32c
import grpc
import pytest
import torch

import ckpt
from agent.daemon import steptable
from agent.pb import pb
from agent.trainer.client import AgentClient
from agent.trainer.table import StepColumns, TableError, TableSource
from ckpt.errors import CorruptCheckpointError, StateMismatchError
from ckpt.restore import Tier
from tests.helpers import local_agent
from tests.unit.test_direct_restore import _equal, _planned, _state, _zeros, saved_run


@pytest.fixture
def saved(tmp_path):
    yield from saved_run(tmp_path)


def test_a_step_that_commits_has_its_table_built_before_anyone_asks(tmp_path):
    with local_agent(tmp_path, "prebuilt") as (daemon, _shm):
        address, run = f"unix://{tmp_path / 'a.sock'}", str(tmp_path / "run")
        with ckpt.Checkpointer(run, agent=address, keep_last=None) as c:
            c.save(4, {"w": torch.randn(8, 8), "b": torch.randn(8)}, force=True).result(60)
        key = (ckpt.open_storage(run).url, 4)
        deadline = time.monotonic() + 30
        while key not in daemon.agent.step_tables._tables and time.monotonic() < deadline:
            time.sleep(0.01)
        _signature, table = daemon.agent.step_tables._tables[key]
        assert isinstance(table, pb.StepTable) and table.paths == b"b\nw"
        counted = daemon.metrics.step_tables
        assert _table(address, run, 4) == table
        with pytest.raises(grpc.RpcError):
            _table(address, run, 3)
        assert (counted.labels("served")._value.get(), counted.labels("refused")._value.get()) == (1, 1)


def _tensors(state: dict) -> dict[str, torch.Tensor]:
    return {**{f"model/{k}": v for k, v in state["model"].items()},
            **{f"exp_avg/{k}": v for k, v in state["exp_avg"].items()}, "half": state["half"]}


def _listings(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = AgentClient.stream_snapshots
    monkeypatch.setattr(AgentClient, "stream_snapshots", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _table(address: str, run: str, step: int) -> pb.StepTable:
    with AgentClient(address) as client:
        return client.trainer.GetStepTable(pb.StepTableRequest(run_url=ckpt.open_storage(run).url, step=step))


def test_a_known_step_held_whole_is_restored_from_the_table_without_a_listing(saved, monkeypatch):
    address, run, state, _shm = saved
    planned, listed = _planned(monkeypatch), _listings(monkeypatch)
    out = _zeros(state)
    with ckpt.Checkpointer(run, agent=address, keep_last=None) as c:
        assert c.restore(out, step=3) == 4
        source, report = c.last_restore_source, c.last_restore
        assert isinstance(source, TableSource) and source._full is None  # the full tier never built
    assert planned == [] and listed == [] and _equal(out, state)
    assert report.served == {Tier.AGENT_MEMORY: sum(t.nbytes for t in _tensors(state).values()), Tier.PEER: 0,
                             Tier.STORAGE: 0}
    assert report.fallbacks == ()


def test_the_table_says_where_every_array_lies_with_its_crc32c(saved):
    address, run, state, _shm = saved
    table = _table(address, run, 3)
    columns = StepColumns(table)
    tensors = _tensors(state)
    assert columns.paths == sorted(tensors) and len(table.segments) == 1
    assert columns.shapes == [tuple(tensors[p].shape) for p in columns.paths]
    assert columns.dtypes == [tensors[p].dtype for p in columns.paths]
    assert columns.sizes == [tensors[p].nbytes for p in columns.paths]
    assert columns.crcs == [crc32c.crc32c(tensors[p].view(torch.uint8).numpy().tobytes()) for p in columns.paths]
    assert columns.manifest["step"] == 3 and columns.manifest["values"] and "arrays" not in columns.manifest
    assert len(set(zip(columns.offsets, columns.sizes))) == len(columns.paths)  # each chunk its own bytes


def test_the_agent_builds_a_steps_table_as_it_commits_once_for_every_rank_of_the_node(saved, monkeypatch):
    address, run, _, _ = saved
    built: list[int] = []
    real = steptable.build
    monkeypatch.setattr(steptable, "build", lambda *a, **k: built.append(1) or real(*a, **k))
    tables = [_table(address, run, 3) for _ in range(4)]
    assert built in ([], [1]) and all(t == tables[0] for t in tables)  # built as the step committed (or by the first ask)
    with pytest.raises(grpc.RpcError) as e:  # a step it does not hold: NOT_FOUND, also asked again
        _table(address, run, 2)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "no snapshot of step 2" in e.value.details()


def test_a_step_not_held_whole_has_no_table_and_the_restore_lists_its_snapshots(tmp_path, monkeypatch):
    with local_agent(tmp_path, "nowhole") as (daemon, _shm):
        address, run = f"unix://{tmp_path / 'a.sock'}", str(tmp_path / "run")
        state = {"big": torch.randn(64, 64), "small": torch.randn(3)}
        tables = daemon.agent.step_tables
        with ckpt.Checkpointer(run, agent=address, keep_last=None, max_chunk_bytes=4096) as c:
            c.save(5, state, force=True).result(60)
            deadline = time.monotonic() + 30  # its table was tried as it committed: none, and why
            while not tables._not_whole and time.monotonic() < deadline:
                time.sleep(0.01)
            assert tables._not_whole == {ckpt.open_storage(run).url}
            c.save(6, state, force=True).result(60)  # a later step of that run: not prepared
            time.sleep(0.2)
            assert [key[1] for key in tables._tables] == [5]
        with pytest.raises(grpc.RpcError) as e:  # asked (by a restore), it is tried, and says why
            _table(address, run, 6)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "big" in e.value.details()
        assert "of step 6 is not whole in one chunk" in e.value.details()
        listed = _listings(monkeypatch)
        out = {"big": torch.zeros(64, 64), "small": torch.zeros(3)}
        with ckpt.Checkpointer(run, agent=address, keep_last=None) as c:
            assert c.restore(out, step=6) == 7
            assert not isinstance(c.last_restore_source, TableSource)
            assert c.last_restore.served[Tier.STORAGE] == 0
    assert listed == [1] and all(torch.equal(out[k], state[k]) for k in state)


def test_a_table_over_a_message_is_refused_with_its_size(tmp_path, monkeypatch):
    monkeypatch.setattr(steptable, "_SLACK", 1 << 40)
    with local_agent(tmp_path, "oversize") as _agent:
        address, run = f"unix://{tmp_path / 'a.sock'}", str(tmp_path / "run")
        with ckpt.Checkpointer(run, agent=address, keep_last=None) as c:
            c.save(1, {"w": torch.randn(4)}, force=True).result(60)
        with pytest.raises(grpc.RpcError) as e:
            _table(address, run, 1)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "max_message_bytes of" in e.value.details()
        out = {"w": torch.zeros(4)}
        with ckpt.Checkpointer(run, agent=address, keep_last=None) as c:  # listed instead
            assert c.restore(out, step=1) == 2 and c.last_restore.served[Tier.STORAGE] == 0
            assert not isinstance(c.last_restore_source, TableSource)


def test_what_the_table_does_not_cover_goes_to_the_full_tier_or_the_planned_load(saved, monkeypatch):
    address, run, state, _shm = saved
    planned = _planned(monkeypatch)
    out = _zeros(state)
    out["model"]["layers.0.w"] = torch.zeros(3, 4).t()  # not contiguous: the planned load
    with ckpt.Checkpointer(run, agent=address, keep_last=None) as c:
        assert c.restore(out, step=3) == 4
        assert c.last_restore.served[Tier.STORAGE] == 0
    assert planned == [1] and _equal(out, state)
    out = _zeros(state)  # a subset, not strict: the table declares more, so the commit point's way
    del out["exp_avg"]["layers.3.w"]
    with ckpt.Checkpointer(run, agent=address, keep_last=None) as c:
        assert c.restore(out, step=3, strict=False) == 4
        assert c.last_restore_source._full is not None and c.last_restore.served[Tier.STORAGE] == 0
    assert planned == [1]
    out["exp_avg"]["layers.3.w"] = state["exp_avg"]["layers.3.w"]
    assert _equal(out, state)
    out = _zeros(state)
    out["model"]["layers.1.w"] = torch.zeros(4, 3, dtype=torch.float64)
    with ckpt.Checkpointer(run, agent=address, keep_last=None) as c, \
            pytest.raises(StateMismatchError, match="dtype float32 in the checkpoint, float64 in the state"):
        c.restore(out, step=3)


def test_memory_that_changed_since_the_snapshot_is_never_restored_from_the_table(saved):
    address, run, state, shm = saved
    _table(address, run, 3)  # built before the memory changes
    for path in glob.glob(f"{shm}/direct*"):
        with open(path, "r+b") as f:
            data = bytearray(f.read())
            f.seek(0)
            f.write(bytes(b ^ 0xFF for b in data))
    with ckpt.Checkpointer(run, agent=address, keep_last=None) as c, pytest.raises(CorruptCheckpointError):
        c.restore(_zeros(state), step=3)


@pytest.mark.parametrize("bad", ["short_column", "segment_out_of_range", "beyond_the_segment", "kinds"])
def test_a_table_that_does_not_hold_together_is_refused(bad):
    table = pb.StepTable(step=1, save_id="s", manifest=b"{}", paths=b"a\nb", kinds=b'[[[2], "float32"]]',
                         kind_of=array("I", [0, 0]).tobytes(), segment_of=array("I", [0, 0]).tobytes(),
                         offsets=array("Q", [0, 64]).tobytes(), sizes=array("Q", [8, 8]).tobytes(),
                         crc32c=array("I", [1, 2]).tobytes(), segments=[pb.TableSegment(segment="x", nbytes=4096)])
    StepColumns(table)
    if bad == "short_column":
        table.offsets = array("Q", [0]).tobytes()
    elif bad == "segment_out_of_range":
        table.segment_of = array("I", [0, 1]).tobytes()
    elif bad == "beyond_the_segment":
        table.offsets = array("Q", [0, 4090]).tobytes()
    else:
        table.kinds = b'[[2, "float32"]]'
    with pytest.raises((TableError, TypeError)):
        StepColumns(table)


def test_an_optimizers_state_with_its_step_counters_restores_from_the_table(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    with local_agent(tmp_path, "tableadam") as _agent:
        address, run = f"unix://{tmp_path / 'a.sock'}", str(tmp_path / "run")
        with ckpt.Checkpointer(run, agent=address, keep_last=None) as c:
            c.save(2, {"model": model, "optim": opt, "extra": _state(2)["meta"]}, force=True).result(60)
        planned = _planned(monkeypatch)
        model2 = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
        opt2 = torch.optim.Adam(model2.parameters(), lr=0.1)
        model2(torch.randn(4, 6)).sum().backward()
        opt2.step()
        restored = {"model": model2, "optim": opt2, "extra": {}}
        with ckpt.Checkpointer(run, agent=address, keep_last=None) as c:
            assert c.restore(restored, step=2) == 3
            assert isinstance(c.last_restore_source, TableSource) and c.last_restore.served[Tier.STORAGE] == 0
    assert planned == [] and restored["extra"] == {"step": 7, "lr": 0.5}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert all(torch.equal(opt.state[p][k], opt2.state[p2][k]) for k in opt.state[p])


def _flip(shm, offset: int) -> None:
    (path,) = glob.glob(f"{shm}/direct*")
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_thousands_of_small_chunks_are_checked_as_a_few_runs(saved, monkeypatch):
    from agent.trainer import table as table_module

    address, run, state, shm = saved
    columns = StepColumns(_table(address, run, 3))
    assert 1 <= len(columns.run_crcs) < len(columns.paths) // 10  # 81 chunks, side by side
    covered = sorted(zip(columns.run_start, columns.run_end))
    assert all(any(a <= o and o + n <= b for a, b in covered) for o, n in zip(columns.offsets, columns.sizes))
    chunk_checks: list[int] = []
    real = table_module.fill
    monkeypatch.setattr(table_module, "fill", lambda *a, **k: chunk_checks.append(1) or real(*a, **k))
    out = _zeros(state)
    with ckpt.Checkpointer(run, agent=address, keep_last=None) as c:
        assert c.restore(out, step=3) == 4 and c.last_restore.served[Tier.STORAGE] == 0
    assert chunk_checks == [] and _equal(out, state)
    # A byte between two chunks changed: the run differs, the chunks are then checked one by one
    # (each still matches) and the restore is exact, from memory.
    ends = sorted(o + n for o, n in zip(columns.offsets, columns.sizes))
    gap = next(e for e in ends if e not in set(columns.offsets) and e < max(columns.run_end))
    _flip(shm, gap)
    out = _zeros(state)
    with ckpt.Checkpointer(run, agent=address, keep_last=None) as c:
        assert c.restore(out, step=3) == 4 and c.last_restore.served[Tier.STORAGE] == 0
    assert chunk_checks == [1] and _equal(out, state)


def test_a_chunk_that_changed_before_the_table_was_built_means_no_table(tmp_path):
    with local_agent(tmp_path, "direct") as (daemon, shm):
        address, run = f"unix://{tmp_path / 'a.sock'}", str(tmp_path / "run")
        state = {"a": torch.randn(16), "b": torch.randn(16)}
        with ckpt.Checkpointer(run, agent=address, keep_last=None) as c:
            c.save(2, state, force=True).result(60)
        columns = StepColumns(_table(address, run, 2))
        daemon.agent.step_tables._tables.clear()
        _flip(shm, columns.offsets[1] + 3)
        with pytest.raises(grpc.RpcError) as e:
            _table(address, run, 2)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "does not match its crc32c" in e.value.details()
        with ckpt.Checkpointer(run, agent=address, keep_last=None) as c, \
                pytest.raises(CorruptCheckpointError, match="'b' chunk 0"):  # listed, checked, refused as before
            c.restore({"a": torch.zeros(16), "b": torch.zeros(16)}, step=2)


def test_large_chunks_have_no_runs(tmp_path):
    with local_agent(tmp_path, "bigruns") as _agent:
        address, run = f"unix://{tmp_path / 'a.sock'}", str(tmp_path / "run")
        state = {"big": torch.randn(256, 128), "small": torch.randn(4)}
        with ckpt.Checkpointer(run, agent=address, keep_last=None) as c:
            c.save(1, state, force=True).result(60)
        columns = StepColumns(_table(address, run, 1))
        assert columns.run_crcs == [] and columns.paths == ["big", "small"]
        out = {"big": torch.zeros(256, 128), "small": torch.zeros(4)}
        with ckpt.Checkpointer(run, agent=address, keep_last=None) as c:
            assert c.restore(out, step=1) == 2 and isinstance(c.last_restore_source, TableSource)
            assert c.last_restore.served[Tier.STORAGE] == 0
        assert torch.equal(out["big"], state["big"]) and torch.equal(out["small"], state["small"])
