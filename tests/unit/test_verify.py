"""``ckpt.verify.verify_step``: every kind of damage is found, named by tensor and chunk."""

from __future__ import annotations

import json
import threading
import time
import uuid

import fsspec
import pytest
import torch

import ckpt
from ckpt import format as fmt
from ckpt import verify
from ckpt.verify import bounded_map, verify_step

STEP = 5


def _save_single(root, step=STEP):
    state = {
        "model": {"w": torch.randn(8, 4), "b": torch.arange(6, dtype=torch.int64)},
        "flag": torch.tensor(True),
        "lr": 0.5,
    }
    # w: chunks of 2 rows (grid 4x1); b: chunks of 3 (grid 2); flag: one chunk.
    ckpt.save(state, str(root), step=step, max_chunk_bytes=32, layout="chunks")  # chunk files to damage
    return state


def _save_writers(root, world=4, step=STEP):
    st = ckpt.open_storage(str(root))
    writers = [fmt.writer_name(r) for r in range(world)]
    full = torch.arange(world * 3 * 5, dtype=torch.float32).reshape(world * 3, 5)
    for r in range(world):
        state = {
            "w": ckpt.Sharded(full[r * 3 : (r + 1) * 3].clone(), dim=0, rank=r, world=world),
            "bias": torch.ones(5),
            "rank_value": r,
        }
        plan = ckpt.plan_save(state, rank=r, world=world, max_chunk_bytes=1 << 20)
        ckpt.write_plan(st, plan, step=step, writer=writers[r], save_id="sid", layout="chunks")
    ckpt.commit(st, step, writers, save_id="sid")
    return full


def _step(root, step=STEP):
    return root / fmt.step_dir(step)


def _storage(root):
    return ckpt.open_storage(str(root))


def test_good_checkpoint_has_no_problems(tmp_path):
    _save_single(tmp_path)
    report = verify_step(_storage(tmp_path), STEP)
    assert report.ok, report.problems
    assert (report.arrays, report.chunks, report.writers) == (3, 4 + 2 + 1, 1)
    assert report.bytes == 4 * (2 * 4 * 4 + 4) + 2 * (3 * 8 + 4) + (1 + 4)
    d = report.to_dict()
    assert d["ok"] is True and d["problems"] == []
    json.dumps(d)


def test_good_multi_writer_checkpoint_has_no_problems(tmp_path):
    _save_writers(tmp_path)
    report = verify_step(_storage(tmp_path), STEP, threads=3)
    assert report.ok, report.problems
    assert report.writers == 4


@pytest.mark.parametrize(
    "damage, kind, words",
    [
        ("flip", verify.CHECKSUM, "checksum mismatch"),
        ("flip_crc", verify.CHECKSUM, "checksum mismatch"),
        ("truncate", verify.TRUNCATED, "truncated"),
        ("extend", verify.SIZE, "bytes, expected"),
        ("delete", verify.MISSING, "missing"),
    ],
)
def test_damaged_chunk_is_named(tmp_path, damage, kind, words):
    _save_single(tmp_path)
    p = _step(tmp_path) / "model" / "w" / "c.2.0"
    data = bytearray(p.read_bytes())
    if damage == "flip":
        data[3] ^= 0x10
    elif damage == "flip_crc":
        data[-2] ^= 0x01
    elif damage == "truncate":
        data = data[:-5]
    elif damage == "extend":
        data += b"\0"
    if damage == "delete":
        p.unlink()
    else:
        p.write_bytes(bytes(data))
    report = verify_step(_storage(tmp_path), STEP)
    assert len(report.problems) == 1, report.problems
    (problem,) = report.problems
    assert problem.kind == kind
    assert (problem.path, problem.index, problem.key) == ("model/w", (2, 0), "model/w/c.2.0")
    assert "tensor 'model/w' chunk 2.0" in problem.message and words in problem.message
    assert report.to_dict()["problems"][0]["chunk"] == [2, 0]


def test_every_bad_chunk_is_reported_not_just_the_first(tmp_path):
    _save_single(tmp_path)
    for i in range(4):
        (_step(tmp_path) / "model" / "w" / f"c.{i}.0").unlink()
    (_step(tmp_path) / "model" / "b" / "c.1").write_bytes(b"xx")
    report = verify_step(_storage(tmp_path), STEP)
    named = {(p.path, p.index, p.kind) for p in report.problems}
    assert named == {("model/w", (i, 0), verify.MISSING) for i in range(4)} | {("model/b", (1,), verify.TRUNCATED)}


def test_valid_chunk_from_another_save_is_caught_by_the_recorded_crc(tmp_path):
    _save_single(tmp_path, step=1)
    _save_single(tmp_path, step=2)  # other random values, each chunk valid on its own
    src = _step(tmp_path, 1) / "model" / "w" / "c.1.0"
    dst = _step(tmp_path, 2) / "model" / "w" / "c.1.0"
    dst.write_bytes(src.read_bytes())
    report = verify_step(_storage(tmp_path), 2)
    (problem,) = report.problems
    assert problem.kind == verify.RECORDED_CRC and problem.index == (1, 0) and problem.writer == "rank00000"
    assert "recorded" in problem.message


def test_deleted_fragment_names_the_writer_and_each_chunk_it_recorded(tmp_path):
    _save_writers(tmp_path, world=4)
    (_step(tmp_path) / ".fragments" / "rank00002.json").unlink()
    report = verify_step(_storage(tmp_path), STEP)
    frag = [p for p in report.problems if p.kind == verify.FRAGMENT]
    assert len(frag) == 1 and frag[0].writer == "rank00002" and "missing" in frag[0].message
    unrecorded = [p for p in report.problems if p.kind == verify.UNRECORDED]
    # rank 2 holds rows 6..8 of w: chunk 2 of a grid of 3-row chunks. "bias" is replicated:
    # written by one replica chosen by hash; it is unrecorded only if that was rank 2.
    assert ("w", (2, 0)) in {(p.path, p.index) for p in unrecorded}
    assert all("rank00002" in p.message for p in unrecorded)
    assert not [p for p in report.problems if p.kind not in (verify.FRAGMENT, verify.UNRECORDED)]


def test_unparseable_and_foreign_fragments(tmp_path):
    _save_writers(tmp_path, world=2)
    frags = _step(tmp_path) / ".fragments"
    (frags / "rank00000.json").write_text("{not json")
    doc = json.loads((frags / "rank00001.json").read_text())
    doc["save_id"] = "another"
    doc.pop("ckpt_crc32c", None)  # a fragment another save wrote, not a corrupted one
    (frags / "rank00001.json").write_text(json.dumps(doc))
    report = verify_step(_storage(tmp_path), STEP)
    by_writer = {p.writer: p for p in report.problems if p.kind == verify.FRAGMENT}
    assert "unreadable" in by_writer["rank00000"].message
    assert "another save" in by_writer["rank00001"].message


def test_duplicate_and_out_of_grid_records(tmp_path):
    _save_writers(tmp_path, world=2)
    frags = _step(tmp_path) / ".fragments"
    d0 = json.loads((frags / "rank00000.json").read_text())
    d1 = json.loads((frags / "rank00001.json").read_text())
    t0, t1 = d0["chunk_table"], d1["chunk_table"]
    w = [a["path"] for a in d1["arrays"]].index("w")
    first = t0["array"].index(w)
    for col in t1:  # rank 1 claims rank 0's first chunk of w too ...
        t1[col].append(t0[col][first])
    grid_cols = -(-d1["arrays"][w]["shape"][1] // d1["arrays"][w]["chunk_shape"][1])
    for col, v in (("array", w), ("index", 9 * grid_cols), ("nbytes", 64), ("crc32c", 0), ("pack", 0), ("offset", 0)):
        if col in t1:  # ... and a chunk outside the grid, at [9, 0]
            t1[col].append(v)
    d1.pop("ckpt_crc32c", None)  # as a faulty writer would have written it, not a corrupted file
    (frags / "rank00001.json").write_text(json.dumps(d1))
    report = verify_step(_storage(tmp_path), STEP)
    kinds = {(p.kind, p.index) for p in report.problems}
    assert (verify.DUPLICATE, (0, 0)) in kinds
    assert (verify.OUTSIDE, (9, 0)) in kinds


def test_array_metadata_missing_or_inconsistent(tmp_path):
    _save_single(tmp_path)
    (_step(tmp_path) / "model" / "b" / "zarr.json").unlink()
    meta = _step(tmp_path) / "model" / "w" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["shape"] = [9, 4]
    meta.write_text(json.dumps(doc))
    (_step(tmp_path) / "model" / "zarr.json").unlink()  # the intermediate group
    report = verify_step(_storage(tmp_path), STEP)
    msgs = {(p.kind, p.path, p.key): p.message for p in report.problems}
    assert (verify.MISSING, "model/b", "model/b/zarr.json") in msgs
    assert "shape is [9, 4]" in msgs[(verify.METADATA, "model/w", "model/w/zarr.json")]
    assert (verify.MISSING, None, "model/zarr.json") in msgs
    assert len(report.problems) == 3


def test_consolidated_metadata_disagreeing_with_the_manifest(tmp_path):
    _save_single(tmp_path)
    root = _step(tmp_path) / "zarr.json"
    doc = json.loads(root.read_text())
    doc["consolidated_metadata"]["metadata"]["model/w"]["data_type"] = "float64"
    doc["attributes"].pop("ckpt_crc32c", None)  # as a faulty committer would have written it
    root.write_text(json.dumps(doc))
    (problem,) = verify_step(_storage(tmp_path), STEP).problems
    assert problem.kind == verify.METADATA and problem.path == "model/w" and "data_type" in problem.message


def test_unreadable_commit_point_is_a_problem_not_an_exception(tmp_path):
    _save_single(tmp_path)
    (_step(tmp_path) / "zarr.json").write_text("{garbage")
    (problem,) = verify_step(_storage(tmp_path), STEP).problems
    assert problem.kind == verify.MANIFEST and "zarr.json" in problem.message


def test_uncommitted_step_raises_not_found(tmp_path):
    _save_single(tmp_path)
    (_step(tmp_path) / "zarr.json").unlink()
    with pytest.raises(ckpt.CheckpointNotFoundError):
        verify_step(_storage(tmp_path), STEP)


def test_memory_url_and_progress(tmp_path):
    url = f"memory://verify-{uuid.uuid4().hex}"
    _save_single(url)
    seen = []
    report = verify_step(_storage(url), STEP, threads=2, progress=seen.append)
    assert report.ok and sum(seen) == report.bytes and len(seen) == report.chunks
    fs, root = fsspec.core.url_to_fs(url)
    key = f"{root}/{fmt.step_dir(STEP)}/model/b/c.0"
    data = bytearray(fs.cat_file(key))
    data[0] ^= 1
    fs.pipe_file(key, bytes(data))
    (problem,) = verify_step(_storage(url), STEP).problems
    assert problem.kind == verify.CHECKSUM and problem.path == "model/b" and problem.index == (0,)
    fs.rm(root, recursive=True)


def test_zero_sized_and_scalar_tensors_verify(tmp_path):
    ckpt.save({"empty": torch.zeros(0, 3), "s": torch.tensor(2.5)}, str(tmp_path), step=1)
    report = verify_step(_storage(tmp_path), 1)
    assert report.ok, report.problems
    assert report.chunks == 1


def test_bounded_map_keeps_a_bounded_window_in_flight():
    lock = threading.Lock()
    running = peak = 0
    pulled = []

    def items():
        for i in range(50):
            pulled.append(i)
            yield i

    def work(i):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.001)
        with lock:
            running -= 1
        return i * 2

    out = []
    for r in bounded_map(work, items(), threads=3):
        out.append(r)
        assert len(pulled) - len(out) <= 6  # never more than 2 x threads submitted ahead
    assert sorted(out) == [i * 2 for i in range(50)]
    assert peak <= 3


def test_bounded_map_propagates_errors():
    def work(i):
        if i == 3:
            raise RuntimeError("boom")
        return i

    with pytest.raises(RuntimeError, match="boom"):
        list(bounded_map(work, range(10), threads=2))
