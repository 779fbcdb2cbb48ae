"""Reading safetensors files without trusting them: the header checked against the file, and
any box of a tensor read by byte range (no whole-file load, no mmap of a remote file).

A safetensors file is an 8-byte little-endian header length, a JSON header (per tensor: dtype,
shape, ``data_offsets`` relative to the end of the header; an optional ``__metadata__`` of
strings), then the tensors' bytes, row-major, little-endian.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import FormatError
from ..export import SAFETENSORS_DTYPES
from ..layout import Box
from ..storage import Storage

TORCH_DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


@dataclass(frozen=True, slots=True)
class StTensor:
    """One tensor of a safetensors file: where its bytes are (absolute offsets in the file)."""

    file: str
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(storage: Storage, path: str) -> tuple[list[StTensor], dict[str, Any]]:
    """Every tensor of the safetensors file ``path`` and its ``__metadata__``; a
    :class:`FormatError` naming what is wrong (truncated file, bad header, offsets outside)."""
    where = f"{storage.url}/{path}"
    size = storage.size(path)
    if size is None:
        raise FormatError(f"{where} is missing")
    if size < 8:
        raise FormatError(f"{where} is truncated: {size} bytes, not even a header length")
    prefix = bytearray(8)
    storage.read_range_into(path, 0, [memoryview(prefix)])
    n = int.from_bytes(prefix, "little")
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise FormatError(f"{where} is truncated or not safetensors: a header of {n} bytes in a file of {size}")
    raw = bytearray(n)
    storage.read_range_into(path, 8, [memoryview(raw)])
    try:
        header = json.loads(bytes(raw))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{where}: the safetensors header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{where}: the safetensors header is not an object")
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    out = []
    for name, entry in header.items():
        try:
            dtype = TORCH_DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{where}: tensor {name!r} has a malformed header entry {entry!r}") from None
        dt = getattr(torch, dtype)
        if any(s < 0 for s in shape) or end - begin != math.prod(shape) * dt.itemsize or begin < 0:
            raise FormatError(f"{where}: tensor {name!r}: offsets {begin}..{end} do not hold {dtype} {list(shape)}")
        if base + end > size:
            raise FormatError(f"{where} is truncated: {size} bytes, tensor {name!r} ends at byte {base + end}")
        out.append(StTensor(path, name, dt, shape, base + begin, base + end))
    return out, meta if isinstance(meta, dict) else {}


def read_box(storage: Storage, t: StTensor, box: Box) -> torch.Tensor:
    """The ``box`` of tensor ``t``, read by byte range: the box's own bytes when they are
    contiguous in row-major order (whole trailing dimensions), else the rows that hold it."""
    shape, item = t.shape, t.dtype.itemsize
    if not shape:
        return _read(storage, t, 0, 1).reshape(())
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    first = sum(o * s for o, s in zip(box.offsets, strides))
    count = math.prod(box.sizes)
    last = sum((o + n - 1) * s for o, n, s in zip(box.offsets, box.sizes, strides)) if count else first - 1
    if last - first + 1 == count:
        return _read(storage, t, first * item, count).reshape(box.sizes)
    rows = _read(storage, t, box.offsets[0] * strides[0] * item, box.sizes[0] * strides[0])
    rows = rows.reshape((box.sizes[0],) + shape[1:])
    return rows[(slice(None),) + tuple(slice(o, o + n) for o, n in zip(box.offsets[1:], box.sizes[1:]))].contiguous()


def _read(storage: Storage, t: StTensor, offset: int, count: int) -> torch.Tensor:
    buf = torch.empty(count * t.dtype.itemsize, dtype=torch.uint8)
    if count:
        storage.read_range_into(t.file, t.start + offset, [memoryview(buf.numpy())])
    return buf.view(t.dtype)
