"""The golden checkpoints of every format version stay readable, and the current one's
metadata stays what we write."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import ckpt
from ckpt import format as fmt
from tests.golden.make_golden import RUN, RUNS, golden_state_parts
from tests.helpers import bits_equal


@pytest.mark.parametrize("version", sorted(RUNS))
def test_golden_checkpoint_loads_bit_exactly(version):
    full, _ = golden_state_parts()
    out = {
        "model": {k: torch.zeros_like(v) for k, v in full.items()},
        "step": 0,
        "loader": None,
        "cfg": None,
    }
    assert ckpt.load(out, str(RUNS[version])) == 42
    for k, v in full.items():
        assert bits_equal(out["model"][k], v), k
    assert out["step"] == 42 and out["cfg"] == {"betas": (0.9, 0.95), "name": "golden"}
    assert out["loader"] == {"epoch": 1, "position": 100}  # writer 0's value for rank 0


@pytest.mark.parametrize("version", sorted(RUNS))
def test_golden_per_writer_values(version):
    storage = ckpt.open_storage(str(RUNS[version]))
    m = ckpt.read_manifest(storage)
    assert m.format_version == version
    assert m.writers == ("rank00000", "rank00001")
    # Format 3 keeps them in the writers' fragments, formats 1 and 2 in the commit point.
    assert fmt.values_by_writer(storage, m) == {"rank00001": {"loader": {"epoch": 1, "position": 101}}}
    assert m.arrays["model/qkv"].layout == {"kind": "sharded", "dim": 0, "world": 2, "replicas": 1, "parts": [4, 1, 1]}


def test_current_writer_produces_the_golden_metadata(tmp_path):
    """Same state -> the same array documents, chunk bytes and fragments (but timestamps)."""
    _, states = golden_state_parts()
    st = ckpt.open_storage(str(tmp_path))
    writers = [fmt.writer_name(r) for r in range(2)]
    for r, state in enumerate(states):
        ckpt.write_plan(st, ckpt.plan_save(state, rank=r, world=2, max_chunk_bytes=40), step=42,
                        writer=writers[r], save_id="golden")
    ckpt.commit(st, 42, writers, save_id="golden")
    new, old = tmp_path / fmt.step_dir(42), RUN / fmt.step_dir(42)
    old_files = {p.relative_to(old) for p in old.rglob("*") if p.is_file()}
    new_files = {p.relative_to(new) for p in new.rglob("*") if p.is_file()}
    assert old_files == new_files
    for rel in sorted(old_files):
        a, b = (old / rel).read_bytes(), (new / rel).read_bytes()
        if str(rel) == "zarr.json":
            ja, jb = json.loads(a), json.loads(b)
            for doc in (ja, jb):
                doc["attributes"]["ckpt"].pop("created_at")
                doc["attributes"]["ckpt"].pop("library_versions")
                doc["attributes"].pop("ckpt_crc32c", None)  # a checksum of the document, timestamps included
            assert ja == jb
        elif rel.parts[0] == ".fragments":
            ja, jb = json.loads(a), json.loads(b)
            ja.pop("created_at"), jb.pop("created_at")
            ja.pop("ckpt_crc32c", None), jb.pop("ckpt_crc32c", None)
            assert ja == jb, rel
        else:
            assert a == b, rel


def test_golden_is_read_only_for_tests(tmp_path):
    # Loading must never write into the run (e.g. a cache or a lock file).
    copy = tmp_path / "run"
    shutil.copytree(RUN, copy)
    before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    full, _ = golden_state_parts()
    ckpt.load({"model": {k: torch.zeros_like(v) for k, v in full.items()}, "step": 0, "loader": None, "cfg": None},
              str(copy))
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == before
