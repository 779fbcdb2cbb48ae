"""The ``ckpt`` command, run in-process through ``ckpt.cli.main``."""

from __future__ import annotations

import json
import math
import os
import time
import uuid

import fsspec
import pytest
import torch

import ckpt
from ckpt import format as fmt
from ckpt.cli import EXIT_CORRUPT, EXIT_INTERNAL, EXIT_PROBLEMS, EXIT_STORAGE, EXIT_USAGE, exit_code_for, main
from ckpt.layout import chunk_range
from ckpt.planning import chunk_box
from ckpt.retention import DELETE, KEEP, RetentionPolicy, StepEntry, plan_gc


def bits(shape, dtype, seed=0):
    """A tensor whose bytes are random (NaN payloads included for floats)."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    n = int(torch.Size(shape).numel()) * dtype.itemsize
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).view(dtype).reshape(shape)


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv):
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ckpt: error: ")
    assert "Traceback" not in err
    return lines[0]


def small_state(seed=0):
    return {
        "model": {"w": bits((8, 4), torch.float32, seed), "b": torch.arange(6)},
        "epoch": 3,
        "cfg": {"lr": 0.1, "name": "x"},
    }


def save_small(root, step, **kw):
    ckpt.save(small_state(step), str(root), step=step, max_chunk_bytes=32, **{"layout": "chunks", **kw})


def make_incomplete(root, step, age_s=0.0):
    """A step directory without a commit point whose files were last touched ``age_s`` ago."""
    d = root / fmt.step_dir(step)
    (d / "model" / "w").mkdir(parents=True, exist_ok=True)
    f = d / "model" / "w" / "c.0.0"
    f.write_bytes(b"\0" * 36)
    t = time.time() - age_s
    os.utime(f, (t, t))
    return d


# ---------------------------------------------------------------------------------------------
# A checkpoint saved by 4 writers, one process


WORLD = 4


def global_state():
    return {
        "w": bits((12, 5), torch.float32, 1),  # sharded along dim 0, 3 rows per writer
        "col": bits((3, 8), torch.bfloat16, 2),  # sharded along dim 1
        "emb": bits((10, 3), torch.int64, 3),  # vocabulary-padded to 12 rows
        "bias": bits((7,), torch.float8_e4m3fn, 4),  # replicated
        "mask": bits((5, 2), torch.bool, 5),  # replicated
        "scalar": bits((), torch.float64, 6),  # replicated 0-d
    }


def save_four_writers(url, step=7):
    g = global_state()
    st = ckpt.open_storage(str(url))
    writers = [fmt.writer_name(r) for r in range(WORLD)]
    emb_padded = torch.cat([g["emb"], torch.zeros(2, 3, dtype=torch.int64)])
    for r in range(WORLD):
        state = {
            "model": {
                "w": ckpt.Sharded(g["w"][r * 3 : (r + 1) * 3].clone(), dim=0, rank=r, world=WORLD),
                "col": ckpt.Sharded(g["col"][:, r * 2 : (r + 1) * 2].clone(), dim=1, rank=r, world=WORLD),
                "emb": ckpt.Sharded(emb_padded[r * 3 : (r + 1) * 3].clone(), dim=0, rank=r, world=WORLD,
                                    logical_size=10),
                "bias": g["bias"].clone(),
                "mask": g["mask"].clone(),
                "scalar": g["scalar"].clone(),
            },
            "step_count": 42,
            "rng": {"rank": r},
        }
        plan = ckpt.plan_save(state, rank=r, world=WORLD, max_chunk_bytes=24)
        ckpt.write_plan(st, plan, step=step, writer=writers[r], save_id="four", layout="chunks")
    ckpt.commit(st, step, writers, save_id="four", user_metadata={"run": "test"},
                library_versions={"ckpt": ckpt.__version__, "torch": torch.__version__})
    return {f"model/{k}": v for k, v in g.items()}


# ---------------------------------------------------------------------------------------------
# ls


def test_ls_lists_committed_and_incomplete_steps(tmp_path, capsys):
    save_small(tmp_path, 1)
    save_small(tmp_path, 2)
    make_incomplete(tmp_path, 3)
    rows = run_json(capsys, "ls", tmp_path)
    assert [(r["step"], r["status"], r["committed"]) for r in rows] == [
        (1, "committed", True), (2, "committed", True), (3, "incomplete", False)]
    m = ckpt.read_manifest(ckpt.open_storage(str(tmp_path)), 2)
    assert rows[1]["tensors"] == 2 and rows[1]["created_at"] == m.created_at
    on_disk = sum(f.stat().st_size for f in (tmp_path / fmt.step_dir(2)).rglob("*") if f.is_file())
    assert rows[1]["bytes"] == on_disk
    assert rows[2]["tensors"] is None and rows[2]["bytes"] == 36 and rows[2]["modified_at"] is not None
    assert all(0 <= r["age_s"] < 600 for r in rows)

    code, out, err = run(capsys, "ls", tmp_path)
    assert code == 0 and not err
    lines = out.strip().splitlines()
    assert lines[0].split() == ["STEP", "STATUS", "SIZE", "AGE", "ZARR", "TENSORS"]
    assert lines[1].split()[:2] == ["1", "committed"] and lines[1].split()[-1] == "2"
    assert lines[3].split()[:2] == ["3", "incomplete"] and lines[3].split()[-1] == "-"


def test_ls_memory_url_and_empty_run(tmp_path, capsys):
    url = f"memory://cli-ls-{uuid.uuid4().hex}"
    save_small(url, 4)
    rows = run_json(capsys, "ls", url)
    assert [(r["step"], r["status"], r["tensors"]) for r in rows] == [(4, "committed", 2)]
    assert rows[0]["bytes"] > 0
    code, out, err = run(capsys, "ls", tmp_path / "empty")
    assert code == 0 and out == "" and "no checkpoint steps" in err
    assert run_json(capsys, "ls", tmp_path / "empty") == []
    fs, root = fsspec.core.url_to_fs(url)
    fs.rm(root, recursive=True)


def test_ls_shows_a_corrupt_commit_point(tmp_path, capsys):
    save_small(tmp_path, 1)
    (tmp_path / fmt.step_dir(1) / "zarr.json").write_text("{")
    rows = run_json(capsys, "ls", tmp_path)
    assert rows[0]["status"] == "corrupt" and "not valid JSON" in rows[0]["error"]


# ---------------------------------------------------------------------------------------------
# inspect


def test_inspect_json_of_a_multi_writer_checkpoint(tmp_path, capsys):
    save_four_writers(tmp_path)
    info = run_json(capsys, "inspect", tmp_path)
    assert info["step"] == 7 and info["format_version"] == ckpt.manifest.FORMAT_VERSION
    assert info["writers"] == [fmt.writer_name(r) for r in range(WORLD)]
    assert info["library_versions"] == {"ckpt": ckpt.__version__, "torch": torch.__version__}
    tensors = {t["path"]: t for t in info["tensors"]}
    assert set(tensors) == {f"model/{k}" for k in ("w", "col", "emb", "bias", "mask", "scalar")}
    w = tensors["model/w"]
    assert (w["shape"], w["dtype"], w["chunk_shape"], w["chunks"]) == ([12, 5], "float32", [1, 5], 12)
    assert w["layout"]["kind"] == "sharded" and w["layout"]["world"] == WORLD
    assert tensors["model/col"]["dtype"] == "bfloat16" and tensors["model/col"]["layout"]["dim"] == 1
    assert tensors["model/emb"]["layout"]["logical_size"] == 10
    assert tensors["model/bias"]["layout"]["kind"] == "replicated"
    assert tensors["model/scalar"]["shape"] == [] and tensors["model/scalar"]["chunks"] == 1
    assert info["values"] == {"step_count": 42, "rng": {"rank": 0}}
    assert info["values_by_writer"] == {fmt.writer_name(r): {"rng": {"rank": r}} for r in range(1, WORLD)}
    assert info["user_metadata"] == {"run": "test"}


def test_inspect_text(tmp_path, capsys):
    save_small(tmp_path, 1, user_metadata={"note": "hello"})
    save_small(tmp_path, 2)
    code, out, err = run(capsys, "inspect", tmp_path, "--step", 1)
    assert code == 0 and not err
    assert out.startswith("step 1 of file://")
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("model/")}
    assert rows["model/w"][1:5] == ["8x4", "float32", "2x4", "4"] and rows["model/w"][5] == "plain"
    assert "epoch = 3" in out and 'cfg = {"lr":0.1,"name":"x"}' in out and 'note = "hello"' in out
    assert "writers      1: rank00000" in out


def test_inspect_errors(tmp_path, capsys):
    save_small(tmp_path, 1)
    make_incomplete(tmp_path, 2)
    code, _, err = run(capsys, "inspect", tmp_path, "--step", 2)
    assert code == EXIT_USAGE and "incomplete" in one_error_line(err)
    code, _, err = run(capsys, "inspect", tmp_path, "--step", 99)
    assert code == EXIT_USAGE and "step 99 not found" in one_error_line(err)
    code, _, err = run(capsys, "inspect", tmp_path / "nothing")
    assert code == EXIT_USAGE and "no committed checkpoint" in one_error_line(err)
    (tmp_path / fmt.step_dir(1) / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    code, _, err = run(capsys, "inspect", tmp_path, "--step", 1)
    assert code == EXIT_CORRUPT and "manifest" in one_error_line(err)


# ---------------------------------------------------------------------------------------------
# verify


def test_verify_passes_on_good_checkpoints(tmp_path, capsys):
    save_small(tmp_path, 1)
    save_four_writers(tmp_path, step=2)
    make_incomplete(tmp_path, 3)
    code, out, err = run(capsys, "verify", tmp_path)
    assert code == 0 and out.startswith("step 2: OK") and not err
    doc = run_json(capsys, "verify", tmp_path, "--all")
    assert doc["ok"] is True and [s["step"] for s in doc["steps"]] == [1, 2]
    assert doc["skipped_incomplete"] == [3]
    assert doc["steps"][1]["writers"] == WORLD and doc["steps"][1]["chunks"] > 0


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete_chunk", "delete_fragment"])
def test_verify_fails_naming_tensor_and_chunk(tmp_path, capsys, damage):
    save_small(tmp_path, 1)
    sdir = tmp_path / fmt.step_dir(1)
    chunk = sdir / "model" / "w" / "c.1.0"
    if damage == "flip":
        data = bytearray(chunk.read_bytes())
        data[7] ^= 0x80
        chunk.write_bytes(bytes(data))
    elif damage == "truncate":
        chunk.write_bytes(chunk.read_bytes()[:10])
    elif damage == "delete_chunk":
        chunk.unlink()
    else:
        (sdir / ".fragments" / "rank00000.json").unlink()
    code, out, err = run(capsys, "verify", tmp_path)
    assert code == EXIT_PROBLEMS
    assert "FAILED" in out and "verify found" in err and "Traceback" not in err
    if damage == "delete_fragment":
        assert "fragment of writer rank00000" in out
        for i in range(4):  # every chunk it recorded is named
            assert f"tensor 'model/w' chunk {i}.0" in out
        assert "tensor 'model/b' chunk 0" in out
    else:
        words = {"flip": "checksum mismatch", "truncate": "truncated", "delete_chunk": "missing"}[damage]
        problems = [line for line in out.splitlines() if line.startswith("  ")]
        assert len(problems) == 1 and "tensor 'model/w' chunk 1.0 (model/w/c.1.0)" in problems[0]
        assert words in problems[0]
    doc = json.loads(run(capsys, "verify", tmp_path, "--json")[1])
    assert doc["ok"] is False
    assert any(p["tensor"] == "model/w" and p["chunk"] == [1, 0] for p in doc["steps"][0]["problems"])


def test_verify_memory_url_with_a_bad_chunk(capsys):
    url = f"memory://cli-verify-{uuid.uuid4().hex}"
    save_small(url, 3)
    fs, root = fsspec.core.url_to_fs(url)
    fs.rm(f"{root}/{fmt.step_dir(3)}/model/b/c.1")
    code, out, _ = run(capsys, "verify", url, "--step", 3)
    assert code == EXIT_PROBLEMS and "tensor 'model/b' chunk 1 (model/b/c.1): missing" in out
    fs.rm(root, recursive=True)


def test_verify_of_a_corrupt_commit_point_reports_a_problem(tmp_path, capsys):
    save_small(tmp_path, 1)
    (tmp_path / fmt.step_dir(1) / "zarr.json").write_bytes(b"\xff\xfe")
    code, out, err = run(capsys, "verify", tmp_path, "--step", 1)
    assert code == EXIT_PROBLEMS and "commit point zarr.json" in out


# ---------------------------------------------------------------------------------------------
# reshard


def _assert_aligned_to_shards(spec, world, dim=0):
    n = spec.shape[dim]
    c = spec.chunk_shape[dim]
    for r in range(world):
        start, length = chunk_range(n, world, r)
        assert start % c == 0 or start == n, (spec.path, spec.chunk_shape)
        assert (start + length) % c == 0 or start + length == n, (spec.path, spec.chunk_shape)


def _partial_chunk_reads(manifest, world):
    """How many chunk reads of a ``world``-rank dim-0 load use only part of their chunk."""
    partial = 0
    for path, spec in manifest.arrays.items():
        if not spec.shape:
            continue
        n = spec.shape[0]
        step = -(-n // world)
        for r in range(world):
            local = torch.empty((step, *spec.shape[1:]), dtype=getattr(torch, spec.dtype))
            state = {}
            node = state
            parts = path.split("/")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = ckpt.Sharded(local, dim=0, rank=r, world=world, logical_size=n)
            plan = ckpt.plan_load(state, manifest, strict=False)
            for req in plan.requests:
                full = chunk_box(spec, req.index).sizes
                for t in req.targets:
                    if tuple(s.stop - s.start for s in t.src) != full:
                        partial += 1
    return partial


def test_reshard_four_writers_to_three_shards(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    expect = save_four_writers(src, step=7)
    src_manifest = ckpt.read_manifest(ckpt.open_storage(str(src)), 7)
    assert _partial_chunk_reads(src_manifest, 3) > 0  # the source grid is not aligned to 3 shards

    code, text, err = run(capsys, "reshard", src, "--step", 7, "--to", "shard:0:3", out, "--buffer-bytes", "40")
    assert code == 0, err
    assert "wrote step 7" in text and "shard:0:3" in text

    m = ckpt.read_manifest(ckpt.open_storage(str(out)), 7)
    for spec in m.arrays.values():
        if spec.shape:
            _assert_aligned_to_shards(spec, 3)
            assert spec.layout["world"] == 3 and spec.layout["target"] == "shard:0:3"
        else:
            assert spec.layout["replicated"] is True
        assert spec.layout["source_layout"] == src_manifest.arrays[spec.path].layout
    assert _partial_chunk_reads(m, 3) == 0  # every 3-rank read takes whole chunks
    assert m.values == src_manifest.values
    assert m.values_by_writer == src_manifest.values_by_writer
    assert m.user_metadata["run"] == "test" and m.user_metadata["ckpt.reshard"]["source_step"] == 7

    loaded = {"model": {k.split("/")[1]: torch.zeros_like(v) for k, v in expect.items()},
              "step_count": 0, "rng": {}}
    assert ckpt.load(loaded, str(out)) == 7
    for k, v in expect.items():
        assert same_bits(loaded["model"][k.split("/")[1]], v), k
    assert loaded["step_count"] == 42
    assert run(capsys, "verify", out)[0] == 0


def _chunk_bytes(spec):
    return math.prod(spec.chunk_shape) * getattr(torch, spec.dtype).itemsize


@pytest.mark.parametrize("layout, check", [
    ("chunks:16", lambda spec: _chunk_bytes(spec) <= 16),
    ("whole", lambda spec: spec.num_chunks == 1),
])
def test_reshard_chunks_and_whole(tmp_path, capsys, layout, check):
    save_small(tmp_path / "src", 1)
    code, _, err = run(capsys, "reshard", tmp_path / "src", "--to", layout, tmp_path / "src", "--step-out", 2,
                       "--threads", 1)
    assert code == 0, err
    st = ckpt.open_storage(str(tmp_path / "src"))
    m = ckpt.read_manifest(st, 2)
    for spec in m.arrays.values():
        assert check(spec), spec
    state = small_state(1)
    out = {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()}, "epoch": 0, "cfg": {}}
    ckpt.load(out, st, step=2)
    assert same_bits(out["model"]["w"], state["model"]["w"]) and torch.equal(out["model"]["b"], state["model"]["b"])
    assert out["cfg"] == state["cfg"]


def test_reshard_memory_urls(capsys):
    src = f"memory://cli-reshard-src-{uuid.uuid4().hex}"
    dst = f"memory://cli-reshard-dst-{uuid.uuid4().hex}"
    save_small(src, 1)
    code, _, err = run(capsys, "reshard", src, "--to", "shard:1:2", dst, "--step-out", 5)
    assert code == 0, err
    m = ckpt.read_manifest(ckpt.open_storage(dst), 5)
    assert m.arrays["model/w"].chunk_shape[1] == 2 and m.arrays["model/b"].layout["replicated"] is True
    for url in (src, dst):
        fs, root = fsspec.core.url_to_fs(url)
        fs.rm(root, recursive=True)


def test_reshard_refuses_to_replace_a_committed_step_and_bad_layouts(tmp_path, capsys):
    save_small(tmp_path / "a", 1)
    save_small(tmp_path / "b", 1)
    code, _, err = run(capsys, "reshard", tmp_path / "a", "--to", "whole", tmp_path / "b")
    assert code == EXIT_USAGE and "--overwrite" in one_error_line(err)
    assert run(capsys, "reshard", tmp_path / "a", "--to", "whole", tmp_path / "b", "--overwrite")[0] == 0
    for bad in ("shard:0", "shard:a:3", "shard:0:0", "chunks:12XB", "whole:3", "rows:2"):
        code, _, err = run(capsys, "reshard", tmp_path / "a", "--to", bad, tmp_path / "c")
        assert code == EXIT_USAGE and "invalid" in one_error_line(err), bad
    code, _, err = run(capsys, "reshard", tmp_path / "a", "--to", "whole", tmp_path / "a")
    assert code == EXIT_USAGE and "onto itself" in one_error_line(err)


def test_reshard_of_a_corrupt_chunk_fails_with_exit_3_and_commits_nothing(tmp_path, capsys):
    save_small(tmp_path / "a", 1)
    chunk = tmp_path / "a" / fmt.step_dir(1) / "model" / "w" / "c.0.0"
    data = bytearray(chunk.read_bytes())
    data[0] ^= 1
    chunk.write_bytes(bytes(data))
    code, _, err = run(capsys, "reshard", tmp_path / "a", "--to", "whole", tmp_path / "b")
    assert code == EXIT_CORRUPT and "model/w" in one_error_line(err)
    assert [s.committed for s in ckpt.list_steps(ckpt.open_storage(str(tmp_path / "b")))] in ([], [False])


def test_layout_and_size_grammar():
    from ckpt.reshard import TargetLayout, parse_bytes, parse_layout

    assert parse_bytes("64MiB") == parse_bytes("64M") == 64 << 20
    assert parse_bytes("2GB") == 2 * 10**9 and parse_bytes("1048576") == 1 << 20 and parse_bytes("1.5K") == 1536
    assert parse_layout("shard:1:8") == TargetLayout("shard", dim=1, world=8)
    assert parse_layout("chunks:64MiB") == TargetLayout("chunks", max_chunk_bytes=64 << 20)
    assert parse_layout("whole") == TargetLayout("whole")
    for bad in ("0", "1x", "-5", "MiB"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


@pytest.mark.parametrize("shape, chunk, budget", [
    ((10, 6), (4, 6), 4 * 24),  # whole chunk rows
    ((10, 6), (4, 3), 3 * 4),  # one chunk per block: the budget is below a chunk
    ((9, 8, 3), (2, 4, 3), 10**6),  # everything in one block
    ((9, 8, 3), (2, 4, 3), 2 * 4 * 3 * 4 * 2),  # two chunks along dim 1
    ((7,), (3,), 8),
    ((), (), 1),
    ((0, 4), (1, 4), 64),
])
def test_reshard_blocks_tile_the_array_with_whole_chunks_within_budget(shape, chunk, budget):
    from ckpt.manifest import ArraySpec
    from ckpt.reshard import target_blocks

    spec = ArraySpec(path="t", shape=shape, dtype="float32", chunk_shape=chunk)
    covered = torch.zeros(shape, dtype=torch.int32)
    one_chunk = math.prod(chunk) * 4
    for box in target_blocks(spec, 4, budget):
        assert math.prod(box.sizes) * 4 <= max(budget, one_chunk)
        for o, s, c, n in zip(box.offsets, box.sizes, chunk, shape):
            assert o % c == 0 and ((o + s) % c == 0 or o + s == n)  # whole chunks only
        covered[tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))] += 1
    assert bool((covered == 1).all())


@pytest.mark.parametrize("shape, chunk, budget", [
    ((10, 6), (4, 6), 4 * 24 * 2),
    ((10, 6), (4, 3), 7 * 4),  # less than a row: blocks inside a row
    ((10, 6), (4, 3), 2),  # less than an element
    ((3, 4, 5), (1, 2, 5), 4 * 5 * 3),
    ((), (), 1),
    ((0, 3), (1, 3), 8),
])
def test_export_blocks_are_row_major_and_within_budget(shape, chunk, budget):
    from ckpt.regions import row_major_blocks
    from ckpt.manifest import ArraySpec

    spec = ArraySpec(path="t", shape=shape, dtype="float32", chunk_shape=chunk)
    flat = torch.arange(math.prod(shape)).reshape(shape)
    order = []
    for box in row_major_blocks(spec, 4, budget):
        assert math.prod(box.sizes) * 4 <= max(budget, 4)
        order.append(flat[tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))].reshape(-1))
    got = torch.cat(order) if order else torch.empty(0, dtype=flat.dtype)
    assert torch.equal(got, flat.reshape(-1))  # concatenated blocks = the tensor's bytes in order


# ---------------------------------------------------------------------------------------------
# export


EXPORT_DTYPES = [torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2,
                 torch.float16, torch.uint8]


def export_state():
    state = {"model": {str(d).removeprefix("torch."): bits((7, 3), d, i) for i, d in enumerate(EXPORT_DTYPES)}}
    state["model"]["scalar"] = bits((), torch.float32, 20)
    state["model"]["empty"] = torch.zeros(0, 4)
    state["opt"] = {"m": bits((5,), torch.float32, 21)}
    state["epoch"] = 9
    state["sched"] = {"milestones": (1, 2)}
    return state


def _flat(state):
    return {f"{a}/{b}": v for a, sub in state.items() if isinstance(sub, dict) for b, v in sub.items()
            if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("buffer", ["1MiB", "5"])  # 5 bytes: blocks smaller than a chunk row
def test_export_safetensors_round_trips_bit_exactly(tmp_path, capsys, buffer):
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = export_state()
    ckpt.save(state, str(tmp_path / "run"), step=3, max_chunk_bytes=8, user_metadata={"who": "me"})
    out = tmp_path / "model.safetensors"
    code, text, err = run(capsys, "export", tmp_path / "run", "--step", 3, "--format", "safetensors", out,
                          "--buffer-bytes", buffer)
    assert code == 0, err
    assert "exported step 3" in text
    loaded = load_file(str(out))
    expect = _flat(state)
    assert set(loaded) == set(expect)
    for k, v in expect.items():
        assert same_bits(loaded[k], v), k
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    m = ckpt.read_manifest(ckpt.open_storage(str(tmp_path / "run")), 3)
    assert json.loads(meta["__ckpt_values__"]) == m.values
    assert json.loads(meta["__ckpt_user_metadata__"]) == {"who": "me"} and json.loads(meta["__ckpt_step__"]) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_export_torch_round_trips_bit_exactly(tmp_path, capsys):
    state = export_state()
    ckpt.save(state, str(tmp_path / "run"), step=3, max_chunk_bytes=8)
    out = tmp_path / "model.pt"  # format from the extension
    code, _, err = run(capsys, "export", tmp_path / "run", out, "--buffer-bytes", "16")
    assert code == 0, err
    for mmap in (False, True):
        loaded = torch.load(str(out), mmap=mmap, weights_only=True)
        for k, v in _flat(state).items():
            assert same_bits(loaded[k], v), k
        m = ckpt.read_manifest(ckpt.open_storage(str(tmp_path / "run")), 3)
        assert loaded["__ckpt_values__"] == m.values and loaded["__ckpt_step__"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "run"]  # no staging file left


def test_export_include_strip_prefix_dtype_and_no_values(tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = export_state()
    ckpt.save(state, str(tmp_path / "run"), step=1)
    out = tmp_path / "m.safetensors"
    code, _, err = run(capsys, "export", tmp_path / "run", out, "--include", "model/*", "--strip-prefix", "model/",
                       "--dtype", "bf16", "--no-values")
    assert code == 0, err
    loaded = load_file(str(out))
    assert set(loaded) == set(state["model"])
    assert same_bits(loaded["float32"], state["model"]["float32"].to(torch.bfloat16))
    assert same_bits(loaded["int64"], state["model"]["int64"])  # not floating point: unchanged
    with safe_open(str(out), "pt") as f:
        assert "__ckpt_values__" not in (f.metadata() or {})
    code, _, err = run(capsys, "export", tmp_path / "run", out, "--include", "opt/*")
    assert code == EXIT_USAGE and "--overwrite" in one_error_line(err)
    code, _, err = run(capsys, "export", tmp_path / "run", out, "--include", "nope/*", "--overwrite")
    assert code == EXIT_USAGE and "matches" in one_error_line(err)


def test_export_memory_run_to_safetensors(tmp_path, capsys):
    from safetensors.torch import load_file

    url = f"memory://cli-export-{uuid.uuid4().hex}"
    state = small_state(4)
    ckpt.save(state, url, step=1)
    out = tmp_path / "x.safetensors"
    assert run(capsys, "export", url, out)[0] == 0
    assert same_bits(load_file(str(out))["model/w"], state["model"]["w"])
    fs, root = fsspec.core.url_to_fs(url)
    fs.rm(root, recursive=True)


def test_export_errors(tmp_path, capsys):
    ckpt.save({"c": torch.zeros(2, dtype=torch.complex128), "f": torch.ones(2)}, str(tmp_path / "run"), step=1,
              layout="chunks")
    code, _, err = run(capsys, "export", tmp_path / "run", tmp_path / "x.safetensors")
    assert code == EXIT_USAGE and "safetensors cannot hold" in one_error_line(err)
    assert not (tmp_path / "x.safetensors").exists()
    code, _, err = run(capsys, "export", tmp_path / "run", tmp_path / "x.npz")
    assert code == EXIT_USAGE and "--format" in one_error_line(err)
    code, _, err = run(capsys, "export", tmp_path / "run", tmp_path / "no" / "x.pt")
    assert code == EXIT_USAGE and "does not exist" in one_error_line(err)
    code, _, err = run(capsys, "export", tmp_path / "run", tmp_path / "x.pt", "--dtype", "int8")
    assert code == EXIT_USAGE and "floating-point" in one_error_line(err)
    chunk = tmp_path / "run" / fmt.step_dir(1) / "f" / "c.0"
    chunk.write_bytes(chunk.read_bytes()[:-1])
    code, _, err = run(capsys, "export", tmp_path / "run", tmp_path / "x.pt", "--include", "f")
    assert code == EXIT_CORRUPT and "'f' chunk 0" in one_error_line(err)
    assert not (tmp_path / "x.pt").exists()


# ---------------------------------------------------------------------------------------------
# gc


def _steps(root):
    return [(s.step, s.committed) for s in ckpt.list_steps(ckpt.open_storage(str(root)))]


def test_gc_keeps_newest_honours_keep_last_and_keep_every(tmp_path, capsys):
    for s in (10, 20, 30, 40, 50, 60):
        save_small(tmp_path, s)
    make_incomplete(tmp_path, 25, age_s=600)  # precedes step 60 and untouched since it was committed
    make_incomplete(tmp_path, 80, age_s=7200)  # newer than everything, but stale: older than --min-age
    make_incomplete(tmp_path, 70, age_s=0)  # a save in progress
    d55 = make_incomplete(tmp_path, 55, age_s=-5)  # precedes 60, but written since: a save in progress
    assert d55.exists()
    before = _steps(tmp_path)

    doc = run_json(capsys, "gc", tmp_path, "--keep-last", 2, "--keep-every", 20, "--dry-run")
    assert _steps(tmp_path) == before  # dry run deletes nothing
    actions = {d["step"]: d["action"] for d in doc["steps"]}
    assert actions == {10: DELETE, 20: KEEP, 25: DELETE, 30: DELETE, 40: KEEP, 50: KEEP, 55: KEEP, 60: KEEP,
                       70: KEEP, 80: DELETE}
    assert doc["dry_run"] is True and doc["deleted"] == []
    assert all(d["bytes"] > 0 for d in doc["steps"] if d["action"] == DELETE)

    code, out, err = run(capsys, "gc", tmp_path, "--keep-last", 2, "--keep-every", 20)
    assert code == 0, err
    assert "deleted 4 step(s)" in out
    assert _steps(tmp_path) == [(20, True), (40, True), (50, True), (55, False), (60, True), (70, False)]
    assert not (tmp_path / fmt.step_dir(10)).exists()


def test_gc_never_removes_the_newest_committed_step(tmp_path, capsys):
    for s in (1, 2, 3):
        save_small(tmp_path, s)
    doc = run_json(capsys, "gc", tmp_path, "--keep-last", 1, "--keep-every", 2)
    assert sorted(doc["deleted"]) == [1]
    assert _steps(tmp_path) == [(2, True), (3, True)]
    code, _, err = run(capsys, "gc", tmp_path, "--keep-last", 0)
    assert code == EXIT_USAGE and "never removed" in one_error_line(err)
    assert _steps(tmp_path) == [(2, True), (3, True)]


def test_gc_removes_stale_temporary_files_of_killed_writes_in_kept_steps(tmp_path, capsys):
    # A writer killed between writing ".NAME.HEX.tmp" and renaming it leaves the file behind,
    # also in a step that was committed anyway (another writer, or the agent, wrote NAME).
    for s in (1, 2):
        save_small(tmp_path, s)
    sdir = tmp_path / fmt.step_dir(2)
    chunk = sorted(sdir.rglob("c.*"))[0]
    old = chunk.parent / f".{chunk.name}.3f2a.tmp"
    old.write_bytes(b"partial")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    young = sdir / ".frag-rank00001.json.9c1d.tmp"  # younger than --min-age: maybe a write in flight
    young.write_bytes(b"{")
    doc = run_json(capsys, "gc", tmp_path, "--keep-last", 2, "--dry-run")
    assert doc["stale_tmp"] == [old.relative_to(tmp_path).as_posix()] and old.exists()
    code, out, err = run(capsys, "gc", tmp_path, "--keep-last", 2)
    assert code == 0, err
    assert "removed 1 temporary file(s)" in out
    assert not old.exists() and young.exists()
    doc = run_json(capsys, "gc", tmp_path, "--keep-last", 2, "--min-age", "0")
    assert doc["stale_tmp"] == [f"{fmt.step_dir(2)}/.frag-rank00001.json.9c1d.tmp"] and not young.exists()
    assert _steps(tmp_path) == [(1, True), (2, True)]
    assert ckpt.load(small_state(0), str(tmp_path)) == 2


def test_gc_min_age_and_memory_url(capsys):
    url = f"memory://cli-gc-{uuid.uuid4().hex}"
    for s in (1, 2, 3):
        save_small(url, s)
    fs, root = fsspec.core.url_to_fs(url)
    fs.pipe_file(f"{root}/{fmt.step_dir(9)}/w/c.0", b"x")  # fresh incomplete step after the newest
    doc = run_json(capsys, "gc", url, "--keep-last", 2)
    assert doc["deleted"] == [1]
    assert _steps(url) == [(2, True), (3, True), (9, False)]
    time.sleep(0.05)
    doc = run_json(capsys, "gc", url, "--keep-last", 2, "--min-age", "0.01")
    assert doc["deleted"] == [9]
    fs.rm(root, recursive=True)


def test_plan_gc_is_pure_and_safe():
    now = 1_000_000.0
    steps = [StepEntry(step=s, committed=True, committed_at=now - 100 + s) for s in range(1, 8)]
    plan = plan_gc(steps, RetentionPolicy(keep_last=1, keep_every=5), now=now)
    assert [d.step for d in plan.to_keep] == [5, 7]
    # The newest committed step stays even when it is not a multiple of keep_every.
    assert plan.decisions[-1].reason == "newest committed step"
    assert [d.step for d in plan_gc(steps[:1], RetentionPolicy(keep_last=1), now=now).to_delete] == []
    inc = [
        StepEntry(step=3, committed=False, modified_at=None),  # precedes the newest, time unknown
        StepEntry(step=9, committed=False, modified_at=None),  # after the newest, time unknown: keep
        StepEntry(step=10, committed=False, modified_at=now - 10),
        StepEntry(step=11, committed=False, modified_at=now - 4000),
    ]
    d = {x.step: x.action for x in plan_gc(steps + inc, RetentionPolicy(keep_last=10), now=now).decisions}
    assert (d[3], d[9], d[10], d[11]) == (DELETE, KEEP, KEEP, DELETE)
    # Without any committed step, incomplete steps go only when stale.
    d = {x.step: x.action for x in plan_gc(inc, RetentionPolicy(keep_last=1), now=now).decisions}
    assert (d[3], d[9], d[10], d[11]) == (KEEP, KEEP, KEEP, DELETE)
    # Steps the caller is still saving or committing (commits may finish out of step order)
    # are kept whatever the rules say, committed or not.
    d = {x.step: x.action for x in plan_gc(steps + inc, RetentionPolicy(keep_last=1), now=now,
                                           in_progress={2, 3, 11}).decisions}
    assert (d[1], d[2], d[3], d[11], d[6]) == (DELETE, KEEP, KEEP, KEEP, DELETE)
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match="keep_last"):
            RetentionPolicy(keep_last=bad)
    with pytest.raises(ValueError, match="keep_every"):
        RetentionPolicy(keep_last=1, keep_every=0)


# ---------------------------------------------------------------------------------------------
# Errors, flags


@pytest.mark.parametrize("argv, words", [
    (["ls", "nosuchscheme://bucket/run"], "unknown URL scheme"),
    (["inspect", "nosuchscheme://bucket/run"], "unknown URL scheme"),
    (["verify", "{run}", "--step", "99"], "step 99 not found"),
    (["verify", "{run}", "--step", "-3"], "non-negative"),
    (["verify", "{run}", "--step", "1", "--all"], "not allowed with"),
    (["export", "{run}", "--step", "42", "{tmp}/x.pt"], "step 42 not found"),
    (["reshard", "{run}", "--step", "42", "--to", "whole", "{tmp}/o"], "step 42 not found"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
    (["ls"], "required"),
    (["gc", "{run}"], "--keep-last"),
    (["ls", "{run}", "--storage-option", "novalue"], "KEY=VALUE"),
])
def test_usage_errors_are_one_line_with_exit_2(tmp_path, capsys, argv, words):
    save_small(tmp_path / "run", 1)
    argv = [a.format(run=tmp_path / "run", tmp=tmp_path) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == EXIT_USAGE
    assert words in one_error_line(err)


def test_debug_prints_the_traceback(tmp_path, capsys):
    code, _, err = run(capsys, "--debug", "inspect", tmp_path / "none")
    assert code == EXIT_USAGE and "Traceback" in err and err.strip().splitlines()[-1].startswith("ckpt: error:")
    code, _, err = run(capsys, "inspect", tmp_path / "none", "--debug")
    assert code == EXIT_USAGE and "Traceback" in err


def test_internal_errors_are_one_line_with_exit_5(tmp_path, capsys, monkeypatch):
    import ckpt.cli

    def broken(args):
        raise RuntimeError("unexpected\nmultiline")

    monkeypatch.setattr(ckpt.cli, "cmd_ls", broken)
    code, _, err = run(capsys, "ls", tmp_path)
    assert code == EXIT_INTERNAL and "internal error: RuntimeError: unexpected multiline" in one_error_line(err)


def test_exit_codes_of_exceptions():
    assert exit_code_for(ckpt.StorageError("x")) == EXIT_STORAGE
    assert exit_code_for(PermissionError("x")) == EXIT_STORAGE
    assert exit_code_for(ckpt.CommitError("x")) == EXIT_STORAGE
    assert exit_code_for(ckpt.CorruptCheckpointError("x")) == EXIT_CORRUPT
    assert exit_code_for(ckpt.FormatError("x")) == EXIT_CORRUPT
    assert exit_code_for(ckpt.CheckpointNotFoundError("x")) == EXIT_USAGE
    assert exit_code_for(ckpt.LayoutError("x")) == EXIT_USAGE
    assert exit_code_for(KeyError("x")) == EXIT_INTERNAL
    no_credentials = type("NoCredentialsError", (Exception,), {"__module__": "botocore.exceptions"})
    assert exit_code_for(no_credentials("Unable to locate credentials")) == EXIT_STORAGE


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "exit codes" in out and "reshard" in out
    assert main(["reshard", "--help"]) == 0
    assert "shard:DIM:N" in capsys.readouterr().out


def test_progress_flag_writes_a_bar_to_stderr(tmp_path, capsys):
    save_small(tmp_path, 1)
    code, out, err = run(capsys, "verify", tmp_path, "--progress")
    assert code == 0 and "verify" in err and out.startswith("step 1: OK")
