"""Single-process round trips: every dtype, plain and hand-sharded layouts, values, readers."""

from __future__ import annotations

import json

import pytest
import torch

import ckpt
from ckpt import Sharded
from tests.helpers import bits_equal, load_as_readers, random_bits, save_as_writers

DTYPES = [
    torch.float32, torch.float16, torch.float64, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_every_dtype_round_trips_bit_exactly(tmp_path, dtype):
    state = {
        "m": random_bits((9, 5), dtype, seed=1),
        "scalar": random_bits((), dtype, seed=2),
        "v": random_bits((7,), dtype, seed=3),
    }
    # Small chunks: ragged edge chunks in both dims.
    ckpt.save(state, tmp_path, step=1, max_chunk_bytes=4 * dtype.itemsize * 5)
    out = {k: torch.zeros_like(v) for k, v in state.items()}
    assert ckpt.load(out, tmp_path) == 1
    for k in state:
        assert bits_equal(out[k], state[k]), k


@pytest.mark.parametrize("layout", ["shards", "chunks"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_tensorstore_reads_every_array_with_global_shape(tmp_path, dtype, layout):
    ts = pytest.importorskip("tensorstore")
    t = random_bits((6, 4), dtype, seed=4)
    # Padded to 8 rows over 4 ranks: the last shard holds only padding.
    padded = torch.cat([t, torch.zeros(2, 4, dtype=dtype)])
    states = [{"w": Sharded(s.clone(), dim=0, rank=r, world=4, logical_size=6)} for r, s in enumerate(padded.chunk(4))]
    save_as_writers(states, tmp_path, step=3, layout=layout)  # packs consolidated, or one file per chunk
    arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "000000000003" / "w")}}).result()
    assert tuple(arr.shape) == (6, 4)
    got = arr.read().result()
    assert got.tobytes() == t.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("layout", ["shards", "chunks"])
def test_zarr_python_opens_the_committed_group(tmp_path, layout):
    zarr = pytest.importorskip("zarr")
    from ckpt.zarr_compat import register_zarr_dtypes

    register_zarr_dtypes()
    state = {"model": {"w": torch.randn(5, 3), "b": torch.randn(3).bfloat16()}, "step": 7}
    ckpt.save(state, tmp_path, step=7, max_chunk_bytes=24, layout=layout)
    g = zarr.open_group(str(tmp_path / "000000000007"), mode="r")
    assert g["model/w"].shape == (5, 3)
    assert (g["model/w"][:] == state["model"]["w"].numpy()).all()
    assert g["model/b"][:].view("uint16").tobytes() == state["model"]["b"].view(torch.int16).numpy().tobytes()
    assert g.attrs["ckpt"]["step"] == 7


def test_format_on_storage(tmp_path):
    ckpt.save({"a": {"w": torch.zeros(4, 2)}}, tmp_path, step=12, max_chunk_bytes=16, layout="chunks")
    d = tmp_path / "000000000012"
    root = json.loads((d / "zarr.json").read_text())
    assert root["zarr_format"] == 3 and root["node_type"] == "group"
    assert set(root["consolidated_metadata"]["metadata"]) == {"a", "a/w"}
    meta = json.loads((d / "a" / "w" / "zarr.json").read_text())
    assert meta["codecs"] == [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [2, 2]
    # write_empty_chunks: all-zero chunks are stored too.
    assert sorted(p.name for p in (d / "a" / "w").iterdir() if p.name.startswith("c")) == ["c.0.0", "c.1.0"]
    assert (d / ".fragments" / "rank00000.json").exists()
    manifest = root["attributes"]["ckpt"]
    assert manifest["format_version"] == ckpt.manifest.FORMAT_VERSION and manifest["step"] == 12
    assert manifest["library_versions"]["torch"] == torch.__version__


class Custom:
    def __init__(self, x):
        self.x = x


def test_values_round_trip_and_pickle_is_opt_in(tmp_path):
    state = {"w": torch.ones(2), "cfg": {"lr": 0.1, "betas": (0.9, 0.99), "ids": {1: "a"}, "inf": float("inf")},
             "blob": b"\x00\x01", "none": None}
    ckpt.save(state, tmp_path, step=1)
    out = {"w": torch.zeros(2), "cfg": None, "blob": None, "none": 3}
    ckpt.load(out, tmp_path)
    assert out["cfg"] == state["cfg"] and out["blob"] == b"\x00\x01" and out["none"] is None
    with pytest.raises(ckpt.UnsupportedValueError, match="allow_pickle"):
        ckpt.save({"w": torch.ones(1), "obj": Custom(1)}, tmp_path, step=2)
    ckpt.save({"w": torch.ones(1), "obj": Custom(5)}, tmp_path, step=2, allow_pickle=True)
    with pytest.raises(ckpt.UnsupportedValueError, match="allow_pickle"):
        ckpt.load({"w": torch.ones(1), "obj": None}, tmp_path, step=2)
    out = {"w": torch.ones(1), "obj": None}
    ckpt.load(out, tmp_path, step=2, allow_pickle=True)
    assert out["obj"].x == 5


def test_mismatches_are_reported_all_at_once(tmp_path):
    ckpt.save({"a": torch.zeros(3), "b": torch.zeros(2, 2), "c": torch.zeros(1), "n": 1}, tmp_path, step=1)
    bad = {"a": torch.zeros(4), "b": torch.zeros(2, 2, dtype=torch.float64), "d": torch.zeros(1), "n": 0}
    with pytest.raises(ckpt.StateMismatchError) as e:
        ckpt.load(bad, tmp_path)
    text = str(e.value)
    for needle in ("'a': shape [3]", "'b': dtype float32", "'d': missing", "'c': in the checkpoint"):
        assert needle in text
    assert len(e.value.problems) == 4
    # strict=False ignores missing/unexpected; allow_cast converts.
    out = {"b": torch.zeros(2, 2, dtype=torch.float64)}
    ckpt.load(out, tmp_path, strict=False, allow_cast=True)


def test_fused_qkv_tp2_to_tp4_and_vocab_padding():
    hd, hidden = 4, 16
    q, k, v = 8 * hd, 2 * hd, 2 * hd
    W = torch.randn(q + k + v, hidden)
    Q, K, V = W.split([q, k, v])
    vocab, tp_pad = 50, 8
    E = torch.randn(vocab, hidden)

    def qkv_local(r: int, tp: int) -> torch.Tensor:
        return torch.cat([Q.chunk(tp)[r], K.chunk(tp)[r], V.chunk(tp)[r]])

    def emb_local(r: int, tp: int) -> torch.Tensor:
        padded = -(-vocab // (tp * tp_pad)) * tp * tp_pad
        full = torch.cat([E, torch.full((padded - vocab, hidden), 7.0)])
        return full.chunk(tp)[r].clone()

    url = "memory://qkv-test"
    states = [
        {"qkv": Sharded(qkv_local(r, 2), dim=0, rank=r, world=2, parts=(q, k, v)),
         "emb": Sharded(emb_local(r, 2), dim=0, rank=r, world=2, logical_size=vocab)}
        for r in range(2)
    ]
    manifest = save_as_writers(states, url, step=1)
    assert manifest.arrays["qkv"].shape == (q + k + v, hidden)
    assert manifest.arrays["emb"].shape == (vocab, hidden)
    dst = [
        {"qkv": Sharded(torch.zeros_like(qkv_local(r, 4)), dim=0, rank=r, world=4, parts=(q, k, v)),
         "emb": Sharded(torch.full_like(emb_local(r, 4), 3.0), dim=0, rank=r, world=4, logical_size=vocab)}
        for r in range(4)
    ]
    load_as_readers(dst, url)
    for r in range(4):
        assert torch.equal(dst[r]["qkv"].tensor, qkv_local(r, 4))
        want = emb_local(r, 4)
        start = r * want.shape[0]
        valid = max(0, min(vocab, start + want.shape[0]) - start)
        assert torch.equal(dst[r]["emb"].tensor[:valid], want[:valid])
        assert torch.count_nonzero(dst[r]["emb"].tensor[valid:]) == 0  # padding rows come back as zeros
    # A plain full tensor reads the logical tensor.
    full = {"qkv": torch.zeros(q + k + v, hidden), "emb": torch.zeros(vocab, hidden)}
    load_as_readers([full], url)
    assert torch.equal(full["qkv"], W) and torch.equal(full["emb"], E)


def test_replicated_tensors_are_written_once_spread_over_replicas(tmp_path):
    states = [{f"t{i}": torch.full((3,), float(i)) for i in range(16)} for _ in range(4)]
    save_as_writers(states, tmp_path, step=1)
    writers_used = set()
    for r in range(4):
        frag = ckpt.format.read_fragment(ckpt.open_storage(tmp_path), 1, ckpt.format.writer_name(r))
        if frag.chunks:
            writers_used.add(r)
    assert len(writers_used) > 1
    out = {f"t{i}": torch.zeros(3) for i in range(16)}
    ckpt.load(out, tmp_path)
    assert all(torch.equal(out[f"t{i}"], torch.full((3,), float(i))) for i in range(16))


def test_row_parallel_shards_and_replicas_with_data_parallel():
    W = torch.randn(6, 10)
    url = "memory://row-parallel"
    # DP=2 x TP=2: each TP shard has two replicas; exactly one writes each chunk.
    states = [{"w": Sharded(W.chunk(2, dim=1)[tp].clone(), dim=1, rank=tp, world=2, replica=(dp, 2))}
              for dp in range(2) for tp in range(2)]
    save_as_writers(states, url, step=5, max_chunk_bytes=8)
    out = [{"w": Sharded(torch.zeros(6, 2), dim=1, rank=r, world=5)} for r in range(5)]
    load_as_readers(out, url)
    assert torch.equal(torch.cat([o["w"].tensor for o in out], dim=1), W)


def test_memory_url_and_step_selection():
    url = "memory://steps"
    for s in (3, 10, 7):
        ckpt.save({"x": torch.tensor(float(s))}, url, step=s)
    out = {"x": torch.tensor(0.0)}
    assert ckpt.load(out, url) == 10 and out["x"].item() == 10.0
    assert ckpt.load(out, url, step=3) == 3 and out["x"].item() == 3.0
    assert ckpt.committed_steps(ckpt.open_storage(url)) == [3, 7, 10]
    with pytest.raises(ckpt.CheckpointNotFoundError):
        ckpt.load(out, url, step=4)
    with pytest.raises(ckpt.CheckpointExistsError):
        ckpt.save({"x": torch.tensor(1.0)}, url, step=10)
    ckpt.save({"x": torch.tensor(1.0)}, url, step=10, overwrite=True)
    assert ckpt.load(out, url) == 10 and out["x"].item() == 1.0


def test_bad_keys_are_refused(tmp_path):
    for bad in ({"a/b": torch.ones(1)}, {"..": torch.ones(1)}, {".hidden": torch.ones(1)}, {"__x": torch.ones(1)}):
        with pytest.raises(ckpt.LayoutError):
            ckpt.save(bad, tmp_path, step=1)
    with pytest.raises(ckpt.StorageError):
        ckpt.save({"a": torch.ones(1)}, "nosuchscheme://x", step=1)
    # keys that collide once made strings: refused, in a dict, a dict subclass or nested
    import collections

    for bad in ({1: torch.ones(1), "1": torch.ones(1)}, {"m": {"2": torch.ones(1), 2: torch.ones(1)}},
                collections.OrderedDict([("3", torch.ones(1)), (3, torch.ones(1))])):
        with pytest.raises(ckpt.LayoutError, match="collide"):
            ckpt.save(bad, tmp_path, step=2)
