"""zarr-python reads our bfloat16/float8 arrays after ``register_zarr_dtypes()``.

The arrays are written by hand, byte for byte in our checkpoint layout, so the test does not
depend on how zarr-python would write them.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import crc32c
import ml_dtypes
import numpy as np
import pytest
import torch
import zarr
from zarr.core.dtype import data_type_registry

from ckpt.zarr_compat import BFloat16, Float8E4M3FN, register_zarr_dtypes

REPO_ROOT = Path(__file__).resolve().parents[2]

DTYPES = [
    ("bfloat16", torch.bfloat16, ml_dtypes.bfloat16),
    ("float8_e4m3fn", torch.float8_e4m3fn, ml_dtypes.float8_e4m3fn),
    ("float8_e5m2", torch.float8_e5m2, ml_dtypes.float8_e5m2),
]
SHAPE = (5, 3)
CHUNKS = (2, 2)  # ragged edge chunks in both dimensions


def _array_metadata(zarr_name: str, itemsize: int) -> dict:
    bytes_codec: dict = {"name": "bytes"}
    if itemsize > 1:
        bytes_codec["configuration"] = {"endian": "little"}
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": list(SHAPE),
        "data_type": zarr_name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(CHUNKS)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0.0,
        "codecs": [bytes_codec, {"name": "crc32c"}],
        "attributes": {},
    }


def _write_array_by_hand(path: Path, zarr_name: str, tensor: torch.Tensor) -> None:
    """Our on-disk layout: zarr.json, and per chunk its full-size little-endian bytes + crc32c."""
    itemsize = tensor.element_size()
    path.mkdir(parents=True)
    (path / "zarr.json").write_text(json.dumps(_array_metadata(zarr_name, itemsize)))
    grid = [math.ceil(s / c) for s, c in zip(SHAPE, CHUNKS, strict=True)]
    for i in range(grid[0]):
        for j in range(grid[1]):
            r, c = i * CHUNKS[0], j * CHUNKS[1]
            block = tensor[r : r + CHUNKS[0], c : c + CHUNKS[1]]
            full = torch.zeros(CHUNKS, dtype=tensor.dtype)  # edge chunks are stored full-size
            full[: block.shape[0], : block.shape[1]] = block
            data = full.view(torch.uint8).numpy().tobytes()
            assert len(data) == CHUNKS[0] * CHUNKS[1] * itemsize
            chunk = path / "c" / str(i) / str(j)
            chunk.parent.mkdir(parents=True, exist_ok=True)
            chunk.write_bytes(data + crc32c.crc32c(data).to_bytes(4, "little"))


def _sample(torch_dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(SHAPE, generator=g) * 4).to(torch_dtype)


@pytest.mark.parametrize(("zarr_name", "torch_dtype", "np_dtype"), DTYPES)
def test_reads_hand_written_array_bit_exactly(
    tmp_path: Path, zarr_name: str, torch_dtype: torch.dtype, np_dtype: type
) -> None:
    tensor = _sample(torch_dtype)
    _write_array_by_hand(tmp_path / "w", zarr_name, tensor)
    register_zarr_dtypes()

    arr = zarr.open_array(tmp_path / "w", mode="r")
    got = arr[...]

    assert isinstance(got, np.ndarray)
    assert got.dtype == np.dtype(np_dtype)
    assert got.shape == SHAPE
    np.testing.assert_array_equal(got.view(np.uint8), tensor.view(torch.uint8).numpy())
    # a ragged partial read goes through the same decode path
    np.testing.assert_array_equal(
        arr[3:, 1:].view(np.uint8), tensor[3:, 1:].contiguous().view(torch.uint8).numpy()
    )


def test_group_with_consolidated_metadata_opens(tmp_path: Path) -> None:
    tensor = _sample(torch.bfloat16)
    _write_array_by_hand(tmp_path / "model" / "w", "bfloat16", tensor)
    (tmp_path / "model" / "zarr.json").write_text(
        json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}})
    )
    meta = _array_metadata("bfloat16", 2)
    root = {
        "zarr_format": 3,
        "node_type": "group",
        "attributes": {},
        "consolidated_metadata": {
            "kind": "inline",
            "must_understand": False,
            "metadata": {
                "model": {"zarr_format": 3, "node_type": "group", "attributes": {}},
                "model/w": meta,
            },
        },
    }
    (tmp_path / "zarr.json").write_text(json.dumps(root))
    register_zarr_dtypes()

    group = zarr.open_group(tmp_path, mode="r", use_consolidated=True)

    assert group.metadata.consolidated_metadata is not None
    arr = group["model/w"]
    assert isinstance(arr, zarr.Array)
    assert arr.dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(arr[...].view(np.uint8), tensor.view(torch.uint8).numpy())


def test_register_is_idempotent() -> None:
    register_zarr_dtypes()
    before = dict(data_type_registry.contents)
    register_zarr_dtypes()
    assert data_type_registry.contents == before
    assert data_type_registry.get("bfloat16") is BFloat16


def test_import_does_not_touch_the_registry() -> None:
    code = (
        "from zarr.core.dtype import data_type_registry as r\n"
        "import ckpt.zarr_compat as m\n"
        "names = ('bfloat16', 'float8_e4m3fn', 'float8_e5m2')\n"
        "assert not any(n in r.contents for n in names), 'registered on import'\n"
        "m.register_zarr_dtypes()\n"
        "assert all(n in r.contents for n in names)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


@pytest.mark.parametrize(("zarr_name", "torch_dtype", "np_dtype"), DTYPES)
def test_zarr_python_writes_our_layout(
    tmp_path: Path, zarr_name: str, torch_dtype: torch.dtype, np_dtype: type
) -> None:
    register_zarr_dtypes()
    tensor = _sample(torch_dtype)
    _write_array_by_hand(tmp_path / "ours", zarr_name, tensor)
    arr = zarr.create_array(
        tmp_path / "theirs",
        shape=SHAPE,
        chunks=CHUNKS,
        dtype=np_dtype,
        fill_value=0,
        compressors=None,
        filters=None,
        serializer=zarr.codecs.BytesCodec(endian="little"),
    )
    arr[...] = tensor.view(torch.uint8).numpy().view(np_dtype)

    theirs = json.loads((tmp_path / "theirs" / "zarr.json").read_text())
    assert theirs["data_type"] == zarr_name
    assert theirs["fill_value"] == 0.0
    assert theirs["codecs"][0] == _array_metadata(zarr_name, tensor.element_size())["codecs"][0]
    for chunk in (tmp_path / "ours" / "c").rglob("*"):
        if chunk.is_file():
            ours_bytes = chunk.read_bytes()[:-4]  # theirs has no crc32c codec here
            theirs_chunk = tmp_path / "theirs" / chunk.relative_to(tmp_path / "ours")
            assert theirs_chunk.read_bytes() == ours_bytes


@pytest.mark.parametrize(
    ("json_value", "bits"),
    [(0, 0x0000), (0.0, 0x0000), (-2.0, 0xC000), ("0x3f80", 0x3F80), ("-Infinity", 0xFF80)],
)
def test_bfloat16_fill_value_json(json_value: object, bits: int) -> None:
    value = BFloat16().from_json_scalar(json_value, zarr_format=3)  # type: ignore[arg-type]
    assert np.array(value, dtype=ml_dtypes.bfloat16).view(np.uint16) == bits


def test_fill_value_written_as_json_number_or_exact_hex() -> None:
    assert BFloat16().to_json_scalar(0, zarr_format=3) == 0.0
    assert Float8E4M3FN().to_json_scalar(np.float32(-1.5), zarr_format=3) == -1.5
    nan = np.array(0x7F, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)[()]
    assert Float8E4M3FN().to_json_scalar(nan, zarr_format=3) == "0x7f"
    with pytest.raises(TypeError):
        BFloat16().from_json_scalar("0x3f", zarr_format=3)  # wrong width
    with pytest.raises(TypeError):
        BFloat16().from_json_scalar(True, zarr_format=3)
