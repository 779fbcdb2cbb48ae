"""Corruption is detected; uncommitted steps are invisible; commit refuses incomplete fragments."""

from __future__ import annotations

import json
import os

import pytest
import torch

import ckpt
from ckpt import format as fmt
from tests.helpers import save_as_writers


def _saved(tmp_path, step=1):
    state = {"w": torch.randn(8, 4), "b": torch.randn(4)}
    ckpt.save(state, tmp_path, step=step, max_chunk_bytes=32, layout="chunks")  # w: 4 chunk files of 2 rows
    return state


def _chunk(tmp_path, path="w", index="1.0", step=1):
    return tmp_path / fmt.step_dir(step) / path / f"c.{index}"


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_chunk_is_detected_by_load_naming_tensor_and_chunk(tmp_path, damage):
    _saved(tmp_path)
    p = _chunk(tmp_path)
    data = bytearray(p.read_bytes())
    if damage == "flip":
        data[5] ^= 0x40
        p.write_bytes(bytes(data))
    elif damage == "truncate":
        p.write_bytes(bytes(data[:-3]))
    else:
        p.unlink()
    with pytest.raises(ckpt.CorruptCheckpointError) as e:
        ckpt.load({"w": torch.zeros(8, 4), "b": torch.zeros(4)}, tmp_path)
    assert len(e.value.problems) == 1
    problem = e.value.problems[0]
    assert "'w'" in problem and "chunk 1.0" in problem
    assert {"flip": "checksum", "truncate": "truncated", "delete": "missing"}[damage] in problem


def test_flipped_checksum_byte_and_slow_path_are_detected(tmp_path):
    _saved(tmp_path)
    p = _chunk(tmp_path, index="0.0")
    data = bytearray(p.read_bytes())
    data[-1] ^= 1  # the stored crc itself
    p.write_bytes(bytes(data))
    # A resharded destination takes the copying path: still checked.
    with pytest.raises(ckpt.CorruptCheckpointError, match="checksum"):
        ckpt.load({"w": ckpt.Sharded(torch.zeros(3, 4), dim=0, rank=0, world=3, logical_size=8),
                   "b": torch.zeros(4)}, tmp_path)


def test_uncommitted_step_is_invisible(tmp_path):
    _saved(tmp_path, step=1)
    _saved(tmp_path, step=2)
    (tmp_path / fmt.step_dir(2) / "zarr.json").unlink()  # a save that never reached its commit point
    storage = ckpt.open_storage(tmp_path)
    assert ckpt.committed_steps(storage) == [1]
    assert [(s.step, s.committed) for s in ckpt.list_steps(storage)] == [(1, True), (2, False)]
    assert ckpt.load({"w": torch.zeros(8, 4), "b": torch.zeros(4)}, tmp_path) == 1
    with pytest.raises(ckpt.CheckpointNotFoundError):
        ckpt.load({"w": torch.zeros(8, 4), "b": torch.zeros(4)}, tmp_path, step=2)
    # Saving the step again replaces the leftovers.
    ckpt.save({"w": torch.ones(8, 4), "b": torch.ones(4)}, tmp_path, step=2)
    out = {"w": torch.zeros(8, 4), "b": torch.zeros(4)}
    assert ckpt.load(out, tmp_path) == 2 and torch.equal(out["w"], torch.ones(8, 4))


def test_no_committed_checkpoint(tmp_path):
    with pytest.raises(ckpt.CheckpointNotFoundError, match="no committed checkpoint"):
        ckpt.load({"w": torch.zeros(1)}, tmp_path / "empty")


def _write_only(states, storage, step, skip=(), save_id="s"):
    st = ckpt.open_storage(storage)
    for r, state in enumerate(states):
        if r in skip:
            continue
        plan = ckpt.plan_save(state, rank=r, world=len(states), max_chunk_bytes=16)
        ckpt.write_plan(st, plan, step=step, writer=fmt.writer_name(r), save_id=save_id, layout="chunks")
    return st


def test_commit_refuses_a_missing_writer_and_leaves_nothing_visible(tmp_path):
    states = [{"w": ckpt.Sharded(torch.ones(2, 2) * r, dim=0, rank=r, world=2)} for r in range(2)]
    st = _write_only(states, tmp_path, 1, skip=(1,))
    with pytest.raises(ckpt.CommitError, match="rank00001 has not written its fragment"):
        ckpt.commit(st, 1, [fmt.writer_name(0), fmt.writer_name(1)], save_id="s")
    assert ckpt.committed_steps(st) == []


def test_commit_refuses_uncovered_chunks_and_stale_fragments(tmp_path):
    states = [{"w": ckpt.Sharded(torch.ones(2, 2) * r, dim=0, rank=r, world=2)} for r in range(2)]
    st = _write_only(states, tmp_path, 1)
    with pytest.raises(ckpt.CommitError, match="different saves"):
        ckpt.commit(st, 1, [fmt.writer_name(0), fmt.writer_name(1)], save_id="other")
    # A fragment that claims fewer chunks than the grid has: coverage check.
    frag_path = tmp_path / fmt.step_dir(1) / ".fragments" / "rank00001.json"
    doc = json.loads(frag_path.read_text())
    doc["chunk_table"] = {"array": [], "index": [], "nbytes": [], "crc32c": []}
    doc.pop("ckpt_crc32c", None)  # as a writer would have written it, not a corrupted file
    frag_path.write_text(json.dumps(doc))
    with pytest.raises(ckpt.CommitError, match="not written by any writer"):
        ckpt.commit(st, 1, [fmt.writer_name(0), fmt.writer_name(1)], save_id="s")
    # A chunk recorded but absent from storage: the listing check.
    st = _write_only(states, tmp_path, 2)
    os.remove(tmp_path / fmt.step_dir(2) / "w" / "c.1.0")
    with pytest.raises(ckpt.CommitError, match="is missing"):
        ckpt.commit(st, 2, [fmt.writer_name(0), fmt.writer_name(1)], save_id="s")
    assert ckpt.committed_steps(st) == []


def test_commit_refuses_disagreeing_declarations(tmp_path):
    # Two ranks passing different plain tensors under one name: not silently "replicated".
    states = [{"w": torch.ones(3)}, {"w": torch.ones(4)}]
    st = _write_only(states, tmp_path, 1)
    with pytest.raises(ckpt.CommitError, match="declare its layout"):
        ckpt.commit(st, 1, [fmt.writer_name(0), fmt.writer_name(1)], save_id="s")


def test_damaged_manifest_is_a_format_error(tmp_path):
    _saved(tmp_path)
    root = tmp_path / fmt.step_dir(1) / "zarr.json"
    root.write_text(root.read_text()[:-10])
    with pytest.raises(ckpt.FormatError, match="not valid JSON"):
        ckpt.load({"w": torch.zeros(8, 4), "b": torch.zeros(4)}, tmp_path)
    doc = {"zarr_format": 3, "node_type": "group", "attributes": {"ckpt": {"format": "ckpt", "format_version": 99}}}
    root.write_text(json.dumps(doc))
    with pytest.raises(ckpt.FormatError, match="upgrade"):
        ckpt.read_manifest(ckpt.open_storage(tmp_path), 1)


def test_multi_writer_helper_round_trip(tmp_path):
    full = torch.arange(20.0).reshape(10, 2)
    states = [{"w": ckpt.Sharded(p.clone(), dim=0, rank=r, world=2)} for r, p in enumerate(full.chunk(2))]
    m = save_as_writers(states, tmp_path, step=4, max_chunk_bytes=8)
    assert m.writers == ("rank00000", "rank00001")
    out = {"w": torch.zeros(10, 2)}
    ckpt.load(out, tmp_path)
    assert torch.equal(out["w"], full)


@pytest.mark.parametrize("layout", ["packs", "shards"])
def test_commit_point_seal_checked_on_its_bytes_and_a_flipped_digit_still_caught(tmp_path, layout, monkeypatch):
    """The commit point's checksum is checked on the bytes as written (no re-serialization of a
    document of thousands of arrays), also where the consolidated metadata of a zarr-readable
    step follows the attributes; a change that still parses falls to the full check, which
    refuses it."""
    from ckpt import format as fmt
    from ckpt.errors import FormatError
    from ckpt.storage import LocalStorage

    state = {f"t{i}": torch.randn(7) for i in range(50)}
    ckpt.save(state, str(tmp_path / "run"), step=1, layout=layout)
    storage = LocalStorage(str(tmp_path / "run"))
    path = f"{fmt.step_dir(1)}/{fmt.META}"
    raw = storage.read(path)
    assert ("consolidated_metadata" in fmt._loads(raw, path)) == (layout == "shards")
    assert fmt._root_seal_matches(raw, fmt._loads(raw, path))
    with monkeypatch.context() as m:  # the fast check decides: the document is not serialized again
        m.setattr(fmt, "dumps", lambda doc: pytest.fail("re-serialized"))
        fmt.read_root(storage, 1)
    storage.write_atomic(path, raw.replace(b'"shape":[7]', b'"shape":[8]', 1))
    with pytest.raises(FormatError, match="checksum mismatch"):
        fmt.read_root(storage, 1)


def test_a_reader_of_the_manifest_leaves_a_consolidated_steps_zarr_metadata_unparsed(tmp_path):
    """Restore and load read the manifest only: a consolidated step's zarr metadata (most of its
    commit point's bytes) is checked by the seal on the bytes, not parsed; verify still reads it,
    and a damaged byte of it is refused by both."""
    from ckpt import format as fmt
    from ckpt.errors import FormatError
    from ckpt.storage import LocalStorage

    state = {f"t{i}": torch.randn(7) for i in range(50)}
    ckpt.save(state, str(tmp_path / "run"), step=1, layout="shards")
    storage = LocalStorage(str(tmp_path / "run"))
    path = f"{fmt.step_dir(1)}/{fmt.META}"
    raw = storage.read(path)
    lean, whole = fmt.parse_root(raw, path, zarr_metadata=False), fmt.parse_root(raw, path)
    assert "consolidated_metadata" not in lean and "consolidated_metadata" in whole
    assert lean["attributes"] == whole["attributes"]
    assert fmt.read_manifest(storage, 1) == fmt.manifest_of_root(whole, 1, storage.url)
    out = {f"t{i}": torch.zeros(7) for i in range(50)}
    assert ckpt.load(out, str(tmp_path / "run")) == 1 and all(torch.equal(out[k], state[k]) for k in state)
    at = raw.index(b'"consolidated_metadata"') + 40
    storage.write_atomic(path, raw[:at] + (b"X" if raw[at:at + 1] != b"X" else b"Y") + raw[at + 1:])
    with pytest.raises(FormatError):
        fmt.read_manifest(storage, 1)
