"""Format 4: a fragment's chunk records as columns (``chunk_table``). They round-trip to the
records of format 3, untrusted columns are refused whole, the committer checks them without an
object per record, and fragments of format 3 and 4 commit together."""

from __future__ import annotations

import json

import pytest
import torch

import ckpt
from ckpt import chunktable, jsondocs
from ckpt import format as fmt
from ckpt.coverage import CommitBuilder
from ckpt.manifest import FORMAT_VERSION, ChunkRecord, Fragment
from ckpt.verify import verify_step
from recovery.registry import CheckpointRegistry

WRITERS = [fmt.writer_name(r) for r in range(2)]


def _state(rank: int, world: int = 2) -> dict:
    full = torch.arange(8 * 6 * 4, dtype=torch.float32).reshape(8, 6, 4)
    return {"w": ckpt.Sharded(full.chunk(world)[rank].clone(), dim=0, rank=rank, world=world),
            "m": torch.ones(5, 3) * rank, "s": torch.tensor(2.5), "step": 3}


def _write(st, step: int, rank: int, *, layout: str = "packs", version: int = FORMAT_VERSION, world: int = 2,
           max_chunk_bytes: int = 48) -> Fragment:
    plan = ckpt.plan_save(_state(rank, world), rank=rank, world=world, max_chunk_bytes=max_chunk_bytes)
    frag = ckpt.write_plan(st, plan, step=step, writer=fmt.writer_name(rank), save_id=f"s-{step}", layout=layout)
    if version != FORMAT_VERSION:  # as an older writer left it
        frag = Fragment(**{f: getattr(frag, f) for f in Fragment.__dataclass_fields__ if f not in ("format_version",
                                                                                                   "table")},
                        format_version=version)
        fmt.write_fragment(st, frag)
    return frag


def _rewrite(st, step: int, writer: str, change) -> None:
    path = fmt.fragment_path(step, writer)
    doc = json.loads(st.read(path))
    doc.pop(fmt.SEAL_KEY)
    change(doc)
    st.write_atomic(path, fmt.dumps(fmt.seal_fragment(doc)))  # as a faulty writer would have sealed it


@pytest.mark.parametrize("layout", ["packs", "chunks"])
def test_the_columns_round_trip_to_the_records_of_format_3(tmp_path, layout):
    st = ckpt.open_storage(str(tmp_path))
    frag = _write(st, 1, 1, layout=layout)
    doc = json.loads(st.read(fmt.fragment_path(1, WRITERS[1])))
    assert doc["format_version"] == 4 and "chunks" not in doc
    table = doc[chunktable.KEY]
    assert set(table) == ({"array", "index", "nbytes", "crc32c", "pack", "offset"} if layout == "packs"
                          else {"array", "index", "nbytes", "crc32c"})
    assert len(table["array"]) == sum(len(r) for r in frag.chunks.values()) > 4
    back = fmt.read_fragment(st, 1, WRITERS[1])
    assert back.chunks == frag.chunks and back.arrays == frag.arrays
    # A reader of locations (a restore) gets the same records.
    assert fmt.read_fragment_locations(st, 1, WRITERS[1])[2] == frag.chunks
    # A committer's read keeps the columns only.
    lean = fmt.read_fragment(st, 1, WRITERS[1], records=False)
    assert lean.chunks == {} and lean.table is not None and len(lean.table) == len(table["array"])


BAD_COLUMNS = {
    "a float": lambda t: t["nbytes"].__setitem__(0, 1.0),
    "a boolean": lambda t: t["index"].__setitem__(0, True),
    "a null": lambda t: t["crc32c"].__setitem__(0, None),
    "a negative offset": lambda t: t["offset"].__setitem__(0, -1),
    "a crc beyond 32 bits": lambda t: t["crc32c"].__setitem__(0, 1 << 32),
    "a number beyond 64 bits": lambda t: t["offset"].__setitem__(0, 1 << 70),
    "an undeclared array": lambda t: t["array"].__setitem__(0, 99),
    "a short column": lambda t: t["nbytes"].pop(),
    "a pack beyond the packs": lambda t: t["pack"].__setitem__(0, 5),
    "pack without offset": lambda t: t.pop("offset"),
    "an unknown column": lambda t: t.__setitem__("extra", []),
    "not a list": lambda t: t.__setitem__("index", {}),
}


@pytest.mark.parametrize("damage", sorted(BAD_COLUMNS))
def test_columns_a_writer_would_not_write_are_refused_whole(tmp_path, damage):
    st = ckpt.open_storage(str(tmp_path))
    _write(st, 1, 0)
    _rewrite(st, 1, WRITERS[0], lambda d: BAD_COLUMNS[damage](d[chunktable.KEY]))
    with pytest.raises(ckpt.errors.FormatError, match="chunk_table"):
        fmt.read_fragment(st, 1, WRITERS[0], records=False)


def test_a_newer_format_is_refused_with_a_message_to_upgrade(tmp_path):
    st = ckpt.open_storage(str(tmp_path))
    _write(st, 1, 0)
    _rewrite(st, 1, WRITERS[0], lambda d: d.__setitem__("format_version", FORMAT_VERSION + 1))
    with pytest.raises(ckpt.errors.FormatError, match="upgrade"):
        fmt.read_fragment(st, 1, WRITERS[0])


def test_the_committer_checks_the_columns_without_an_object_per_record(tmp_path, monkeypatch):
    st = ckpt.open_storage(str(tmp_path))
    for r in range(2):
        _write(st, 1, r)
    made = []
    real = ChunkRecord.__init__
    monkeypatch.setattr(ChunkRecord, "__init__", lambda self, **kw: (made.append(1), real(self, **kw))[1])
    reg = CheckpointRegistry(st)
    reg.saving(1, "s-1", WRITERS, attempt=0)
    for w in reversed(WRITERS):
        reg.fragment_ready(1, "s-1", w)
    assert [c.step for c in reg.poll().committed] == [1]
    assert made == []
    monkeypatch.undo()
    out = {"w": ckpt.Sharded(torch.zeros(4, 6, 4), dim=0, rank=1, world=2), "m": torch.zeros(5, 3),
           "s": torch.tensor(0.0), "step": 0}
    assert ckpt.load(out, str(tmp_path)) == 1
    assert torch.equal(out["w"].tensor, _state(1)["w"].tensor) and out["s"].item() == 2.5


def _builder_problems(st, step: int) -> list[str]:
    builder = CommitBuilder(step, WRITERS, f"s-{step}")
    for w in WRITERS:
        builder.add(fmt.read_fragment(st, step, w, records=False))
    return builder.finish().problems


def test_the_committer_names_the_chunk_written_twice_outside_the_grid_or_by_nobody(tmp_path):
    st = ckpt.open_storage(str(tmp_path))
    for r in range(2):
        _write(st, 1, r)
    theirs = json.loads(st.read(fmt.fragment_path(1, WRITERS[0])))[chunktable.KEY]

    def claim_and_stray(d):
        t = d[chunktable.KEY]
        w = [a["path"] for a in d["arrays"]].index("w")
        first = theirs["array"].index(w)
        for col in t:  # rank 0's first chunk of w, and a chunk far outside the grid of w
            t[col] += [theirs[col][first], {"index": 10_000, "array": w}.get(col, 0)]
        t["array"][:2], t["index"][:2] = [t["array"][2]] * 2, [t["index"][2]] * 2  # one chunk twice, one lost

    _rewrite(st, 1, WRITERS[1], claim_and_stray)
    problems = " | ".join(_builder_problems(st, 1))
    assert "'w': chunk [0, 0, 0] written by both rank00000 and rank00001" in problems
    assert "outside the grid" in problems
    assert "written by both rank00001 and rank00001" in problems
    assert "not written by any writer" in problems


def test_fragments_of_format_3_and_4_commit_together_and_load(tmp_path):
    st = ckpt.open_storage(str(tmp_path))
    _write(st, 1, 0, version=3)
    _write(st, 1, 1)
    docs = [json.loads(st.read(fmt.fragment_path(1, w))) for w in WRITERS]
    assert [d["format_version"] for d in docs] == [3, 4] and "chunks" in docs[0] and chunktable.KEY in docs[1]
    ckpt.commit(st, 1, WRITERS, save_id="s-1")
    assert verify_step(st, 1).ok
    for r in range(2):
        out = {"w": ckpt.Sharded(torch.zeros(4, 6, 4), dim=0, rank=r, world=2), "m": torch.zeros(5, 3),
               "s": torch.tensor(0.0), "step": 0}
        assert ckpt.load(out, str(tmp_path)) == 1
        assert torch.equal(out["w"].tensor, _state(r)["w"].tensor)


def test_a_fragment_is_smaller_than_in_format_3(tmp_path):
    st = ckpt.open_storage(str(tmp_path))
    v4 = _write(st, 1, 0, max_chunk_bytes=16)
    old = Fragment(**{f: getattr(v4, f) for f in Fragment.__dataclass_fields__ if f not in ("format_version", "table")},
                   format_version=3)
    sizes = [len(fmt.dumps(f.to_dict())) - len(json.dumps([a.to_dict() for a in v4.arrays.values()]))
             for f in (old, v4)]
    assert sizes[1] < sizes[0]


def test_declarations_are_parsed_once_for_writers_that_share_them_and_whole_otherwise(tmp_path):
    st = ckpt.open_storage(str(tmp_path))
    for r in range(2):
        _write(st, 1, r)
    other = {"w": torch.ones(3, 2), "step": 1}  # another stage of a pipeline: other arrays
    ckpt.write_plan(st, ckpt.plan_save(other), step=2, writer=WRITERS[0], save_id="s-2")
    a, b = (fmt.read_fragment(st, 1, w, records=False) for w in WRITERS)
    c = fmt.read_fragment(st, 2, WRITERS[0], records=False)
    assert a.arrays == b.arrays and len(a.arrays) == 3 and list(c.arrays) == ["w"]
    assert jsondocs._known_arrays is not None and jsondocs._known_arrays[1][0]["path"] == "w"
    d = fmt.read_fragment(st, 1, WRITERS[1])  # after another: parsed again, the same
    assert d.arrays == a.arrays and d.chunks == fmt.read_fragment(st, 1, WRITERS[1]).chunks
    # Laid out otherwise than our writer lays it out (other spacing): parsed whole.
    path = fmt.fragment_path(1, WRITERS[0])
    st.write_atomic(path, json.dumps(json.loads(st.read(path)), indent=1).encode())
    assert fmt.read_fragment(st, 1, WRITERS[0]).chunks == fmt.read_fragment(st, 1, WRITERS[0]).chunks
    assert fmt.read_fragment(st, 1, WRITERS[0]).arrays == a.arrays


def test_a_written_fragment_is_its_sealed_document_encoded_once(tmp_path):
    """write_fragment encodes the document once and appends the seal: the same bytes as sealing
    the dict and encoding it again, so readers check the seal on the bytes as before."""
    st = ckpt.open_storage(str(tmp_path))
    ckpt.save(_state(0, world=1), str(tmp_path), step=3)
    frag = fmt.read_fragment(st, 3, fmt.writer_name(0))
    data = st.read(fmt.fragment_path(3, fmt.writer_name(0)))
    again = Fragment(**{f: getattr(frag, f) for f in Fragment.__dataclass_fields__ if f != "table"})
    assert fmt.dumps(fmt.seal_fragment(again.to_dict())) == data
    fmt.check_seal(json.loads(data), "fragment", root=False)


def test_a_commit_point_is_encoded_once_with_the_same_bytes(tmp_path):
    import copy

    from ckpt.commit import commit_document, sealed_root_bytes

    st = ckpt.open_storage(str(tmp_path))
    ckpt.save(_state(0, world=1), str(tmp_path), step=4)
    manifest = fmt.read_manifest(st, 4)
    root = commit_document(manifest)
    assert sealed_root_bytes(copy.deepcopy(root)) == fmt.dumps(fmt.seal_root(copy.deepcopy(root)))
    assert st.read(f"{fmt.step_dir(4)}/{fmt.META}") == sealed_root_bytes(commit_document(manifest))
    fmt.parse_root(sealed_root_bytes(root), "zarr.json")  # the seal checks on the bytes
    import dataclasses

    shards = commit_document(dataclasses.replace(manifest, layout="shards"))  # consolidated metadata last
    assert list(shards)[-1] == "consolidated_metadata"
    assert sealed_root_bytes(copy.deepcopy(shards)) == fmt.dumps(fmt.seal_root(copy.deepcopy(shards)))
